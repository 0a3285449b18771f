"""Classifier-free guidance and its weight schedules.

Convention used throughout (in denoiser / x0 space, which is the same affine combination as in epsilon space
because eps = (x - x0)/sigma is affine in x0 at fixed x, sigma):

    D_w = D_u + w * (D_c - D_u)

so ``w = 1`` is the conditional model, ``w = 0`` the unconditional one. Papers that write
``(1 + w') eps_c - w' eps_u`` (Ho & Salimans) use ``w' = w - 1``.
"""
from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp

from jaxdiff.denoiser import expand_sigma
from jaxdiff.transforms.base import Transform
from jaxdiff.transforms.guided import GuidanceInterval, evaluate_conditions, guided_transform
from jaxdiff.transforms.trajectory import progress


# --- CFG weight schedules (Wang et al., "Analysis of Classifier-Free Guidance Weight Schedulers", TMLR 2024).
# Each maps progress s in [0, 1] (0 = pure noise, 1 = clean; see trajectory.progress) and the nominal weight w
# to the weight used at that step; the parameter-free ones average to w over s in [0, 1], the parametrised ones
# (clamp_linear, pcs) do not.

def _constant(s, w):
    return w * jnp.ones_like(s)


def _linear(s, w):
    return 2 * w * s


def _invlinear(s, w):
    return 2 * w * (1 - s)


def _cosine(s, w):
    return w * (1 - jnp.cos(jnp.pi * s))


def _sine(s, w):
    return w * (1 + jnp.cos(jnp.pi * s))


def _v_shape(s, w):
    return 4 * w * jnp.abs(s - 0.5)


def _lambda_shape(s, w):
    return 2 * w * (1 - 2 * jnp.abs(s - 0.5))


def _clamp_linear(s, w, c: float = 1.0):
    return jnp.maximum(c, 2 * w * s)


def _pcs(s, w, a: float = 1.0):
    # Power-cosine as the public scheduler port writes it, 0.5 w (1 - cos(pi ((T - t)/T)^a)) with (T - t)/T = s:
    # it rises from 0 to w and, unlike the parameter-free schedules, is not normalised to mean w (a = 1 gives
    # half the 'cosine' schedule). The un-halved form is pcs at weight 2w.
    return 0.5 * w * (1 - jnp.cos(jnp.pi * s ** a))


WEIGHT_SCHEDULES: dict[str, Callable] = {
    "constant": _constant, "linear": _linear, "invlinear": _invlinear, "cosine": _cosine, "sine": _sine,
    "v_shape": _v_shape, "lambda_shape": _lambda_shape, "clamp_linear": _clamp_linear, "pcs": _pcs,
}


def guidance_weight(weight: float, sigma, schedule: str = "constant", *, sigma_min: float = 0.002,
                    sigma_max: float = 80.0, rho: float = 7.0, **schedule_kwargs) -> jax.Array:
    """The scheduled weight at noise level sigma (() or (B,)): WEIGHT_SCHEDULES[schedule](progress(sigma), w).

    schedule_kwargs: ``c`` for clamp_linear (the floor), ``a`` for pcs (the exponent).
    """
    if schedule not in WEIGHT_SCHEDULES:
        raise ValueError(f"unknown CFG weight schedule {schedule!r}; choose one of {sorted(WEIGHT_SCHEDULES)}")
    s = progress(sigma, sigma_min, sigma_max, rho)
    return WEIGHT_SCHEDULES[schedule](s, weight, **schedule_kwargs)


def cfg(weight: float, *, uncond=None, schedule: str = "constant", negative=None, negative_weight: float = 0.0,
        negative_mode: str = "subtract", sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
        interval: Optional[GuidanceInterval] = None, batched: bool = True, **schedule_kwargs) -> Transform:
    """Classifier-free guidance D_u + w(sigma) (D_c - D_u), optionally with a negative condition.

    weight: nominal guidance weight w (1 = conditional model; see the module docstring's convention).
    uncond: the condition meaning "unconditional" passed to the inner denoiser (None: the networks and
        mixtures treat None / zero labels as unconditional).
    schedule: a key of WEIGHT_SCHEDULES; progress is measured on the Karras time of (sigma_min, sigma_max, rho).
    negative: a negative condition (same structure as cond; leaves with a leading axis of 1 are broadcast to
        cond's batch, so one negative class serves every sample). With negative_mode='subtract':
        D = D_u + w (D_c - D_u) - w_n (D_neg - D_u); with 'replace': D_neg takes D_u's place,
        D = D_neg + w (D_c - D_neg). w_n = negative_weight (scheduled like w).
    interval: guide only inside a :class:`jaxdiff.transforms.guided.GuidanceInterval` (the conditional model alone,
        one evaluation, outside it).
    batched: the conditional, unconditional and negative evaluations as one call on the stacked batch (see
        :mod:`jaxdiff.transforms.guided`); False: one call each. Both give the same output to float tolerance.
    Shapes: x (B, ...), sigma () or (B,), cond the inner denoiser's.
    """
    if negative_mode not in ("subtract", "replace"):
        raise ValueError(f"negative_mode must be 'subtract' or 'replace', got {negative_mode!r}")
    sched = dict(schedule=schedule, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho, **schedule_kwargs)
    guidance_weight(weight, 1.0, **sched)  # fail fast on a bad schedule name or argument

    def guided(call, x, sigma, cond, stack):
        w = expand_sigma(guidance_weight(weight, sigma, **sched), x)
        neg = None if negative is None else jax.tree.map(
            lambda n, c: jnp.broadcast_to(n, c.shape) if jnp.shape(n)[:1] == (1,) else n, negative, cond)
        if neg is not None and negative_mode == "replace":
            d_c, d_n = evaluate_conditions(call, x, sigma, [cond, neg], stack)
            return d_n + w * (d_c - d_n), d_c
        if neg is None:
            d_c, d_u = evaluate_conditions(call, x, sigma, [cond, uncond], stack)
            return d_u + w * (d_c - d_u), d_c
        d_c, d_u, d_n = evaluate_conditions(call, x, sigma, [cond, uncond, neg], stack)
        w_n = expand_sigma(guidance_weight(negative_weight, sigma, **sched), x)
        return d_u + w * (d_c - d_u) - w_n * (d_n - d_u), d_c

    return guided_transform(guided, interval, batched)
