"""Improved precision and recall (Kynkäänniemi et al. 2019) between real and generated feature sets.

Each set's manifold is the union of hyperspheres centred on its points, each with the distance to that point's
k-th nearest neighbour in the same set (the point itself not counted) as radius. Precision is the fraction of
generated points inside the real manifold; recall is the fraction of real points inside the generated one.

As in the authors' reference implementation: squared Euclidean distances (||u||^2 - 2 u.v + ||v||^2, clamped
at 0) are compared with squared radii, a point on a sphere's surface counts as inside (``<=``), the radius is
read as entry k of the sorted distances of a point to its own set (entry 0 being the point itself, so an exact
duplicate counts as a neighbour), and the arithmetic is float32. Distances are computed ``batch_size`` rows at a
time against the whole other set, so memory is O(batch_size x N) and 50k x 50k sets fit.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def _squared_distances(rows: jax.Array, centres: jax.Array) -> jax.Array:
    """Squared Euclidean distances (b, N) between rows (b, D) and centres (N, D)."""
    rows_sq = jnp.sum(rows * rows, axis=1)[:, None]
    centres_sq = jnp.sum(centres * centres, axis=1)[None, :]
    # The expansion can dip below 0 by round-off for (near-)coincident points.
    return jnp.maximum(rows_sq - 2 * rows @ centres.T + centres_sq, 0)


@functools.partial(jax.jit, static_argnames='k')
def _kth_neighbour(rows: jax.Array, points: jax.Array, k: int) -> jax.Array:
    """Squared distance (b,) from each row (b, D) of ``points`` to its k-th nearest point of ``points`` (N, D)."""
    smallest = -jax.lax.top_k(-_squared_distances(rows, points), k + 1)[0]
    return smallest[:, k]


@jax.jit
def _inside_any(rows: jax.Array, centres: jax.Array, radii_sq: jax.Array) -> jax.Array:
    """Whether each row (b, D) lies in at least one sphere of ``centres`` (N, D) with squared radii (N,): (b,)."""
    return jnp.any(_squared_distances(rows, centres) <= radii_sq[None, :], axis=1)


def _map_rows(fn, rows: jax.Array, batch_size: int) -> np.ndarray:
    """fn applied to ``rows`` (N, D) in batches of ``batch_size`` -> (N,) numpy.

    The last batch is zero-padded to full size so ``fn`` compiles once; the padded results are dropped.
    """
    n = rows.shape[0]
    batch_size = min(batch_size, n)
    out = []
    for start in range(0, n, batch_size):
        batch = rows[start:start + batch_size]
        valid = batch.shape[0]
        if valid < batch_size:
            batch = jnp.pad(batch, ((0, batch_size - valid), (0, 0)))
        out.append(np.asarray(fn(batch))[:valid])
    return np.concatenate(out)


def _check_features(x, what: str, k: int) -> jax.Array:
    """x as float32 (N, D) with N > k; ValueError naming ``what`` otherwise."""
    x = jnp.asarray(x, jnp.float32)
    if x.ndim != 2:
        raise ValueError(f'{what}: features must have shape (N, D), got {x.shape}')
    if x.shape[0] <= k:
        raise ValueError(f'{what}: {x.shape[0]} points, but k={k} needs more than k')
    return x


def manifold_radii(features, k: int = 3, batch_size: int = 1000) -> np.ndarray:
    """Squared k-NN radii (N,) float32 of features (N, D): squared distance to the k-th nearest other point."""
    x = _check_features(features, 'manifold_radii', k)
    return _map_rows(functools.partial(_kth_neighbour, points=x, k=k), x, batch_size)


def precision_recall(real, fake, k: int = 3, batch_size: int = 1000) -> tuple[float, float]:
    """(precision, recall) of generated features fake (M, D) against real features real (N, D).

    precision = fraction of fake points within some real point's k-NN sphere; recall = fraction of real points
    within some fake point's k-NN sphere. ``batch_size`` rows are compared against a whole set at a time.
    """
    real = _check_features(real, 'precision_recall (real)', k)
    fake = _check_features(fake, 'precision_recall (fake)', k)
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f'precision_recall: feature dimensions differ (real {real.shape[1]}, fake {fake.shape[1]})')
    if batch_size < 1:
        raise ValueError(f'precision_recall: batch_size must be >= 1, got {batch_size}')
    real_radii = jnp.asarray(manifold_radii(real, k, batch_size))
    fake_radii = jnp.asarray(manifold_radii(fake, k, batch_size))
    precision = _map_rows(functools.partial(_inside_any, centres=real, radii_sq=real_radii), fake, batch_size)
    recall = _map_rows(functools.partial(_inside_any, centres=fake, radii_sq=fake_radii), real, batch_size)
    return float(precision.mean()), float(recall.mean())
