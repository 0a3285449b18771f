"""Safe Latent Diffusion (Schramowski et al., CVPR 2023) as a stateful transform.

In epsilon space (eps = (x - D) / sigma) with eps_u (unconditional), eps_p (the prompt's condition) and
eps_S (the safety concept's condition), at every denoiser evaluation, elementwise:

    mu  = min(s_S * |eps_p - eps_S|, 1), and mu = 0 where eps_p - eps_S >= lambda
    g   = mu * (eps_S - eps_u) + s_m * nu
    nu <- b_m * nu + (1 - b_m) * g
    eps = eps_u + s_g * [(eps_p - eps_u) - 1{past warm-up} * g]

SLD includes its own classifier-free guidance (s_g, the "guidance scale", in the eps_u + s_g (eps_p - eps_u)
convention, i.e. jaxdiff's CFG weight w = s_g). The momentum nu is transform state carried by the solver's
scan; it builds up during the warm-up too, only the subtraction of g waits.

Warm-up: SLD counts delta solver *steps*, but a transform only sees denoiser calls and their sigma (a Heun
step makes two calls, a Langevin level several). It is mapped through the sigma grid the solver runs on:
pass that grid as ``sigmas`` and the safety term is subtracted once sigma <= sigmas[delta], i.e. from step
delta on for every solver (the second Heun evaluation of step delta - 1, at sigmas[delta], already counts).
The momentum likewise advances once per denoiser call, so twice per Heun step.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.denoiser import eps_from_x0, expand_sigma, x0_from_eps
from jaxdiff.transforms.base import Transform, stateful


class SLDConfig(NamedTuple):
    """SLD hyper-parameters: warm-up steps delta, safety scale s_S, threshold lambda, momentum s_m and b_m."""

    warmup_steps: int
    safety_scale: float
    threshold: float
    momentum_scale: float
    momentum_beta: float


PRESETS = {
    "WEAK": SLDConfig(15, 20.0, 0.0, 0.0, 0.0),
    "MEDIUM": SLDConfig(10, 1000.0, 0.01, 0.3, 0.4),
    "STRONG": SLDConfig(7, 2000.0, 0.025, 0.5, 0.7),
    "MAX": SLDConfig(0, 5000.0, 1.0, 0.5, 0.7),
}


class SLDState(NamedTuple):
    """nu: (B, ...) safety momentum, shaped like x."""

    nu: jax.Array


def safety_guidance(eps_u, eps_p, eps_s, nu, config: SLDConfig) -> tuple[jax.Array, jax.Array]:
    """SLD's safety term g and the updated momentum, elementwise on (B, ...) eps arrays."""
    diff = eps_p - eps_s
    mu = jnp.where(diff >= config.threshold, 0.0, jnp.minimum(jnp.abs(diff) * config.safety_scale, 1.0))
    g = mu * (eps_s - eps_u) + config.momentum_scale * nu
    return g, config.momentum_beta * nu + (1.0 - config.momentum_beta) * g


def warmup_sigma(config: SLDConfig, sigmas) -> float:
    """The noise level from which the safety term applies: sigmas[delta] (inf when delta = 0)."""
    if config.warmup_steps == 0:
        return float("inf")
    if sigmas is None:
        raise ValueError(f"sld: a warm-up of {config.warmup_steps} steps needs the solver's sigma grid "
                         f"(sigmas=...) to know when that step comes; pass it, or use warmup_steps=0")
    sig = np.asarray(sigmas, np.float64)
    if config.warmup_steps >= sig.shape[0]:
        raise ValueError(f"sld: warm-up of {config.warmup_steps} steps is past the grid's {sig.shape[0] - 1} steps")
    # float32 sigmas handed to the denoiser may round just above the grid value.
    return float(sig[config.warmup_steps]) * (1 + 1e-6)


def _batched(c, batch: int):
    """Broadcast a condition pytree whose leaves have a leading axis of 1 to the batch."""
    return jax.tree.map(lambda a: jnp.broadcast_to(a, (batch,) + jnp.shape(a)[1:]) if jnp.shape(a)[:1] == (1,)
                        else a, c)


def sld(safety_cond, preset: str = "MEDIUM", guidance_scale: float = 7.5, *, sigmas=None, uncond=None,
        **overrides: Any) -> Transform:
    """SLD transform: needs three inner calls per evaluation (prompt, unconditional, safety concept).

    safety_cond: the condition encoding the unsafe concept (same structure as cond; leading axis 1 broadcasts).
    preset: 'WEAK', 'MEDIUM', 'STRONG' or 'MAX' (see PRESETS); overrides: SLDConfig fields to replace.
    guidance_scale: s_g, SLD's own CFG scale on (eps_p - eps_u).
    sigmas: the solver's decreasing sigma grid, needed when warmup_steps > 0 (module docstring).
    uncond: the condition passed for eps_u (None: unconditional for mixtures and networks).
    Shapes: x (B, ...), sigma () or (B,), cond the inner denoiser's; state SLDState(nu (B, ...)).
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown SLD preset {preset!r}; choose one of {sorted(PRESETS)}")
    config = PRESETS[preset]._replace(**overrides)
    start = warmup_sigma(config, sigmas)

    def init(x):
        return SLDState(jnp.zeros_like(x))

    def update(call, x, sigma, cond, state):
        eps = lambda c: eps_from_x0(x, call(x, sigma, c), sigma)
        eps_p, eps_u, eps_s = eps(cond), eps(uncond), eps(_batched(safety_cond, x.shape[0]))
        g, nu = safety_guidance(eps_u, eps_p, eps_s, state.nu, config)
        on = expand_sigma(jnp.asarray(sigma) <= start, x)
        out = eps_u + guidance_scale * ((eps_p - eps_u) - jnp.where(on, g, 0.0))
        return x0_from_eps(x, out, sigma), SLDState(nu)

    return stateful(init, update)
