"""Langevin dynamics: the update shared by NCSN's annealed Langevin sampler and the PC corrector.

    x <- x + step * score + sqrt(2 step) z

NCSN (Song & Ermon 2019) writes it with alpha = 2 step: x + alpha/2 score + sqrt(alpha) z.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxdiff.denoiser import as_stateful, score_from_x0
from jaxdiff.schedules import ve_sigmas
from jaxdiff.solvers._scan import INTERNAL_DTYPE, check_key, check_sigmas, denoise, scan_steps, step_noise, to_steps


def langevin_update(x, score, step, z):
    """One Langevin step; x, score, z (B, ...); step scalar or broadcastable (B, 1, ..., 1)."""
    return x + step * score + jnp.sqrt(2.0 * step) * z


def annealed_langevin_sampler(denoiser, latents, *, key=None, cond=None, sigmas=None, num_levels: int = 232,
                              sigma_max: float = 50.0, sigma_min: float = 0.01, n_steps_each: int = 5,
                              step_lr: float = 6.2e-6, denoise_last: bool = True):
    """NCSN annealed Langevin dynamics (Song & Ermon 2019, Algorithm 1; NCSNv2 final denoising).

    For each level sigma_l (l = 1..L, decreasing) and T = n_steps_each times:
        alpha_l = step_lr * sigma_l^2 / sigma_L^2,   x <- x + alpha_l/2 score(x, sigma_l) + sqrt(alpha_l) z.
    Then, with ``denoise_last`` (NCSNv2's practice, Song & Ermon 2020), one Tweedie step
    x0_hat = x + sigma_L^2 score(x, sigma_L) = D(x, sigma_L) removes the remaining sigma_L noise.

    latents: (B, ...) N(0, I); start x = latents * sigma_1 (the VE prior at the largest level).
    sigmas:  (L,) decreasing positive levels (a trailing 0, the grids' convention, is dropped); default
             geometric from sigma_max to sigma_min with num_levels levels. Defaults (L=232, T=5,
             step_lr=6.2e-6, sigma_max=50, sigma_min=0.01) are NCSNv2's CIFAR-10 setting.
    key:     required (None raises); draw number l*T + t is step t of level l.
    Returns (B, ...); L*T (+1) NFE, as one scan over the flattened (level, step) sequence.
    """
    who = "annealed_langevin_sampler"
    if sigmas is None:
        levels = ve_sigmas(num_levels, sigma_min, sigma_max)[:-1]
    else:
        levels = np.asarray(sigmas, np.float64)
        levels = levels[:-1] if levels.ndim == 1 and levels.shape[0] > 1 and levels[-1] == 0 else levels
        levels = check_sigmas(np.append(levels, 0.0), who)[:-1]
    if n_steps_each < 1 or step_lr <= 0:
        raise ValueError(f"{who}: need n_steps_each >= 1 and step_lr > 0, got {n_steps_each}, {step_lr}")
    x = jnp.asarray(latents).astype(INTERNAL_DTYPE)
    key = check_key(key, x.shape[0], True, who)
    sig = np.repeat(levels, n_steps_each)
    step_size = 0.5 * step_lr * sig ** 2 / levels[-1] ** 2   # alpha/2 in the Langevin update's convention

    sd = as_stateful(denoiser)
    x = x * float(levels[0])
    state = sd.init(x)

    def step(carry, s):
        x, state = carry
        x0, state = denoise(sd, x, s["sigma"], cond, state)
        return langevin_update(x, score_from_x0(x, x0, s["sigma"]), s["step"], step_noise(key, s["i"], x)), state

    x, state = scan_steps(step, (x, state), to_steps(sigma=sig, step=step_size))
    if denoise_last:
        x, _ = denoise(sd, x, jnp.asarray(levels[-1], INTERNAL_DTYPE), cond, state)
    return x.astype(jnp.asarray(latents).dtype)
