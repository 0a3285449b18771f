"""PNG sample grids during training: EDM sampler on the EMA params, fixed seeds, class-balanced labels.

Sample i uses latents from ``fold_in(key, i)`` and (conditional nets) class ``i % num_classes``, so grids from
different steps show the same seeds. With ``config.sampling.guidance != 1`` and a conditional net, classifier-free
guidance ``D_u + w (D_c - D_u)`` is applied (unconditional = zero labels, as trained with label dropout).
Images (H, W, C) become a grid PNG (one column per class when conditional); 1x1 "images" (2-D points, the
``gmm2d`` playground) become a scatter plot.
"""
from __future__ import annotations

import functools
import math
import os
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import parallel, precond, solvers, transforms
from jaxdiff.nets.from_config import denoiser_fn

MAX_CLASS_COLUMNS = 32  # beyond this many classes a grid is near-square (sorted by label), not one column each


def sample_labels(num_images: int, label_dim: int):
    """Class-balanced one-hot labels (num_images, label_dim), class i % label_dim; None when label_dim is 0."""
    if not label_dim:
        return None
    return jax.nn.one_hot(jnp.arange(num_images) % label_dim, label_dim, dtype=jnp.float32)


def sigma_range(config) -> tuple[float, float]:
    """(sigma_min, sigma_max) of the sampling grid: EDM's 0.002..80, clipped to what VP / VE preconditioning supports."""
    lo, hi = 0.002, 80.0
    if config.model.precond == 'vp':
        lo, hi = max(lo, precond.VP_SIGMA_RANGE[0]), min(hi, precond.VP_SIGMA_RANGE[1])
    elif config.model.precond == 've':
        lo, hi = max(lo, precond.VE_SIGMA_RANGE[0]), min(hi, precond.VE_SIGMA_RANGE[1])
    return lo, hi


def generate(config, net, variables: dict, key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Samples (N, H, W, C) from ``variables`` (e.g. the EMA params + buffers) with EDM's Heun sampler.

    shape: (N, H, W, C). Unjitted; see :func:`make_sampler`.
    """
    n = shape[0]
    latents = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), shape[1:]))(jnp.arange(n))
    denoise = denoiser_fn(config, net, variables)
    labels = sample_labels(n, net.label_dim)
    if labels is not None and config.sampling.guidance != 1.0:
        lo, hi = sigma_range(config)
        denoise = transforms.cfg(config.sampling.guidance, sigma_min=lo, sigma_max=hi)(denoise)
    lo, hi = sigma_range(config)
    return solvers.edm_sampler(denoise, latents, cond=labels, num_steps=config.sampling.num_steps, sigma_min=lo,
                               sigma_max=hi)


def make_sampler(config, net, info, mesh, variables_shardings):
    """Jitted ``sampler(variables, key) -> (N, H, W, C)`` float32 samples, replicated on every device.

    variables_shardings: the shardings of {'params': ..., 'buffers'?: ...} (the EMA's are the params').
    """
    shape = (config.sampling.num_images, info.resolution, info.resolution, info.channels)
    replicated = parallel.replicated(mesh)
    return jax.jit(functools.partial(generate, config, net, shape=shape),
                   in_shardings=(variables_shardings, replicated), out_shardings=replicated)


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[-1, 1] floats (N, H, W, C) -> uint8 (N, H, W, C)."""
    return np.clip(np.rint((np.asarray(images, np.float32) + 1) * 127.5), 0, 255).astype(np.uint8)


def class_layout(images: np.ndarray, labels: Optional[np.ndarray]) -> tuple[np.ndarray, int]:
    """(images, columns) for :func:`grid_image` with one column per class: row r holds each class's r-th image,
    blank where a class has fewer. Unlabelled, single-class or many-class sets get a near-square grid (sorted by
    label when labelled)."""
    square = max(1, math.ceil(math.sqrt(len(images))))
    if labels is None:
        return images, square
    classes = np.unique(labels)
    if not 2 <= len(classes) <= MAX_CLASS_COLUMNS:
        return images[np.argsort(labels, kind='stable')], square
    members = [np.flatnonzero(labels == c) for c in classes]
    out = np.zeros((max(len(m) for m in members), len(classes)) + images.shape[1:], images.dtype)
    for column, index in enumerate(members):
        out[:len(index), column] = images[index]
    return out.reshape((-1,) + images.shape[1:]), len(classes)


def grid_image(images: np.ndarray, columns: int, min_side: int = 32, gap: int = 2) -> np.ndarray:
    """uint8 (N, H, W, C) -> one uint8 grid image (C channels), tiles upscaled (nearest) to >= min_side pixels and
    separated by ``gap`` pixels of mid-grey; row r, column j holds image r * columns + j."""
    n, h, w, c = images.shape
    scale = max(1, math.ceil(min_side / max(h, 1)))
    images = images.repeat(scale, axis=1).repeat(scale, axis=2)
    rows = math.ceil(n / columns)
    pad = rows * columns - n
    if pad:
        images = np.concatenate([images, np.zeros((pad,) + images.shape[1:], images.dtype)])
    images = np.pad(images, ((0, 0), (gap, 0), (gap, 0), (0, 0)), constant_values=128)
    h, w = images.shape[1:3]
    grid = images.reshape(rows, columns, h, w, c).transpose(0, 2, 1, 3, 4).reshape(rows * h, columns * w, c)
    return np.pad(grid, ((0, gap), (0, gap), (0, 0)), constant_values=128)


def save_samples(samples: np.ndarray, path: str, num_classes: int = 0) -> str:
    """Write samples (N, H, W, C) in [-1, 1] as a PNG grid (or a 2-D scatter for 1x1x2 points); returns path.

    Conditional grids use one column per class (sample i has class i % num_classes).
    """
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    samples = np.asarray(samples)
    if samples.shape[1:3] == (1, 1):
        return _scatter(samples.reshape(samples.shape[0], -1), path)
    columns = num_classes if 0 < num_classes <= 32 else math.ceil(math.sqrt(samples.shape[0]))
    grid = grid_image(to_uint8(samples), columns)
    from PIL import Image
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(path)
    return path


def _scatter(points: np.ndarray, path: str) -> str:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(4, 4), dpi=100)
    ax.scatter(points[:, 0], points[:, 1], s=3, alpha=0.6)
    lim = max(6.0, float(np.nanmax(np.abs(points[:, :2]))) if points.size else 6.0)
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_aspect('equal')
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
