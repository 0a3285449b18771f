"""Training losses of EDM (Karras et al. 2022): a noise-level distribution and a weight per parametrisation.

Every loss returns the per-element weighted squared error ``w(sigma) * (D(x0 + sigma n, sigma, cond) - x0)^2``
with shape (B, ...); the caller takes the mean (the reference sums over pixels and divides by batch
later; a mean differs by a constant factor only).
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from jaxdiff import schedules
from jaxdiff.denoiser import Denoiser, expand_sigma


class NoiseLevels(NamedTuple):
    """How a loss draws noise levels and weights them.

    sample: (key, batch) -> sigma (B,).
    weight: sigma (B,) -> loss weight (B,).
    """

    sample: Callable[[jax.Array, int], jax.Array]
    weight: Callable[[jax.Array], jax.Array]


def edm_levels(P_mean: float = -1.2, P_std: float = 1.2, sigma_data: float = schedules.SIGMA_DATA) -> NoiseLevels:
    """EDM: ln sigma ~ N(P_mean, P_std^2); weight (sigma^2 + sd^2) / (sigma * sd)^2."""
    return NoiseLevels(
        sample=lambda key, b: jnp.exp(P_mean + P_std * jax.random.normal(key, (b,))),
        weight=lambda s: (s ** 2 + sigma_data ** 2) / (s * sigma_data) ** 2,
    )


def vp_levels(beta_d: float = schedules.VP_BETA_D, beta_min: float = schedules.VP_BETA_MIN,
              epsilon_t: float = schedules.VP_EPSILON_T) -> NoiseLevels:
    """VP: t ~ U(epsilon_t, 1), sigma = vp_sigma(t); weight 1 / sigma^2."""
    def sample(key, b):
        t = 1 + jax.random.uniform(key, (b,)) * (epsilon_t - 1)
        return schedules.vp_sigma(t, beta_d, beta_min)
    return NoiseLevels(sample=sample, weight=lambda s: 1 / s ** 2)


def ve_levels(sigma_min: float = schedules.VE_SIGMA_MIN, sigma_max: float = schedules.VE_SIGMA_MAX) -> NoiseLevels:
    """VE: ln sigma ~ U(ln sigma_min, ln sigma_max); weight 1 / sigma^2."""
    return NoiseLevels(
        sample=lambda key, b: schedules.song_ve_sigma(jax.random.uniform(key, (b,)), sigma_min, sigma_max),
        weight=lambda s: 1 / s ** 2,
    )


LEVELS = {"edm": edm_levels, "vp": vp_levels, "ve": ve_levels}


def denoising_loss(denoiser: Denoiser, x0: jax.Array, key: jax.Array, levels: NoiseLevels, cond=None) -> jax.Array:
    """Per-element loss (B, ...) for clean data x0 (B, ...): draws sigma and noise from key."""
    k_sigma, k_noise = jax.random.split(key)
    sigma = levels.sample(k_sigma, x0.shape[0])
    noise = jax.random.normal(k_noise, x0.shape, x0.dtype)
    return weighted_error(denoiser, x0, sigma, noise, levels.weight, cond)


def weighted_error(denoiser: Denoiser, x0: jax.Array, sigma: jax.Array, noise: jax.Array,
                   weight: Callable[[jax.Array], jax.Array], cond=None) -> jax.Array:
    """w(sigma) * (D(x0 + sigma * noise, sigma, cond) - x0)^2 for given sigma (B,) and noise (B, ...)."""
    y = x0 + expand_sigma(sigma, x0) * noise
    return expand_sigma(weight(sigma), x0) * (denoiser(y, sigma, cond) - x0) ** 2


def edm_loss(denoiser: Denoiser, x0: jax.Array, key: jax.Array, cond=None, **kwargs) -> jax.Array:
    """EDMLoss (P_mean=-1.2, P_std=1.2, sigma_data=0.5 unless overridden); (B, ...)."""
    return denoising_loss(denoiser, x0, key, edm_levels(**kwargs), cond)


def vp_loss(denoiser: Denoiser, x0: jax.Array, key: jax.Array, cond=None, **kwargs) -> jax.Array:
    """VPLoss (beta_d=19.9, beta_min=0.1, epsilon_t=1e-5 unless overridden); (B, ...)."""
    return denoising_loss(denoiser, x0, key, vp_levels(**kwargs), cond)


def ve_loss(denoiser: Denoiser, x0: jax.Array, key: jax.Array, cond=None, **kwargs) -> jax.Array:
    """VELoss (sigma_min=0.02, sigma_max=100 unless overridden); (B, ...)."""
    return denoising_loss(denoiser, x0, key, ve_levels(**kwargs), cond)
