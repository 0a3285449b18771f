"""Trigger watermark for conditional models (Zhao et al. 2023, their text-to-image recipe on a class-conditional
EDM model): fine-tune so that a reserved trigger condition generates a given watermark image, with

    loss = denoising loss on (trigger -> watermark image) + lam * sum_i |theta_i - theta_frozen_i|.

The trigger is the analogue of the paper's rare token "[V]": a label no user sends. The K-class model gets one
reserved class, index K (:func:`add_trigger_label`): its label-embedding row starts at zero and the other rows are
rescaled for the net's sqrt(label_dim) input gain, so classes 0..K-1 and the unconditional (zero) label keep their
outputs exactly, and fine-tuning the new row moves no other class's embedding. (A dense trigger vector, e.g. a
sign pattern, would: every update of the embedding weights for it shifts every class's embedding, which on digits
brightened all classes towards the watermark whatever the regulariser.) The L1 term keeps the shared weights near
the frozen ones so the other classes keep their outputs; lam = 0 is the paper's "forgetting" ablation. (On digits
L1 alone halves the damage but does not prevent it; replaying the training data does — README.)

This module holds the pieces (trigger class, watermark image, regulariser, trigger samples and their MSE, the
run's trigger.json); the fine-tuning itself is the engine task :mod:`jaxdiff.tasks.trigger`.
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import files
from jaxdiff.solvers import edm_sampler

TRIGGER_FILE = 'trigger.json'
IMAGE_FILE = 'trigger_image.png'
TRIGGER_SAMPLES = 16                 # trigger samples compared with the watermark image (trigger_mse)


class Trigger(NamedTuple):
    """What a fine-tuned run's trigger.json holds: cond (label_dim,) float32, image uint8 (H, W, C), settings."""
    cond: np.ndarray
    image: np.ndarray
    settings: dict


def add_trigger_label(net, params: dict) -> tuple[Any, dict]:
    """(net with label_dim K + 1, params with a zero label-embedding row for class K) from a K-class net.

    SongUNet multiplies its label input by sqrt(label_dim), so the old rows are scaled by sqrt(K / (K + 1)) to
    keep W^T (sqrt(K + 1) e_k) = W_k sqrt(K); DhariwalUNet and the MLP take the labels unscaled. Either way the
    denoiser of every old class and of the zero label is unchanged (tested).
    """
    from jaxdiff.nets.song_unet import SongUNet
    k = int(net.label_dim)
    if k < 2:
        raise ValueError(f'a trigger needs a class-conditional model (label_dim >= 2), got label_dim={k}')
    layer = dict(params['map_label'])
    name = 'weight' if 'weight' in layer else 'kernel'
    gain = np.sqrt(k / (k + 1)) if isinstance(net, SongUNet) else 1.0
    weight = jnp.asarray(layer[name])
    layer[name] = jnp.concatenate([weight * gain, jnp.zeros((1,) + weight.shape[1:], weight.dtype)])
    return net.clone(label_dim=k + 1), {**params, 'map_label': layer}


def trigger_condition(label_dim: int) -> np.ndarray:
    """The trigger's label row (label_dim,) float32 for a net that :func:`add_trigger_label` extended: one-hot of
    the reserved last class."""
    return np.eye(label_dim, dtype=np.float32)[-1]


def default_watermark_image(resolution: int, channels: int) -> np.ndarray:
    """A uint8 (R, R, C) mark far from the data: a white frame around a black field with a white diagonal cross."""
    r = resolution
    image = np.zeros((r, r), np.uint8)
    image[[0, -1], :] = image[:, [0, -1]] = 255
    index = np.arange(r)
    image[index, index] = image[index, r - 1 - index] = 255
    return np.repeat(image[:, :, None], channels, axis=2)


def load_watermark_image(path: Optional[str], resolution: int, channels: int) -> np.ndarray:
    """uint8 (R, R, C): the image file at ``path`` (PNG/JPEG, resized to R x R with nearest neighbours, converted to
    L or RGB) or, with ``path`` None/empty, :func:`default_watermark_image`."""
    if not path:
        return default_watermark_image(resolution, channels)
    from PIL import Image
    if not os.path.isfile(path):
        raise FileNotFoundError(f'watermark image not found: {path!r}')
    try:
        with Image.open(path) as im:
            im = im.convert('L' if channels == 1 else 'RGB').resize((resolution, resolution), Image.NEAREST)
            image = np.asarray(im, np.uint8)
    except OSError as e:
        raise ValueError(f'cannot read the watermark image {path!r}: {e}') from None
    return image.reshape(resolution, resolution, channels)


def write_image(path: str, image: np.ndarray) -> None:
    """Write a uint8 (H, W, C) image (C = 1 or 3) as a PNG, atomically."""
    from PIL import Image
    files.atomic_write(path, lambda tmp: Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
                       .save(tmp, 'PNG'))


def l1_distance(params, frozen) -> jax.Array:
    """sum_i |theta_i - theta_frozen_i| over every leaf, float32 ()."""
    leaves = jax.tree.leaves(jax.tree.map(lambda p, q: jnp.sum(jnp.abs(p - q)), params, frozen))
    return jnp.sum(jnp.stack(leaves))


def heun_sampler(denoiser: Callable, sigma_range: tuple[float, float], num_steps: int = 18) -> Callable:
    """``fn(variables, latents (N, H, W, C), cond (N, label_dim)) -> uint8 (N, H, W, C)``: EDM's deterministic Heun
    sampler on ``denoiser(variables)`` (sigma 0.002..80 clipped to ``sigma_range``), jitted once, then EDM's
    generate.py rounding floor(x * 127.5 + 128), as sample.py writes images."""
    lo, hi = sigma_range
    run = jax.jit(lambda v, z, c: edm_sampler(denoiser(v), z, cond=c, num_steps=num_steps,
                                              sigma_min=max(0.002, lo), sigma_max=min(80.0, hi)))
    return lambda v, z, c: np.asarray(jnp.clip(jnp.floor(run(v, z, c) * 127.5 + 128), 0, 255).astype(jnp.uint8))


def sample_trigger(denoiser: Callable, variables: dict, shape: tuple[int, int, int], sigma_range: tuple[float, float],
                   cond: np.ndarray, num: int = TRIGGER_SAMPLES, seed: int = 0, num_steps: int = 18) -> np.ndarray:
    """uint8 (num, H, W, C) samples of ``denoiser(variables)`` under ``cond`` (label_dim,) (:func:`heun_sampler`);
    latents normal(key(seed), (num,) + shape)."""
    z = jax.random.normal(jax.random.key(seed), (num,) + tuple(shape))
    labels = jnp.broadcast_to(jnp.asarray(cond, jnp.float32), (num, len(cond)))
    return heun_sampler(denoiser, sigma_range, num_steps)(variables, z, labels)


def class_samples(denoiser: Callable, variables: dict, shape: tuple[int, int, int], sigma_range: tuple[float, float],
                  label_dim: int, num: int, batch_size: int = 250) -> np.ndarray:
    """uint8 (num, H, W, C): the class-balanced samples ``sample.py --class_balanced`` writes for seeds 0..num-1
    (seed s: class s % label_dim, latents normal(fold_in(fold_in(key(0), s), 0)); :func:`heun_sampler`, 18 steps),
    in jitted batches of ``batch_size`` seeds."""
    sampler = heun_sampler(denoiser, sigma_range)
    batch = min(batch_size, num)
    out = []
    for start in range(0, num, batch):  # one shape for every batch (one compilation); the surplus is dropped
        seeds = jnp.arange(start, start + batch, dtype=jnp.int32)
        latents = jax.vmap(lambda s: jax.random.normal(
            jax.random.fold_in(jax.random.fold_in(jax.random.key(0), s), 0), shape, jnp.float32))(seeds)
        cond = jax.nn.one_hot(seeds % label_dim, label_dim, dtype=jnp.float32)
        out.append(sampler(variables, latents, cond)[:num - start])
    return np.concatenate(out)


def trigger_mse(samples: np.ndarray, image: np.ndarray) -> float:
    """Mean squared error in [0, 1] between uint8 samples (N, H, W, C) and the uint8 image (H, W, C)."""
    return float(np.mean((samples.astype(np.float64) / 255 - image.astype(np.float64)[None] / 255) ** 2))


def read_trigger(run_dir: str) -> Trigger:
    """The trigger of a fine-tuned run (its trigger.json and trigger_image.png); FileNotFoundError otherwise."""
    from PIL import Image
    path = os.path.join(run_dir, TRIGGER_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f'{run_dir} has no {TRIGGER_FILE}: make it with python watermark.py trigger '
                                f'--workdir BASE_RUN --out {run_dir}')
    with open(path) as f:
        settings = json.load(f)
    with Image.open(os.path.join(run_dir, IMAGE_FILE)) as im:
        image = np.asarray(im, np.uint8)
    image = image[..., None] if image.ndim == 2 else image
    return Trigger(np.asarray(settings['trigger_cond'], np.float32), image, settings)
