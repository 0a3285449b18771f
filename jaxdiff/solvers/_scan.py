"""Machinery every sampler shares: grid checks, keys and per-step noise, the denoiser call, the scan.

A sampler is built in three host-side stages and one traced one:

1. the grid (float64 numpy) and every per-step coefficient are computed on the host, so Python branches
   on noise levels (gamma of EDM's churn, "is this the last step") never see traced values;
2. they become float32 arrays stacked along the step axis (:func:`to_steps`);
3. ``jax.lax.scan`` runs one step body over them, carrying ``(x, denoiser state, ...)``.

Randomness (DESIGN.md): step i draws ``normal(fold_in(key, i), x.shape)`` with one key, or, with a (B,)
array of per-sample keys, ``normal(fold_in(key_b, i), x.shape[1:])`` for each sample b, so a sample depends
on its own key alone, whatever batch it is in. Several draws in one step use distinct indices.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.denoiser import StatefulDenoiser, per_sample_sigma

INTERNAL_DTYPE = jnp.float32


def check_sigmas(sigmas, who: str) -> np.ndarray:
    """A user-given noise grid as float64 numpy: 1-D, >= 2 entries, finite, >= 0, strictly decreasing."""
    sig = np.asarray(sigmas, np.float64)
    if sig.ndim != 1 or sig.shape[0] < 2:
        raise ValueError(f"{who}: sigmas must be a 1-D grid with at least 2 entries (sigma_0 > ... > sigma_N, "
                         f"usually ending in 0), got shape {sig.shape}")
    if not np.all(np.isfinite(sig)) or np.any(sig < 0) or np.any(np.diff(sig) >= 0):
        raise ValueError(f"{who}: sigmas must be finite, non-negative and strictly decreasing, got {sig}")
    return sig


def to_steps(**arrays) -> dict[str, jax.Array]:
    """Host per-step arrays (N, ...) -> the scan's xs: float arrays as float32, bool/int kept."""
    out = {}
    for name, a in arrays.items():
        a = np.asarray(a)
        out[name] = jnp.asarray(a, INTERNAL_DTYPE) if np.issubdtype(a.dtype, np.floating) else jnp.asarray(a)
    return out


def _is_typed_key(key) -> bool:
    return jnp.issubdtype(key.dtype, jax.dtypes.prng_key)


def _per_sample(key) -> bool:
    """(B,) typed keys or (B, 2) raw uint32 keys are per-sample; () typed or (2,) raw is one key."""
    return key.ndim == (1 if _is_typed_key(key) else 2)


def check_key(key, batch: int, stochastic: bool, who: str):
    """Validate ``key`` for a sampler run on ``batch`` samples; returns it (or None when deterministic).

    stochastic: whether this setting draws noise; key=None is then an error.
    """
    if key is None:
        if stochastic:
            raise ValueError(f"{who}: this setting draws noise, so it needs key=jax.random.key(seed) "
                             f"or a (B,) array of per-sample keys; got key=None")
        return None
    if not isinstance(key, jax.Array):
        key = jnp.asarray(key)
    base = 0 if _is_typed_key(key) else 1
    if not _is_typed_key(key) and (key.dtype != jnp.uint32 or key.shape[-1:] != (2,)):
        raise ValueError(f"{who}: key must be a PRNG key (jax.random.key / PRNGKey) or a (B,) array of them, "
                         f"got dtype {key.dtype} shape {key.shape}")
    if key.ndim == base + 1 and key.shape[0] != batch:
        raise ValueError(f"{who}: per-sample keys must number B = {batch}, got {key.shape[0]}")
    if key.ndim not in (base, base + 1):
        raise ValueError(f"{who}: key must be one key or a (B,) array of keys, got shape {key.shape}")
    return key


def step_noise(key, index, x: jax.Array) -> jax.Array:
    """N(0, I) noise shaped like x (B, ...) for draw number ``index`` (traced int) of the run."""
    if _per_sample(key):
        # vmap over samples: each row is a function of its own key and the index only.
        return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, index), x.shape[1:], x.dtype))(key)
    return jax.random.normal(jax.random.fold_in(key, index), x.shape, x.dtype)


def denoise(sd: StatefulDenoiser, x: jax.Array, sigma, cond, state) -> tuple[jax.Array, Any]:
    """One denoiser evaluation threading its state: sigma (scalar) is handed over as a (B,) vector."""
    x0, state = sd.apply(x, per_sample_sigma(sigma, x), cond, state)
    return x0.astype(x.dtype), state


# Listeners told the index of every step as it starts: set only while jaxdiff.solvers.plan records which step
# each denoiser evaluation belongs to (checked at trace time, so an ordinary sampler traces no callback).
STEP_LISTENERS: list[Callable[[Any], None]] = []


def scan_steps(step: Callable, carry, xs: dict[str, jax.Array]):
    """Run ``carry = step(carry, xs_i)`` over the leading axis of xs with one ``lax.scan``; adds ``i``.
    The one definition of a solver step: :func:`jaxdiff.solvers.plan.evaluation_plan` reads steps from here."""
    n = next(iter(xs.values())).shape[0]
    xs = dict(xs, i=jnp.arange(n, dtype=jnp.int32))

    def body(c, s):
        for listener in STEP_LISTENERS:
            jax.debug.callback(listener, s['i'], ordered=True)
        return step(c, s), None

    carry, _ = jax.lax.scan(body, carry, xs)
    return carry


def per_sample_norm(a: jax.Array) -> jax.Array:
    """||a_b||_2 over all non-batch axes, shaped (B, 1, ..., 1) to broadcast against a."""
    return jnp.sqrt(jnp.sum(a * a, axis=tuple(range(1, a.ndim)), keepdims=True))
