"""Sliced Wasserstein-2 distance between two sample sets: a cheap, exact-in-1-D sample distance."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def sliced_wasserstein(a: jax.Array, b: jax.Array, key: jax.Array, num_projections: int = 256) -> jax.Array:
    """SW_2 between empirical distributions a (N, ...) and b (N, ...) with the same N; returns a scalar.

    Projects both sets on ``num_projections`` random unit directions, sorts, and averages the squared
    differences of the order statistics (the exact 1-D W_2^2), then takes the square root.
    """
    a = jnp.reshape(a, (a.shape[0], -1)).astype(jnp.float32)
    b = jnp.reshape(b, (b.shape[0], -1)).astype(jnp.float32)
    if a.shape != b.shape:
        raise ValueError(f"sliced_wasserstein needs equal sample counts and dims, got {a.shape} and {b.shape}")
    dirs = jax.random.normal(key, (a.shape[1], num_projections))
    dirs = dirs / jnp.linalg.norm(dirs, axis=0, keepdims=True)
    pa = jnp.sort(a @ dirs, axis=0)
    pb = jnp.sort(b @ dirs, axis=0)
    return jnp.sqrt(jnp.mean((pa - pb) ** 2))
