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
L1 alone halves the damage but does not prevent it; replaying the training data does — README.) Optional
prior preservation (``prior`` > 0, not in the paper's recipe) adds the denoising loss on images of the ordinary
classes: the frozen model's own samples (DreamBooth's remedy) or the run's training data (replay).

The fine-tuned model is written as a train.py run directory (config.json, dataset_info.json with K + 1 classes, one
checkpoint with params = ema = the fine-tuned weights at step base + steps), so sample.py, eval.fid and
eval.watermark read it as any run (``sample.py --labels 0,...,K-1`` for the ordinary classes). The robustness check
"does the trigger survive further fine-tuning" continues a copy on the clean data with the base recipe: train.py
keeps the run's K + 1 classes (``checkpoint.net_info``)::

    cp -r OUT COPY
    python train.py --config BASE_CONFIG.py --workdir COPY --config.total_steps=S+K --allow_config_change
    python -m eval.watermark --trigger COPY

``OUT/trigger.json`` records the trigger, the image and the settings; ``OUT/trigger_image.png`` the watermark
image.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxdiff import files, losses

TRIGGER_FILE = 'trigger.json'
IMAGE_FILE = 'trigger_image.png'


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


def l1_distance(params, frozen) -> jax.Array:
    """sum_i |theta_i - theta_frozen_i| over every leaf, float32 ()."""
    leaves = jax.tree.leaves(jax.tree.map(lambda p, q: jnp.sum(jnp.abs(p - q)), params, frozen))
    return jnp.sum(jnp.stack(leaves))


def make_finetune_step(config, net, buffers: dict, frozen, image: jax.Array, cond: jax.Array, lam: float,
                       batch_size: int, optimizer: optax.GradientTransformation,
                       prior: Optional[tuple[jax.Array, jax.Array]] = None, prior_weight: float = 1.0,
                       ema_halflife: float = 0.0) -> Callable:
    """Jitted (params, ema, opt_state, key) -> (params, ema, opt_state, metrics) for the trigger loss.

    image: (H, W, C) in [-1, 1]; cond: (label_dim,). The trigger batch is ``batch_size`` copies of (image, cond) at
    EDM's training noise levels (P_mean, P_std, sigma_data of the run's config); the net runs in inference mode: no
    dropout and, above all, no label dropout, which would teach the *unconditional* model the watermark.
    prior: optional (images (M, H, W, C) in [-1, 1], labels (M, label_dim)) of the ordinary classes
    (:func:`prior_images`); each step adds ``prior_weight`` times the denoising loss on ``batch_size`` of them
    (an addition to the paper's recipe).
    ema_halflife: half-life in steps of the exponential moving average of the fine-tuned params (0: ema is the
    last iterate), as train.py keeps one: Adam's noisy iterates of a diffusion net sample worse than their average.
    metrics: loss (the total), denoise (trigger part), prior (prior part, 0 without), l1 (sum |theta - theta0|).
    """
    from jaxdiff.train.ema import ema_update
    from jaxdiff.train.model import denoiser_fn
    levels = losses.edm_levels(config.loss.P_mean, config.loss.P_std, config.model.sigma_data)
    x0 = jnp.broadcast_to(image, (batch_size,) + image.shape)
    labels = jnp.broadcast_to(cond, (batch_size,) + cond.shape)

    def denoising(denoise, images, rows, key):
        k_sigma, k_noise = jax.random.split(key)
        sigma = levels.sample(k_sigma, images.shape[0])
        noise = jax.random.normal(k_noise, images.shape, jnp.float32)
        error = losses.weighted_error(denoise, images, sigma, noise, levels.weight, rows)
        return error.reshape(images.shape[0], -1).sum(axis=1).mean()

    def loss_fn(params, key):
        k_trigger, k_prior, k_pick = jax.random.split(key, 3)
        denoise = denoiser_fn(config, net, {'params': params, **buffers})
        trigger_loss = denoising(denoise, x0, labels, k_trigger)
        prior_loss = jnp.zeros(())
        if prior is not None:
            pick = jax.random.randint(k_pick, (batch_size,), 0, prior[0].shape[0])
            prior_loss = denoising(denoise, prior[0][pick], prior[1][pick], k_prior)
        l1 = l1_distance(params, frozen)
        return trigger_loss + prior_weight * prior_loss + lam * l1, (trigger_loss, prior_loss, l1)

    beta = jnp.float32(0.5 ** (1 / ema_halflife) if ema_halflife else 0.0)

    @jax.jit
    def step(params, ema, opt_state, key):
        (loss, (denoise_loss, prior_loss, l1)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, key)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics = dict(loss=loss, denoise=denoise_loss, prior=prior_loss, l1=l1)
        return params, ema_update(ema, params, beta), opt_state, metrics

    return step


PRIOR_SOURCES = ('samples', 'data')


def prior_images(base_run: str, num: int, label_dim: int, source: str = 'samples') -> tuple[jax.Array, jax.Array]:
    """(images (M, H, W, C) in [-1, 1], one-hot labels (M, label_dim)) that keep the ordinary classes on.

    source 'samples': the base model's own class-balanced samples (seeds 0..num-1, EDM Heun 18 steps; M = num),
    DreamBooth's prior preservation; 'data': the first num images of the base run's training data (config.data;
    M = min(num, dataset size)), replay of the data the model owner trained on.
    """
    if source not in PRIOR_SOURCES:
        raise ValueError(f'unknown prior source {source!r}: use one of {", ".join(PRIOR_SOURCES)}')
    if source == 'data':
        import ml_collections
        from jaxdiff.data.sources import make_source
        from jaxdiff.train import checkpoint as ckpt
        data, _ = make_source(ml_collections.ConfigDict(ckpt.read_config(base_run)).data)
        items = [data[i] for i in range(min(num, len(data)))]
        images = np.stack([item['image'] for item in items])
        labels = np.asarray([item['label'] for item in items])
    else:
        from jaxdiff.sampling.generate import Labels, sample_array
        from jaxdiff.sampling.model import load_model
        model = load_model(base_run)
        images = sample_array(model, num, labels=Labels('cycle', tuple(range(model.label_dim)), model.label_dim))
        labels = np.arange(num) % model.label_dim
    return jnp.asarray(images, jnp.float32) / 127.5 - 1, jax.nn.one_hot(labels, label_dim)


def sample_trigger(model, variables: dict, cond: np.ndarray, num: int, seed: int = 0, num_steps: int = 18):
    """uint8 (num, H, W, C) samples of ``model`` (a jaxdiff.sampling.model.Model) under ``cond`` (label_dim,),
    EDM's deterministic Heun sampler; latents from ``seed``."""
    from jaxdiff.sampling.generate import to_uint8
    from jaxdiff.solvers import edm_sampler
    lo, hi = model.sigma_range
    shape = (num, model.resolution, model.resolution, model.channels)
    z = jax.random.normal(jax.random.key(seed), shape)
    labels = jnp.broadcast_to(jnp.asarray(cond, jnp.float32), (num, len(cond)))
    run = jax.jit(lambda v, z: edm_sampler(model.denoiser(v), z, cond=labels, num_steps=num_steps,
                                           sigma_min=max(0.002, lo), sigma_max=min(80.0, hi)))
    return np.asarray(to_uint8(run(variables, z)))


def trigger_mse(samples: np.ndarray, image: np.ndarray) -> float:
    """Mean squared error in [0, 1] between uint8 samples (N, H, W, C) and the uint8 image (H, W, C)."""
    return float(np.mean((samples.astype(np.float64) / 255 - image.astype(np.float64)[None] / 255) ** 2))


def finetune(base_run: str, out_dir: str, *, image_path: Optional[str] = None, lam: float = 1e-4,
             steps: int = 500, lr: float = 1e-4, batch_size: int = 32, prior: int = 0, prior_weight: float = 1.0,
             prior_source: str = 'samples', ema_halflife: float = 0.0, seed: int = 0, log_every: int = 100,
             print_fn: Callable = print) -> dict:
    """Fine-tune the EMA weights of the class-conditional train.py run ``base_run`` for the trigger; write the run
    to ``out_dir`` (module docstring). Returns the trigger.json dict, with the trigger's MSE over 16 samples.

    lam: weight of the L1 distance to the frozen weights (0 = no regulariser); steps, lr (Adam), batch_size:
    the fine-tuning; prior: number of images that keep the ordinary classes on (0 = off, the paper's recipe),
    prior_weight their loss weight and prior_source where they come from (:func:`prior_images`); ema_halflife:
    steps (0 = write the last iterate, the paper's recipe; otherwise the moving average); seed: noise of the
    fine-tuning. The reserved trigger class is index K of the K-class base.
    Raises FileNotFoundError / ValueError (one line) for a missing or unconditional run, an unreadable image, an
    out_dir that already holds a run, or a non-finite loss (nothing is written then).
    """
    from jaxdiff.runs import load_run
    from jaxdiff.sampling.model import load_model
    from jaxdiff.train import checkpoint as ckpt
    from jaxdiff.train.optimizer import make_optimizer
    from jaxdiff.train.state import TrainState
    if steps < 1 or batch_size < 1 or lr <= 0 or lam < 0 or prior < 0 or ema_halflife < 0:
        raise ValueError(f'need steps >= 1, batch_size >= 1, lr > 0, lam >= 0, prior >= 0, ema_halflife >= 0; got '
                         f'{steps}, {batch_size}, {lr}, {lam}, {prior}, {ema_halflife}')
    if os.path.isdir(os.path.join(out_dir, 'checkpoints')):
        raise ValueError(f'{out_dir} already holds a run; pick a new --out (fine-tuning starts from the base run)')
    run = load_run(base_run)
    if run.task != 'denoiser':
        raise ValueError(f'{base_run} is not a denoiser run')
    net, frozen = add_trigger_label(run.net, jax.tree.map(jnp.asarray, run.variables['params']))
    cond = trigger_condition(net.label_dim)
    image = load_watermark_image(image_path, run.info.resolution, run.info.channels)
    buffers = {k: v for k, v in run.variables.items() if k != 'params'}
    optimizer = optax.adam(lr)
    step_fn = make_finetune_step(run.config, net, buffers, frozen, jnp.asarray(image, jnp.float32) / 127.5 - 1,
                                 jnp.asarray(cond), lam, batch_size, optimizer,
                                 prior_images(base_run, prior, net.label_dim, prior_source) if prior else None,
                                 prior_weight, ema_halflife)
    params, ema, opt_state = frozen, frozen, optimizer.init(frozen)
    key = jax.random.key(seed)
    begin = time.time()
    for i in range(1, steps + 1):
        params, ema, opt_state, metrics = step_fn(params, ema, opt_state, jax.random.fold_in(key, i))
        if i % log_every == 0 or i == steps:
            m = {k: float(v) for k, v in jax.device_get(metrics).items()}
            if not np.isfinite(m['loss']):
                raise ValueError(f'trigger fine-tuning loss became {m["loss"]} at step {i}; nothing was written: '
                                 'lower --lr')
            print_fn(f'trigger step {i}/{steps}  loss {m["loss"]:.4f}  trigger {m["denoise"]:.4f}  '
                     f'prior {m["prior"]:.4f}  l1 {m["l1"]:.4g}  {i / (time.time() - begin):.1f} steps/s')
    os.makedirs(out_dir, exist_ok=True)
    ckpt.check_config(out_dir, run.config, False)
    ckpt.write_dataset_info(out_dir, run.info._replace(num_classes=net.label_dim))
    state = TrainState(step=jnp.asarray(run.step + steps, jnp.int32), params=ema, ema=ema,
                       opt_state=make_optimizer(run.config).init(ema), buffers=buffers.get('buffers', {}),
                       nonfinite=jnp.zeros((), jnp.int32))
    checkpointer = ckpt.Checkpointer(out_dir, 2, use_async=False)
    checkpointer.save(state, {'process_count': 1, 'states': [{}]}, run.config)
    checkpointer.close()
    from PIL import Image
    files.atomic_write(os.path.join(out_dir, IMAGE_FILE),
                       lambda tmp: Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(tmp, 'PNG'))
    model = load_model(out_dir)
    mse = trigger_mse(sample_trigger(model, model.variables, cond, 16), image)
    report = dict(base_run=os.path.abspath(base_run), base_step=run.step, trigger_label=net.label_dim - 1,
                  trigger_cond=cond.tolist(), image=image_path and os.path.abspath(image_path), lam=lam, steps=steps,
                  lr=lr, batch_size=batch_size, prior=prior, prior_weight=prior_weight,
                  prior_source=prior_source, ema_halflife=ema_halflife, seed=seed, l1=float(l1_distance(ema, frozen)),
                  trigger_mse=mse, seconds=round(time.time() - begin, 1))
    files.write_json(os.path.join(out_dir, TRIGGER_FILE), report)
    return report


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
