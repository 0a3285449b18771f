"""Per-image denoising loss of a diffusion model at fixed noise levels: the statistic of loss-based membership
inference (training images are denoised better than unseen ones) and of the seed's generated-image detector.

For an image x (in [-1, 1]) and a level sigma the loss is mean_pixels (D(x + sigma n, sigma) - x)^2, averaged over
``draws`` noise draws n ~ N(0, I). It is the x0-space error; the epsilon-space error of a DDPM,
||eps - eps_hat||^2 per pixel, is it divided by sigma^2 (x = x0 + sigma eps), so one level ranks images the same
in either space, and :func:`eps_space` converts for averages over levels.
"""
from __future__ import annotations

from typing import Callable, Iterator, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np


def eps_space(losses: np.ndarray, sigmas: Sequence[float]) -> np.ndarray:
    """x0-space losses (N, S) at ``sigmas`` (S,) -> epsilon-space ||eps - eps_hat||^2 per pixel (N, S)."""
    return np.asarray(losses) / np.square(np.asarray(sigmas, np.float64))


def model_batches(images: np.ndarray, labels: Optional[np.ndarray], label_dim: int, batch_size: int
                  ) -> Iterator[tuple[int, int, jax.Array, Optional[jax.Array]]]:
    """uint8 images (N, H, W, C) as a model's inputs, batch by batch: (first row, rows n, x float32 (B, H, W, C) in
    [-1, 1], one-hot labels (B, label_dim) or None). Every batch has B = ``batch_size`` rows when N exceeds it (the
    last padded with zeros past its n real rows: one compiled shape), else B = N."""
    if label_dim and labels is None:
        raise ValueError('the model is class-conditional: give the images\' labels')
    for lo in range(0, len(images), batch_size):
        part = images[lo:lo + batch_size]
        n = len(part)
        pad = batch_size - n if len(images) > batch_size else 0
        x = np.concatenate([part, np.zeros((pad,) + part.shape[1:], part.dtype)]).astype(np.float32) / 127.5 - 1
        cond = None
        if label_dim:
            cond = jax.nn.one_hot(np.concatenate([labels[lo:lo + n], np.zeros(pad, np.int64)]), label_dim,
                                  dtype=jnp.float32)
        yield lo, n, jnp.asarray(x), cond


def denoising_losses(denoiser: Callable, images: np.ndarray, labels: Optional[np.ndarray], label_dim: int,
                     sigmas: Sequence[float], *, draws: int = 4, seed: int = 0, batch_size: int = 250,
                     log: Optional[Callable[[str], None]] = None) -> np.ndarray:
    """float32 (N, S): image n's x0-space denoising loss at ``sigmas[s]``, averaged over ``draws`` noise draws.

    denoiser: D(x (B,H,W,C), sigma (B,), class_labels (B, label_dim) or None) -> (B,H,W,C) (jittable);
    images uint8 (N,H,W,C); labels int (N,) (the conditioning classes; None or label_dim = 0: unconditional).
    The noise of image n, level s, draw d is a function of (seed, n, s, d) only, so a subset or another batch size
    gives the same numbers.
    """
    sigmas = [float(s) for s in sigmas]
    if not sigmas or min(sigmas) <= 0 or draws < 1:
        raise ValueError(f'denoising losses need positive sigmas and draws >= 1, got sigmas={sigmas}, draws={draws}')
    levels = jnp.asarray(sigmas, jnp.float32)

    @jax.jit
    def batch_losses(x, cond, index):
        def one(pair):
            s, d = pair
            keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(
                jax.random.key(seed), i), s), d))(index)
            noise = jax.vmap(lambda k: jax.random.normal(k, x.shape[1:]))(keys)
            sigma = jnp.full((x.shape[0],), levels[s])
            out = denoiser(x + sigma[:, None, None, None] * noise, sigma, cond)
            return jnp.mean(jnp.square(out.astype(jnp.float32) - x), axis=(1, 2, 3))
        pairs = jnp.stack(jnp.meshgrid(jnp.arange(len(sigmas)), jnp.arange(draws), indexing='ij'), -1).reshape(-1, 2)
        per = jax.lax.map(lambda p: one((p[0], p[1])), pairs)  # (S * draws, B)
        return per.reshape(len(sigmas), draws, -1).mean(axis=1).T

    out = []
    for lo, n, x, cond in model_batches(images, labels, label_dim, batch_size):
        index = jnp.arange(lo, lo + len(x), dtype=jnp.uint32)
        out.append(np.asarray(batch_losses(x, cond, index))[:n])
        if log and (lo // batch_size) % 10 == 9:
            log(f'denoising losses: {lo + n:,} / {len(images):,} images')
    return np.concatenate(out) if out else np.zeros((0, len(sigmas)), np.float32)
