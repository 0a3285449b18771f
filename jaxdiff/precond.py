"""Preconditioning (Karras et al. 2022, Table 1): a raw network F becomes a denoiser D(x, sigma, cond).

    D(x, sigma, cond) = c_skip(sigma) * x + c_out(sigma) * F(c_in(sigma) * x, c_noise(sigma), cond)

Each ``*_coeffs`` function returns (c_skip, c_out, c_in, c_noise) for sigma of shape (B,) — the
independent, testable part. :func:`precondition` applies them to any raw function
``F(x_in (B,...), c_noise (B,), cond) -> (B,...)``; :func:`edm`, :func:`vp`, :func:`ve`, :func:`iddpm` and
:func:`ddpm` (ADM's and DiT's discrete linear schedule) bind a Flax network and its variables, calling it like
the EDM reference: ``net.apply(variables, x, noise_labels, class_labels, augment_labels=..., train=..., rngs=...)``.
:func:`iddpm` (and :func:`iddpm_precondition` for a raw F) and :func:`ddpm` also declare their discrete sigma
grid (:class:`jaxdiff.denoiser.GridDenoiser`), which the EDM samplers round their noise levels onto.
"""
from __future__ import annotations

from functools import lru_cache, partial
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import schedules
from jaxdiff.denoiser import Denoiser, GridDenoiser, expand_sigma, per_sample_sigma

Coeffs = tuple[jax.Array, jax.Array, jax.Array, jax.Array]
RawNet = Callable[[jax.Array, jax.Array, Any], jax.Array]


def edm_coeffs(sigma: jax.Array, sigma_data: float = schedules.SIGMA_DATA) -> Coeffs:
    """EDM: c_skip = sd^2/(s^2+sd^2), c_out = s*sd/sqrt(s^2+sd^2), c_in = 1/sqrt(s^2+sd^2), c_noise = ln(s)/4."""
    s2, d2 = sigma ** 2, sigma_data ** 2
    return d2 / (s2 + d2), sigma * sigma_data / jnp.sqrt(s2 + d2), 1 / jnp.sqrt(s2 + d2), jnp.log(sigma) / 4


def vp_coeffs(sigma: jax.Array, beta_d: float = schedules.VP_BETA_D, beta_min: float = schedules.VP_BETA_MIN,
              M: int = schedules.VP_M) -> Coeffs:
    """VP: c_skip = 1, c_out = -s, c_in = 1/sqrt(s^2+1), c_noise = (M-1) * t(s) (the network predicts eps)."""
    return (jnp.ones_like(sigma), -sigma, 1 / jnp.sqrt(sigma ** 2 + 1),
            (M - 1) * schedules.vp_sigma_inv(sigma, beta_d, beta_min))


def ve_coeffs(sigma: jax.Array) -> Coeffs:
    """VE: c_skip = 1, c_out = s, c_in = 1, c_noise = ln(s/2)."""
    return jnp.ones_like(sigma), sigma, jnp.ones_like(sigma), jnp.log(0.5 * sigma)


def iddpm_grid(M: int = schedules.IDDPM_M, C_1: float = schedules.IDDPM_C1,
               C_2: float = schedules.IDDPM_C2) -> np.ndarray:
    """iDDPMPrecond's sigma grid u_0 > ... > u_M = 0, (M+1,): the recursion of :func:`schedules.iddpm_u` in
    float32, as the reference's ``u`` buffer (up to ~5e-4 relative from the float64 one at the smallest u).
    Cached and read-only: every trace of :func:`iddpm_coeffs` reads it."""
    return _iddpm_grid(int(M), float(C_1), float(C_2))


@lru_cache(maxsize=8)
def _iddpm_grid(M: int, C_1: float, C_2: float) -> np.ndarray:
    u = schedules.iddpm_u(M, C_1, C_2, dtype=np.float32)
    u.flags.writeable = False
    return u


def iddpm_coeffs(sigma: jax.Array, M: int = schedules.IDDPM_M, C_1: float = schedules.IDDPM_C1,
                 C_2: float = schedules.IDDPM_C2) -> Coeffs:
    """iDDPM: c_skip = 1, c_out = -s, c_in = 1/sqrt(s^2+1), c_noise = M - 1 - j(s), j the nearest discrete index."""
    j = schedules.round_sigma_to_grid(sigma, iddpm_grid(M, C_1, C_2), return_index=True)
    return jnp.ones_like(sigma), -sigma, 1 / jnp.sqrt(sigma ** 2 + 1), (M - 1 - j).astype(jnp.float32)


def ddpm_coeffs(sigma: jax.Array, num_timesteps: int = schedules.DDPM_T) -> Coeffs:
    """ADM / DiT discrete diffusion (the network predicts eps from x_t = sqrt(abar_t) (x_0 + sigma_t eps) at integer
    timestep t): c_skip = 1, c_out = -s, c_in = 1/sqrt(s^2+1), c_noise = t(s), the index of the nearest sigma_t."""
    t = schedules.round_sigma_to_grid(sigma, ddpm_grid(num_timesteps), return_index=True)
    return jnp.ones_like(sigma), -sigma, 1 / jnp.sqrt(sigma ** 2 + 1), t.astype(jnp.float32)


@lru_cache(maxsize=8)
def ddpm_grid(num_timesteps: int = schedules.DDPM_T) -> np.ndarray:
    """The (T,) sigmas of :func:`schedules.ddpm_linear_sigmas` as float32 (what c_noise rounds onto); read-only."""
    grid = schedules.ddpm_linear_sigmas(int(num_timesteps)).astype(np.float32)
    grid.flags.writeable = False
    return grid


def precondition(raw: RawNet, coeffs: Callable[[jax.Array], Coeffs], out_channels: Optional[int] = None) -> Denoiser:
    """Turn a raw network F into a denoiser D(x (B,...), sigma () or (B,), cond) -> (B,...).

    Coefficients are computed in float32; F sees ``c_in * x`` cast to x's dtype. ``out_channels`` keeps
    only the first channels of F's output (iDDPM networks also output a learned variance).
    """

    def denoise(x: jax.Array, sigma, cond=None) -> jax.Array:
        x = x.astype(jnp.float32)
        s = per_sample_sigma(sigma, x)
        c_skip, c_out, c_in, c_noise = coeffs(s)
        f = raw(expand_sigma(c_in, x) * x, c_noise, cond).astype(jnp.float32)
        if out_channels is not None:
            f = f[..., :out_channels]
        return expand_sigma(c_skip, x) * x + expand_sigma(c_out, x) * f

    return denoise


def network(net, variables, *, label_dim: int = 0, augment_labels=None, train: bool = False,
            rngs: Optional[dict] = None) -> RawNet:
    """Bind a Flax EDM-style network into a raw function F(x_in, c_noise, cond).

    cond is the (B, label_dim) class-label matrix or None; with label_dim > 0 and cond None the
    network sees zeros (unconditional, as the reference). augment_labels (B, augment_dim) or None.
    """

    def raw(x_in, c_noise, cond):
        labels = cond
        if label_dim and labels is None:
            labels = jnp.zeros((x_in.shape[0], label_dim), jnp.float32)
        return net.apply(variables, x_in, c_noise, labels, augment_labels=augment_labels, train=train,
                         rngs=rngs)

    return raw


def _bind(coeffs_fn):
    def make(net, variables, *, label_dim: int = 0, augment_labels=None, train: bool = False,
             rngs: Optional[dict] = None, out_channels: Optional[int] = None, **coeff_kwargs) -> Denoiser:
        raw = network(net, variables, label_dim=label_dim, augment_labels=augment_labels, train=train, rngs=rngs)
        return precondition(raw, partial(coeffs_fn, **coeff_kwargs), out_channels)

    make.__doc__ = (f"Denoiser from a Flax network with {coeffs_fn.__name__} preconditioning.\n\n"
                    "Args: net, variables ({'params': ...}), label_dim, augment_labels (B, augment_dim), train, rngs,\n"
                    "out_channels (keep the first channels of F), and the keyword constants of "
                    f"{coeffs_fn.__name__}.\nReturns D(x (B,H,W,C), sigma () or (B,), class_labels (B,label_dim) or None).")
    return make


edm = _bind(edm_coeffs)
vp = _bind(vp_coeffs)
ve = _bind(ve_coeffs)
_iddpm_continuous = _bind(iddpm_coeffs)
_ddpm_continuous = _bind(ddpm_coeffs)


def iddpm(net, variables, *, M: int = schedules.IDDPM_M, C_1: float = schedules.IDDPM_C1,
          C_2: float = schedules.IDDPM_C2, **kwargs) -> GridDenoiser:
    """Denoiser from a Flax network with iddpm_coeffs preconditioning, declaring iDDPM's sigma grid.

    Args: net, variables, M, C_1, C_2 and the keywords of :func:`edm` (label_dim, augment_labels, train, rngs,
    out_channels). Returns a :class:`~jaxdiff.denoiser.GridDenoiser` D(x (B,H,W,C), sigma () or (B,), class_labels)
    whose ``sigma_grid`` is :func:`iddpm_grid` (M+1,): the EDM and ablation samplers round their
    time grid and sigma_hat onto it, as the reference does with ``net.round_sigma``.
    """
    den = _iddpm_continuous(net, variables, M=M, C_1=C_1, C_2=C_2, **kwargs)
    return GridDenoiser(den, iddpm_grid(M, C_1, C_2))


def ddpm(net, variables, *, num_timesteps: int = schedules.DDPM_T, **kwargs) -> GridDenoiser:
    """Denoiser from an eps-predicting network trained with ADM's / DiT's discrete 'linear' schedule (e.g. an
    official DiT checkpoint), declaring its T noise levels so that solvers step on them.

    Args: net, variables, num_timesteps (T, 1000) and the keywords of :func:`edm` (label_dim, train, rngs, and
    out_channels: the input's channel count for learned-variance nets, whose output is [eps | v]). Returns a
    :class:`~jaxdiff.denoiser.GridDenoiser` D(x (B,H,W,C), sigma () or (B,), class_labels) with ``sigma_grid`` =
    :func:`ddpm_grid` (T,). x here is x_t / sqrt(abar_t), the variance-exploding view of the reference's x_t.
    """
    return GridDenoiser(_ddpm_continuous(net, variables, num_timesteps=num_timesteps, **kwargs),
                        ddpm_grid(num_timesteps))


def iddpm_precondition(raw: RawNet, M: int = schedules.IDDPM_M, C_1: float = schedules.IDDPM_C1,
                       C_2: float = schedules.IDDPM_C2, out_channels: Optional[int] = None) -> GridDenoiser:
    """:func:`precondition` with iddpm_coeffs for a raw F(x_in (B,...), c_noise (B,), cond), declaring the
    (M+1,) iDDPM sigma grid like :func:`iddpm`. Returns D(x (B,...), sigma () or (B,), cond) -> (B,...)."""
    den = precondition(raw, partial(iddpm_coeffs, M=M, C_1=C_1, C_2=C_2), out_channels)
    return GridDenoiser(den, iddpm_grid(M, C_1, C_2))


def iddpm_sigma_range(M: int = schedules.IDDPM_M, C_1: float = schedules.IDDPM_C1,
                      C_2: float = schedules.IDDPM_C2) -> tuple[float, float]:
    """(u_{M-1}, u_0): the noise range iDDPMPrecond supports (the reference's sigma_min / sigma_max)."""
    return schedules.grid_sigma_range(iddpm_grid(M, C_1, C_2))

# Noise-level ranges each parametrisation supports (the reference's sigma_min / sigma_max attributes).
VP_SIGMA_RANGE = (float(schedules.vp_sigma(schedules.VP_EPSILON_T)), float(schedules.vp_sigma(1.0)))
VE_SIGMA_RANGE = (schedules.VE_SIGMA_MIN, schedules.VE_SIGMA_MAX)
