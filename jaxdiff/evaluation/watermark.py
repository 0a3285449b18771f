"""Watermark checks as functions (Zhao et al. 2023): decode images with a codec, bit accuracy under image
perturbations and weight noise, trigger fidelity (``python -m eval.watermark`` parses the flags and prints).
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

NOISE_STDS = (0.02, 0.05, 0.1)       # --perturb: Gaussian noise std, images in [0, 1]
BLUR_SIGMAS = (0.5, 1.0)             # --perturb: Gaussian blur std in pixels
QUANT_LEVELS = (16, 4)               # --perturb: grey levels per channel after quantisation
FEATURES = {(8, 1): 'digits_classifier', (28, 1): 'fashion_mnist_classifier',
            (32, 1): 'fashion_mnist_classifier'}  # (resolution, channels) -> feature classifier for fd


# ----------------------------------------------------------------------------------------------- decoding

def decode(codec) -> Callable[[np.ndarray], np.ndarray]:
    """uint8 images (N, H, W, C) -> bit logits (N, n) through the decoder of a loaded codec run (``codec``:
    :func:`jaxdiff.tasks.watermark_codec.load_codec`'s Run; batched, jitted)."""
    info = codec.info
    run = jax.jit(lambda x: codec.net.apply(codec.variables, x.astype(jnp.float32) / 255.0, method='decode'))

    def logits(images: np.ndarray) -> np.ndarray:
        if images.shape[1:] != (info.resolution, info.resolution, info.channels):
            raise ValueError(f'images are {"x".join(map(str, images.shape[1:]))} but the codec {codec.workdir} '
                             f'reads {info.resolution}x{info.resolution}x{info.channels}')
        return np.concatenate([np.asarray(run(images[i:i + 500])) for i in range(0, len(images), 500)])

    return logits


def bit_scores(logits: np.ndarray, bits: np.ndarray) -> dict:
    """bit_acc (mean), bit_acc_std, all_bits (share fully recovered) and n for decoder logits (N, n)."""
    from jaxdiff.watermark import bits as bitlib
    accuracy = bitlib.bit_accuracy(logits, bits)
    return dict(bit_acc=float(accuracy.mean()), bit_acc_std=float(accuracy.std()),
                all_bits=float(bitlib.all_match(logits, bits).mean()), n=int(len(logits)))


def perturbations() -> list[tuple[str, Callable[[np.ndarray, np.random.Generator], np.ndarray]]]:
    """(name, fn(uint8 images, rng) -> uint8 images) for --perturb, mildest first within each kind."""
    from scipy.ndimage import gaussian_filter

    def noise(std):
        return lambda x, rng: np.clip(np.rint(x + rng.normal(0, std * 255, x.shape)), 0, 255).astype(np.uint8)

    def blur(sigma):  # spatial axes only
        return lambda x, rng: np.clip(np.rint(gaussian_filter(x.astype(np.float64), (0, sigma, sigma, 0))),
                                      0, 255).astype(np.uint8)

    def quantise(levels):  # round to `levels` evenly spaced grey values
        step = 255 / (levels - 1)
        return lambda x, rng: np.clip(np.rint(np.rint(x / step) * step), 0, 255).astype(np.uint8)

    return ([('none', lambda x, rng: x)] + [(f'noise std {s:g}', noise(s)) for s in NOISE_STDS]
            + [(f'blur sigma {s:g}', blur(s)) for s in BLUR_SIGMAS]
            + [(f'quantise {q} levels', quantise(q)) for q in QUANT_LEVELS])


def read_bits(bits: Optional[str], embedded: Optional[str], num_bits: int) -> np.ndarray:
    """The embedded bit string from --bits or from watermark.py embed's JSON (--embedded); uint8 (num_bits,)."""
    from jaxdiff.watermark import bits as bitlib
    if (bits is None) == (embedded is None):
        raise ValueError('give the embedded string as --bits 0101... or --embedded DIR/watermarked.json (one of them)')
    if embedded is not None:
        if not os.path.isfile(embedded):
            raise FileNotFoundError(f'--embedded {embedded!r} not found (watermark.py embed writes it next to the npz)')
        with open(embedded) as f:
            bits = json.load(f)['bits']
    return bitlib.parse_bits(bits, num_bits)


def run_decode(codec, samples: str, bits: np.ndarray, perturb: bool, seed: int = 0,
               allow_incomplete: bool = False) -> dict:
    """The decode mode's result (module docstring); ``codec``: a loaded codec run (:func:`decode`);
    ``allow_incomplete``: decode a sample folder sample.py has not finished."""
    from jaxdiff.evaluation.fid import load_image_set
    images = load_image_set(samples, allow_incomplete).get('images')
    if images is None:
        raise ValueError(f'{samples} holds feature statistics, not images')
    logits = decode(codec)
    rows = []
    for name, fn in (perturbations() if perturb else perturbations()[:1]):
        rows.append(dict(perturbation=name, **bit_scores(logits(fn(images, np.random.default_rng(seed))), bits)))
    return dict(mode='decode', codec=os.path.abspath(codec.workdir), samples=samples, bits=''.join(map(str, bits)),
                **{k: rows[0][k] for k in ('bit_acc', 'bit_acc_std', 'all_bits', 'n')}, rows=rows)


# ----------------------------------------------------------------------------------------------- models

def reference_stats(resolution: int, channels: int):
    """(FeatureNet, FeatureStats of its real ``ref`` split) for images of this size; ValueError for other sizes."""
    from jaxdiff.metrics import frechet
    from jaxdiff.metrics.feature_classifier import dataset_split
    from jaxdiff.tasks.feature_classifier import load_or_train
    name = FEATURES.get((resolution, channels))
    if name is None:
        raise ValueError(f'no feature classifier for {resolution}x{resolution}x{channels} images (have '
                         f'{", ".join(f"{r}x{r}x{c}" for r, c in FEATURES)})')
    net = load_or_train(name, log=lambda m: print(m, file=sys.stderr, flush=True))
    stats = frechet.FeatureStats()
    stats.update(net.apply(dataset_split(name, 'ref')[0])['features'])
    return net, stats


def balanced_samples(model, num_samples: int, variables: Optional[dict] = None, classes: Optional[int] = None,
                     batch_size: int = 250) -> np.ndarray:
    """uint8 class-balanced samples of seeds 0..N-1: seed s gets class s % classes (default all the model's;
    unconditional models: none)."""
    from jaxdiff.sampling.generate import Labels, sample_array
    labels = Labels('cycle', tuple(range(classes or model.label_dim)), model.label_dim) if model.label_dim else None
    return sample_array(model, num_samples, labels=labels, variables=variables, batch_size=batch_size)


def sample_fd(model, num_samples: int, variables: Optional[dict] = None, ref=None,
              classes: Optional[int] = None) -> tuple[np.ndarray, float]:
    """(class-balanced uint8 samples of the first ``classes`` classes, their Fréchet distance to the real ref
    split) for ``model``."""
    from jaxdiff.metrics import frechet
    net, stats = ref or reference_stats(model.resolution, model.channels)
    images = balanced_samples(model, num_samples, variables, classes)
    return images, frechet.features_distance(np.asarray(net.apply(images)['features']), stats)


def add_weight_noise(variables: dict, std: float, key: jax.Array) -> dict:
    """variables with N(0, std^2) added to every 'params' leaf (one key per leaf, folded from ``key``)."""
    leaves, tree = jax.tree.flatten(variables['params'])
    noisy = [p + std * jax.random.normal(jax.random.fold_in(key, i), p.shape, p.dtype) for i, p in enumerate(leaves)]
    return {**variables, 'params': jax.tree.unflatten(tree, noisy)}


def run_weight_noise(codec, workdir: str, bits: np.ndarray, stds: Sequence[float], num_samples: int,
                     seed: int = 0, log: Callable[[str], None] = print) -> dict:
    """The weight-noise mode's result (module docstring); ``codec``: a loaded codec run (:func:`decode`)."""
    from jaxdiff.sampling.model import load_model
    model = load_model(workdir)
    logits = decode(codec)
    ref = reference_stats(model.resolution, model.channels)
    rows = []
    for i, std in enumerate(stds):
        begin = time.time()
        variables = add_weight_noise(model.variables, std, jax.random.fold_in(jax.random.key(seed), i))
        images, fd = sample_fd(model, num_samples, variables, ref)
        rows.append(dict(weight_noise=float(std), **bit_scores(logits(images), bits), fd=fd,
                         seconds=round(time.time() - begin, 1)))
        log(f'weight noise {std:g}: bit acc {rows[-1]["bit_acc"]:.4f}, fd {fd:.3f}')
    return dict(mode='weight_noise', codec=os.path.abspath(codec.workdir), workdir=os.path.abspath(workdir),
                bits=''.join(map(str, bits)), num_samples=num_samples, seed=seed, rows=rows)


def run_trigger(run_dir: str, base: Optional[str], num_samples: int, log: Callable[[str], None] = print) -> dict:
    """The trigger mode's result (module docstring)."""
    from jaxdiff.sampling.model import load_model
    from jaxdiff.watermark.trigger import read_trigger, sample_trigger, trigger_mse
    trigger = read_trigger(run_dir)
    base = base or trigger.settings['base_run']
    tuned, original = load_model(run_dir), load_model(base)
    ref = reference_stats(tuned.resolution, tuned.channels)
    mse = {name: trigger_mse(sample_trigger(m.denoiser, m.variables, (m.resolution, m.resolution, m.channels),
                                            m.sigma_range, cond), trigger.image)
           for name, m, cond in (('finetuned', tuned, trigger.cond),
                                 ('base', original, np.zeros(original.label_dim, np.float32)))}
    fd = {}
    for name, m in (('finetuned', tuned), ('base', original)):
        fd[name] = sample_fd(m, num_samples, ref=ref, classes=original.label_dim)[1]
        log(f'{name}: trigger mse {mse[name]:.4f}, non-trigger fd {fd[name]:.3f}')
    return dict(mode='trigger', run=os.path.abspath(run_dir), base=os.path.abspath(base),
                lam=trigger.settings.get('lam'), steps=trigger.settings.get('steps'), num_samples=num_samples,
                trigger_mse=mse['finetuned'], base_trigger_mse=mse['base'], fd=fd['finetuned'], base_fd=fd['base'],
                fd_ratio=fd['finetuned'] / fd['base'])
