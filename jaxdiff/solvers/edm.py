"""EDM's sampler (Karras et al. 2022, Algorithm 2): Heun or Euler on the PF-ODE dx/dsigma = (x - D)/sigma,
with optional "churn" (temporarily raising the noise level by a factor 1 + gamma and injecting fresh noise).

``heun_sampler`` runs on any sigma grid; ``edm_sampler`` / ``euler_sampler`` build the Karras grid.

A denoiser that declares a discrete sigma grid (:class:`jaxdiff.denoiser.GridDenoiser`, e.g.
:func:`jaxdiff.precond.iddpm`) gets the reference's ``net.round_sigma`` treatment: the noise levels and every
churned sigma_hat are rounded onto its grid on the host (sigma_next is an entry of the rounded grid), and the
Karras grid's sigma_min / sigma_max are first clipped to the grid's positive range (``net.sigma_min/max``).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.denoiser import as_stateful, ode_drift, sigma_grid
from jaxdiff.schedules import grid_sigma_range, karras_sigmas, round_sigma_host
from jaxdiff.solvers._scan import INTERNAL_DTYPE, check_key, check_sigmas, denoise, scan_steps, step_noise, to_steps


def heun_sampler(denoiser, latents, sigmas, *, key=None, cond=None, order: int = 2, S_churn: float = 0.0,
                 S_min: float = 0.0, S_max: float = float("inf"), S_noise: float = 1.0):
    """EDM's stochastic/deterministic sampler on an explicit grid (Karras et al. 2022, Algorithm 2).

    denoiser: D(x, sigma, cond) -> x0_hat or a StatefulDenoiser (its state is carried through the scan).
    latents:  (B, ...) N(0, I) noise; the start is ``latents * sigmas[0]``.
    sigmas:   (N+1,) decreasing grid, normally ending in 0 (e.g. :func:`jaxdiff.schedules.karras_sigmas`).
    key:      None, one PRNG key or (B,) per-sample keys; required when S_churn > 0 injects noise.
    order:    2 = Heun (2nd-order correction on every step whose sigma_next > 0), 1 = Euler.
    S_churn, S_min, S_max, S_noise: EDM's churn; gamma_i = min(S_churn/N, sqrt(2)-1) where
        S_min <= sigma_i <= S_max, else 0; sigma_hat = sigma_i (1 + gamma_i); the injected noise has std
        sqrt(sigma_hat^2 - sigma_i^2) * S_noise.
    Returns x0 samples (B, ...) in latents.dtype. NFE: 2N - 1 for Heun on a grid ending in 0 (35 for
    18 steps), N for Euler. With a grid denoiser (``sigma_grid``), the positive sigmas and each sigma_hat are
    rounded to its grid first (rounding may merge neighbours; such a step has h = 0).
    """
    who = "heun_sampler" if order == 2 else "euler_sampler"
    if order not in (1, 2):
        raise ValueError(f"{who}: order must be 1 (Euler) or 2 (Heun), got {order}")
    sig = check_sigmas(sigmas, who)
    grid = sigma_grid(denoiser)
    if grid is not None:
        sig = round_positive_to_grid(sig, grid, who)
    n = sig.shape[0] - 1
    t_cur, t_next = sig[:-1], sig[1:]
    # Churn factors are decided on the host in float64, as in the reference, so no traced branch is needed.
    in_range = (S_min <= t_cur) & (t_cur <= S_max)
    gamma = np.where(in_range, min(S_churn / n, math.sqrt(2) - 1), 0.0)
    t_hat = t_cur + gamma * t_cur
    if grid is not None:
        t_hat = np.where(t_cur > 0, round_sigma_host(t_hat, grid), t_hat)   # reference: net.round_sigma(t_hat)
    noise_std = np.sqrt(np.maximum(t_hat ** 2 - t_cur ** 2, 0.0)) * S_noise
    stochastic = bool(np.any(noise_std > 0))
    x = jnp.asarray(latents).astype(INTERNAL_DTYPE)
    key = check_key(key, x.shape[0], stochastic, who)
    # The 2nd-order correction needs D at sigma_next; it is skipped where sigma_next == 0 (D at 0 is
    # undefined for the drift), exactly the reference's "i < num_steps - 1" on grids ending in 0.
    correct = (t_next > 0) & (order == 2)

    sd = as_stateful(denoiser)
    x = x * float(sig[0])
    state = sd.init(x)
    xs = to_steps(t_hat=t_hat, t_next=t_next, noise_std=noise_std, correct=correct)

    def step(carry, s):
        x, state = carry
        x_hat = x + s["noise_std"] * step_noise(key, s["i"], x) if stochastic else x
        x0, state = denoise(sd, x_hat, s["t_hat"], cond, state)
        d = ode_drift(x_hat, x0, s["t_hat"])
        h = s["t_next"] - s["t_hat"]
        x_euler = x_hat + h * d
        if order == 1:
            return x_euler, state

        def heun(operand):
            x_e, st = operand
            x0_e, st = denoise(sd, x_e, s["t_next"], cond, st)
            return x_hat + h * (0.5 * d + 0.5 * ode_drift(x_e, x0_e, s["t_next"])), st

        # lax.cond on a host-precomputed flag: the last step never calls D at sigma = 0.
        return jax.lax.cond(s["correct"], heun, lambda operand: operand, (x_euler, state))

    x, _ = scan_steps(step, (x, state), xs)
    return x.astype(jnp.asarray(latents).dtype)


def edm_sampler(denoiser, latents, *, key=None, cond=None, num_steps: int = 18, sigma_min: float = 0.002,
                sigma_max: float = 80.0, rho: float = 7.0, S_churn: float = 0.0, S_min: float = 0.0,
                S_max: float = float("inf"), S_noise: float = 1.0, sigmas=None):
    """EDM's sampler (Karras et al. 2022, Algorithm 2; NVlabs/edm ``edm_sampler``) on the Karras grid.

    Grid: sigma_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, i < N, then 0.
    x_0 = latents * sigma_0; Heun steps with churn (see :func:`heun_sampler`); Euler on the last step.
    latents (B, ...) -> x0 samples (B, ...). 18 steps = 35 NFE. ``sigmas`` (N+1,), if given, replaces the
    Karras grid. Deterministic (key may be None) unless S_churn > 0. For a grid denoiser (iDDPM) sigma_min /
    sigma_max are clipped to its grid's positive range and the grid and sigma_hat rounded onto it, as the
    reference's ``max(sigma_min, net.sigma_min)`` and ``net.round_sigma``.
    """
    if sigmas is None:
        sigmas = karras_sigmas(num_steps, *_clip_to_grid(denoiser, sigma_min, sigma_max), rho)
    return heun_sampler(denoiser, latents, sigmas, key=key, cond=cond, order=2, S_churn=S_churn, S_min=S_min,
                        S_max=S_max, S_noise=S_noise)


def euler_sampler(denoiser, latents, *, key=None, cond=None, num_steps: int = 18, sigma_min: float = 0.002,
                  sigma_max: float = 80.0, rho: float = 7.0, S_churn: float = 0.0, S_min: float = 0.0,
                  S_max: float = float("inf"), S_noise: float = 1.0, sigmas=None):
    """First-order (Euler) version of :func:`edm_sampler`: same grid, churn and start; N NFE.

    latents (B, ...) -> x0 samples (B, ...). On a grid sigma_i this equals deterministic DDIM (eta = 0).
    """
    if sigmas is None:
        sigmas = karras_sigmas(num_steps, *_clip_to_grid(denoiser, sigma_min, sigma_max), rho)
    return heun_sampler(denoiser, latents, sigmas, key=key, cond=cond, order=1, S_churn=S_churn, S_min=S_min,
                        S_max=S_max, S_noise=S_noise)


def round_positive_to_grid(sig: np.ndarray, grid: np.ndarray, who: str) -> np.ndarray:
    """(N+1,) float64 grid with its positive entries rounded to the discrete sigma grid (K,); zeros stay.

    The reference rounds the grid it built and appends t_N = 0 afterwards; a positive sigma that would round
    to a 0 grid entry (below half the smallest positive one) is an error, not a silent division by zero.
    """
    out = np.where(sig > 0, round_sigma_host(sig, grid), sig)
    if np.any((sig > 0) & (out <= 0)):
        lo = grid_sigma_range(grid)[0]
        raise ValueError(f"{who}: sigma {sig[(sig > 0) & (out <= 0)].max():g} rounds to 0 on the denoiser's "
                         f"sigma grid; use sigma_min >= {lo:g} (the grid's smallest positive entry)")
    return out


def _clip_to_grid(denoiser, sigma_min: float, sigma_max: float) -> tuple[float, float]:
    """The reference's max(sigma_min, net.sigma_min), min(sigma_max, net.sigma_max) for a grid denoiser."""
    grid = sigma_grid(denoiser)
    if grid is None:
        return sigma_min, sigma_max
    lo, hi = grid_sigma_range(grid)
    return max(sigma_min, lo), min(sigma_max, hi)
