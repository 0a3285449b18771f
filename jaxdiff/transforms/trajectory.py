"""Where a denoiser call is on the sampling trajectory, read from sigma alone (:func:`progress` along EDM's
rho-warped time, :func:`next_level` of the solver's grid), and how to make a solver's step land
somewhere else without touching the solver.

A transform sees ``(x, sigma, cond)`` only. A method written for one solver's *update* (unguidance's DDIM step
with the corrected x0 and the original noise; the practical safe denoiser's re-noise-and-step) needs two things
it cannot see: the next level of the grid the solver runs on, and how the solver turns x0_hat into x'. The
first is :func:`next_level` (the grid is a parameter of the transform, like SLD's warm-up grid). The second is
fixed for the DDIM family (DDIM for every eta, ancestral DDPM = DDIM eta = 1, and EDM's Euler step = DDIM eta = 0):
in EDM's unscaled variables (x = x_scaled / sqrt(abar), sigma = sqrt((1 - abar) / abar)) every such step is

    x' = x0_hat + m eps_hat + c z,   eps_hat = (x - x0_hat) / sigma,
    m  = sqrt(sigma'^2 - c^2),       c = eta sigma' sqrt(sigma^2 - sigma'^2) / sigma

(:mod:`jaxdiff.solvers.discrete`), i.e. x' = (1 - m/sigma) x0_hat + (m/sigma) x + c z. Handing the solver
x0_hat + delta / (1 - m/sigma) instead of x0_hat therefore moves x' by exactly delta (same z):
:func:`shift_x0`. Since m <= sigma' < sigma the factor is finite, and it is 1 on the last step (sigma' = 0).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxdiff.denoiser import expand_sigma

# A level counts as "below sigma" when it is below sigma * (1 - RTOL): a sigma handed over in float32 from a float64
# grid is then matched to its own level, not taken for the level under it.
RTOL = 1e-5


def progress(sigma, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0):
    """Sampling progress s in [0, 1] of a noise level: 0 at sigma_max (pure noise), 1 at sigma_min.

    Measured in EDM's rho-warped time, so it is linear in the step index on the Karras grid; clipped.
    """
    inv = 1.0 / rho
    s = (sigma_max ** inv - jnp.asarray(sigma) ** inv) / (sigma_max ** inv - sigma_min ** inv)
    return jnp.clip(s, 0.0, 1.0)


def next_level(sigma, grid) -> jax.Array:
    """The next level of ``grid`` below sigma: the largest entry < sigma (to RTOL), 0 when there is none.

    sigma: () or (B,); grid: (N+1,) the solver's noise grid (any order; usually decreasing and ending in 0).
    Returns float32 with sigma's shape. On the grid, sigma_i -> sigma_{i+1} (Heun's second evaluation, at
    sigma_{i+1}, gets sigma_{i+2}); off the grid (EDM's churned levels) the level under it.
    """
    g = jnp.asarray(grid, jnp.float32)
    s = jnp.asarray(sigma, jnp.float32)
    below = g < s[..., None] * (1.0 - RTOL)
    return jnp.max(jnp.where(below, g, 0.0), axis=-1)


def ddim_mean_coef(sigma, sigma_next, eta: float = 0.0) -> jax.Array:
    """m = sqrt(sigma'^2 - c^2), c = eta sigma' sqrt(sigma^2 - sigma'^2) / sigma: the weight of eps_hat in the
    unscaled DDIM(eta) step from sigma to sigma' (module docstring). sigma, sigma_next: same shape (or scalars)."""
    s = jnp.asarray(sigma, jnp.float32)
    sn = jnp.asarray(sigma_next, jnp.float32)
    c = eta * sn * jnp.sqrt(jnp.maximum(s ** 2 - sn ** 2, 0.0)) / s
    return jnp.sqrt(jnp.maximum(sn ** 2 - c ** 2, 0.0))


def shift_x0(x0: jax.Array, delta: jax.Array, sigma, sigma_next, eta: float = 0.0) -> jax.Array:
    """The x0_hat that makes a DDIM(eta) step from sigma to sigma_next land ``delta`` away from where x0 would.

    x0, delta: (B, ...); sigma, sigma_next: () or (B,). Returns x0 + delta / (1 - m / sigma), (B, ...).
    """
    s = jnp.asarray(sigma, jnp.float32)
    gain = s / (s - ddim_mean_coef(s, sigma_next, eta))
    return x0 + expand_sigma(gain, x0) * delta
