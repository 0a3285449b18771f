"""Gaussian mixtures with exact denoisers: the test oracle for every solver and transform.

For x = x0 + sigma * n with x0 ~ sum_k w_k N(mu_k, diag(s_k^2)), the noisy marginal is the mixture
sum_k w_k N(mu_k, diag(s_k^2 + sigma^2)), and the exact denoiser is

    E[x0 | x] = sum_k p(k | x) * (mu_k + s_k^2 / (s_k^2 + sigma^2) * (x - mu_k)).

Samples can be any event shape (2-D points or (H, W, C) images). A mixture is optionally
class-conditional: each component carries an integer label, and ``cond`` (B, num_classes) weights the
components by their class (a one-hot row selects one class; an all-zero row means unconditional,
matching the networks' label-dropout convention).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.denoiser import per_sample_sigma


class GaussianMixture(NamedTuple):
    """A diagonal Gaussian mixture.

    means:   (K, *event) component means.
    stds:    (K, *event) per-dimension standard deviations (isotropic: the same value everywhere).
    weights: (K,) mixing weights, summing to 1.
    labels:  (K,) int32 class of each component (all 0 when unconditional).
    num_classes: number of classes the labels index.
    """

    means: jax.Array
    stds: jax.Array
    weights: jax.Array
    labels: jax.Array
    num_classes: int

    @property
    def event_shape(self) -> tuple[int, ...]:
        return tuple(self.means.shape[1:])


def mixture(means, stds, weights=None, labels=None, num_classes: Optional[int] = None) -> GaussianMixture:
    """Build a mixture; means (K, *event); stds scalar, (K,) (isotropic) or (K, *event) (diagonal).

    weights default to uniform; labels default to all-zero (one class). Weights are renormalised.
    """
    means = jnp.asarray(means, jnp.float32)
    k = means.shape[0]
    stds = jnp.asarray(stds, jnp.float32)
    if stds.ndim <= 1:
        stds = jnp.broadcast_to(stds.reshape((-1,) + (1,) * (means.ndim - 1)), means.shape)
    if stds.shape != means.shape:
        raise ValueError(f"stds must be scalar, (K,) or (K, *event) = {means.shape}; got {stds.shape}")
    weights = jnp.full((k,), 1.0 / k) if weights is None else jnp.asarray(weights, jnp.float32)
    if weights.shape != (k,) or bool(jnp.any(weights < 0)):
        raise ValueError(f"weights must be non-negative with shape ({k},), got {weights}")
    labels = jnp.zeros((k,), jnp.int32) if labels is None else jnp.asarray(labels, jnp.int32)
    num_classes = int(labels.max()) + 1 if num_classes is None else int(num_classes)
    return GaussianMixture(means, stds, weights / weights.sum(), labels, num_classes)


def ring_mixture(num_modes: int = 8, radius: float = 4.0, std: float = 0.3, weights=None,
                 labels=None, num_classes: Optional[int] = None) -> GaussianMixture:
    """2-D mixture of ``num_modes`` isotropic Gaussians evenly spaced on a circle (mode k at angle 2 pi k / K)."""
    ang = 2 * math.pi * np.arange(num_modes) / num_modes
    means = radius * np.stack([np.cos(ang), np.sin(ang)], axis=1)
    return mixture(means, std, weights, labels, num_classes)


def component_weights(gm: GaussianMixture, cond, batch: int) -> jax.Array:
    """(B, K) prior component weights under cond: None or zero rows -> the mixture's weights; else
    w_k * cond[b, label_k], renormalised."""
    w = jnp.broadcast_to(gm.weights, (batch, gm.weights.shape[0]))
    if cond is None:
        return w
    cond = jnp.asarray(cond, jnp.float32)
    if cond.shape != (batch, gm.num_classes):
        raise ValueError(f"cond must be (B, num_classes) = {(batch, gm.num_classes)}, got {cond.shape}")
    sel = cond[:, gm.labels]
    unconditional = jnp.sum(cond, axis=1, keepdims=True) == 0
    w = jnp.where(unconditional, w, w * sel)
    return w / jnp.sum(w, axis=1, keepdims=True)


def _component_log_lik(gm: GaussianMixture, x: jax.Array, sigma: jax.Array):
    """Per-component log N(x; mu_k, s_k^2 + sigma^2) (B, K) and the variances (B, K, D)."""
    b = x.shape[0]
    xf = x.reshape(b, 1, -1)
    mu = gm.means.reshape(1, gm.means.shape[0], -1)
    var = gm.stds.reshape(1, gm.stds.shape[0], -1) ** 2 + sigma.reshape(b, 1, 1) ** 2
    ll = -0.5 * jnp.sum((xf - mu) ** 2 / var + jnp.log(2 * math.pi * var), axis=-1)
    return ll, var, xf, mu


def posterior_logits(gm: GaussianMixture, x: jax.Array, sigma, cond=None) -> jax.Array:
    """log p(k | x, cond) up to a per-sample constant (the components' log joint), (B, K).

    The exact noise-conditional classifier over components: finite where the posterior itself underflows.
    """
    x = jnp.asarray(x, jnp.float32)
    ll, *_ = _component_log_lik(gm, x, per_sample_sigma(sigma, x))
    return ll + jnp.log(component_weights(gm, cond, x.shape[0]))


def posterior(gm: GaussianMixture, x: jax.Array, sigma, cond=None) -> jax.Array:
    """p(k | x, cond) for x = x0 + sigma n: (B, K)."""
    return jax.nn.softmax(posterior_logits(gm, x, sigma, cond), axis=-1)


def log_prob(gm: GaussianMixture, x: jax.Array, sigma=0.0, cond=None) -> jax.Array:
    """log p_sigma(x | cond) of the noised mixture, (B,)."""
    x = jnp.asarray(x, jnp.float32)
    ll, *_ = _component_log_lik(gm, x, per_sample_sigma(sigma, x))
    return jax.nn.logsumexp(ll + jnp.log(component_weights(gm, cond, x.shape[0])), axis=-1)


def denoise(gm: GaussianMixture, x: jax.Array, sigma, cond=None) -> jax.Array:
    """Exact E[x0 | x, cond]: x (B, *event), sigma () or (B,), cond (B, num_classes) or None -> (B, *event)."""
    x = jnp.asarray(x, jnp.float32)
    if x.shape[1:] != gm.event_shape:
        raise ValueError(f"x must be (B, {gm.event_shape}), got {x.shape}")
    ll, var, xf, mu = _component_log_lik(gm, x, per_sample_sigma(sigma, x))
    post = jax.nn.softmax(ll + jnp.log(component_weights(gm, cond, x.shape[0])), axis=-1)
    s2 = gm.stds.reshape(1, gm.stds.shape[0], -1) ** 2
    cond_mean = mu + s2 / var * (xf - mu)
    return jnp.einsum("bk,bkd->bd", post, cond_mean).reshape(x.shape)


def denoiser(gm: GaussianMixture):
    """The exact denoiser D(x, sigma, cond) -> x0_hat of :func:`denoise` as a closure."""
    return lambda x, sigma, cond=None: denoise(gm, x, sigma, cond)


def sample(gm: GaussianMixture, key: jax.Array, n: int, cond=None) -> tuple[jax.Array, jax.Array]:
    """Draw n exact samples: returns (x0 (n, *event), labels (n,) int32 of the drawn components' classes)."""
    kc, kn = jax.random.split(key)
    logits = jnp.log(component_weights(gm, cond, n))
    comp = jax.random.categorical(kc, logits, axis=-1)
    noise = jax.random.normal(kn, (n,) + gm.event_shape)
    return gm.means[comp] + gm.stds[comp] * noise, gm.labels[comp]


def mode_shares(gm: GaussianMixture, x: jax.Array) -> jax.Array:
    """(K,) fraction of samples x (N, *event) assigned to each component by the clean posterior (sigma=0)."""
    post = posterior(gm, x, 0.0)
    return jnp.bincount(jnp.argmax(post, axis=-1), length=gm.weights.shape[0]) / x.shape[0]
