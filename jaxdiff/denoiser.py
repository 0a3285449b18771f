"""The one signature everything generates through, and the quantities derived from it.

A *denoiser* is any callable ``D(x, sigma, cond) -> x0_hat``:

- ``x``: (B, ...) noisy samples in EDM's unscaled convention ``x = x0 + sigma * n``;
- ``sigma``: (B,) per-sample noise levels or a scalar;
- ``cond``: a pytree of conditioning (e.g. (B, label_dim) one-hot labels) or None;
- returns ``x0_hat``: (B, ...) the estimate of E[x0 | x].

Score, ODE drift and epsilon are derived from ``x0_hat`` here and nowhere else.

A *stateful denoiser* (what guidance transforms with memory, such as SLD's momentum, produce) is a
:class:`StatefulDenoiser`: ``init(x) -> state`` and ``apply(x, sigma, cond, state) -> (x0_hat, state)``.
Solvers turn whatever they are given into this form with :func:`as_stateful` and carry the state
through their ``lax.scan``, so plain and stateful denoisers run through the same code.

A denoiser trained on discrete noise levels (iDDPM) declares them as a :class:`GridDenoiser` (attribute
``sigma_grid``, read with :func:`sigma_grid`); the EDM samplers round their noise levels onto it.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Union

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Denoiser = Callable[[Array, Array, Any], Array]


class StatefulDenoiser(NamedTuple):
    """A denoiser with state threaded through sampling (optax-style ``init``/``apply`` pair).

    init:  x (B, ...) -> state pytree (built from the first noisy batch, e.g. zeros_like(x)).
    apply: (x (B, ...), sigma (B,) or (), cond, state) -> (x0_hat (B, ...), new state).
    """

    init: Callable[[Array], Any]
    apply: Callable[[Array, Array, Any, Any], tuple[Array, Any]]


AnyDenoiser = Union[Denoiser, StatefulDenoiser]


def as_stateful(denoiser: AnyDenoiser) -> StatefulDenoiser:
    """Wrap a plain denoiser as a stateful one with empty state ``()``; stateful ones pass through."""
    if isinstance(denoiser, StatefulDenoiser):
        return denoiser
    if not callable(denoiser):
        raise TypeError(f"a denoiser must be callable D(x, sigma, cond) or a StatefulDenoiser, got {type(denoiser)}")
    return StatefulDenoiser(init=lambda x: (), apply=lambda x, sigma, cond, state: (denoiser(x, sigma, cond), state))


def expand_sigma(sigma, x: Array) -> Array:
    """Broadcast sigma (scalar or (B,)) against x (B, ...): returns shape () or (B, 1, ..., 1)."""
    sigma = jnp.asarray(sigma, dtype=x.dtype)
    if sigma.ndim == 0:
        return sigma
    if sigma.shape != x.shape[:1]:
        raise ValueError(f"sigma must be a scalar or have shape (B,) = {x.shape[:1]}, got {sigma.shape}")
    return sigma.reshape(sigma.shape + (1,) * (x.ndim - 1))


def per_sample_sigma(sigma, x: Array) -> Array:
    """sigma as a (B,) vector whatever it was given as (scalar or (B,))."""
    return jnp.broadcast_to(jnp.asarray(sigma, x.dtype), x.shape[:1])


def eps_from_x0(x: Array, x0: Array, sigma) -> Array:
    """Predicted noise eps = (x - x0_hat) / sigma; shapes (B, ...)."""
    return (x - x0) / expand_sigma(sigma, x)


def x0_from_eps(x: Array, eps: Array, sigma) -> Array:
    """Inverse of :func:`eps_from_x0`: x0_hat = x - sigma * eps."""
    return x - expand_sigma(sigma, x) * eps


def score_from_x0(x: Array, x0: Array, sigma) -> Array:
    """Score grad_x log p_sigma(x) = (x0_hat - x) / sigma^2 (Tweedie); shapes (B, ...)."""
    return (x0 - x) / expand_sigma(sigma, x) ** 2


def ode_drift(x: Array, x0: Array, sigma) -> Array:
    """EDM probability-flow ODE in sigma-time: dx/dsigma = (x - x0_hat) / sigma; shapes (B, ...)."""
    return eps_from_x0(x, x0, sigma)


class GridDenoiser:
    """A plain denoiser that declares the discrete noise levels it was trained on (iDDPM's u_j grid).

    Calling it is calling ``denoiser``. Solvers that follow the EDM reference's ``net.round_sigma`` read
    ``sigma_grid`` with :func:`sigma_grid` and round their time grid (and EDM's churned sigma_hat) onto it,
    so c_in, c_out and c_noise all see the same on-grid sigma; the noise range they sample is clipped to the
    grid's positive entries, as the reference clips to ``net.sigma_min`` / ``net.sigma_max``.

    denoiser:   D(x (B, ...), sigma () or (B,), cond) -> x0_hat (B, ...).
    sigma_grid: (K,) float64 numpy, the discrete sigmas (any order; a 0 entry is allowed).
    """

    def __init__(self, denoiser: Denoiser, sigma_grid):
        if isinstance(denoiser, StatefulDenoiser) or not callable(denoiser):
            raise TypeError("GridDenoiser wraps a plain denoiser D(x, sigma, cond); declare the grid before making "
                            f"it stateful (got {type(denoiser)})")
        grid = np.asarray(sigma_grid, np.float64)
        if grid.ndim != 1 or grid.size == 0 or not np.all(np.isfinite(grid)) or np.any(grid < 0) or grid.max() <= 0:
            raise ValueError(f"sigma_grid must be a non-empty 1-D array of finite sigmas >= 0 with a positive "
                             f"entry, got shape {grid.shape}")
        self.denoiser = denoiser
        self.sigma_grid = grid

    def __call__(self, x: Array, sigma, cond=None) -> Array:
        return self.denoiser(x, sigma, cond)


def with_sigma_grid(denoiser: Denoiser, grid) -> Denoiser:
    """``denoiser`` declaring the discrete sigma grid (K,) (see :class:`GridDenoiser`); grid None: unchanged."""
    return denoiser if grid is None else GridDenoiser(denoiser, grid)


def sigma_grid(denoiser: AnyDenoiser):
    """The (K,) float64 sigma grid a denoiser declares (attribute ``sigma_grid``), or None for continuous ones."""
    grid = getattr(denoiser, "sigma_grid", None)
    return None if grid is None else np.asarray(grid, np.float64)
