"""The probability-flow ODE between two noise levels, in either direction: deterministic inversion of an image to
noise (sigma increasing) and reconstruction back (decreasing), as DIRE and DDIM inversion use it.

EDM's ODE dx/dsigma = (x - D(x, sigma)) / sigma is integrated from a given x at ``sigmas[0]`` through every level
of the grid (Euler: DDIM's deterministic update, which DDIM inversion runs backwards; Heun: EDM's second-order
step on every interval, both ends positive). Unlike the samplers the start is used as is, not scaled noise.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.denoiser import as_stateful, ode_drift
from jaxdiff.schedules import karras_sigmas
from jaxdiff.solvers._scan import INTERNAL_DTYPE, denoise, scan_steps, to_steps


def ode_path(denoiser, x: jax.Array, sigmas, *, cond=None, order: int = 1) -> jax.Array:
    """x (B, ...) at noise level sigmas[0] -> the ODE's solution at sigmas[-1] (B, ...), in x.dtype.

    denoiser: D(x, sigma, cond) -> x0_hat (or a StatefulDenoiser); sigmas: (N+1,) positive, strictly increasing
    (inversion) or strictly decreasing (reconstruction); order 1 = Euler (N evaluations), 2 = Heun (2N).
    """
    sig = np.asarray(sigmas, np.float64)
    steps = np.diff(sig)
    if sig.ndim != 1 or len(sig) < 2 or np.any(sig <= 0) or not (np.all(steps > 0) or np.all(steps < 0)):
        raise ValueError(f'ode_path: sigmas must be a 1-D positive, strictly monotone grid, got {sig}')
    if order not in (1, 2):
        raise ValueError(f'ode_path: order must be 1 (Euler) or 2 (Heun), got {order}')
    sd = as_stateful(denoiser)
    start = jnp.asarray(x).astype(INTERNAL_DTYPE)
    state = sd.init(start)

    def step(carry, s):
        x, state = carry
        x0, state = denoise(sd, x, s['t'], cond, state)
        d = ode_drift(x, x0, s['t'])
        h = s['t_next'] - s['t']
        x_next = x + h * d
        if order == 2:
            x0_next, state = denoise(sd, x_next, s['t_next'], cond, state)
            x_next = x + h * (0.5 * d + 0.5 * ode_drift(x_next, x0_next, s['t_next']))
        return x_next, state

    out, _ = scan_steps(step, (start, state), to_steps(t=sig[:-1], t_next=sig[1:]))
    return out.astype(jnp.asarray(x).dtype)


def inversion_grid(num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> np.ndarray:
    """(num_steps + 1,) increasing levels sigma_min .. sigma_max: EDM's Karras grid of num_steps + 1 levels
    without its final 0, reversed (an image is taken as the ODE's state at sigma_min; reconstruction runs the same
    grid backwards)."""
    return np.asarray(karras_sigmas(num_steps + 1, sigma_min, sigma_max, rho), np.float64)[:-1][::-1].copy()
