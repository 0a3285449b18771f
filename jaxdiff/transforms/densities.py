"""Harm densities p_h for unguidance: functions ``x0 (B, ...) -> (B,)`` with values in [0, 1].

A harm density scores a *clean* point (the denoiser's x0_hat), so it needs no noise-aware model. Each
sample's score must depend on that sample alone (no batch statistics): :mod:`jaxdiff.transforms.unguidance`
differentiates the batch sum of log p_h to get every sample's own gradient.

Multi-concept rule of the seed (safe sampling by unguidance, CLIP multi-concept pseudo-density): the density
whose gradient is followed is the mean over the M concepts, but the correction is applied as soon as *any*
single concept's score reaches eta (it favours sensitivity). Since "some concept >= eta" is the same as
"max over concepts >= eta", that gate is ``concept_density(..., reduce='max')`` passed as unguidance's
``gate`` next to ``concept_density(..., reduce='mean')`` as its density.
"""
from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from jaxdiff import toy

Density = Callable[[jax.Array], jax.Array]


def classifier_density(logits_fn: Callable[[jax.Array], jax.Array], unsafe_classes: Sequence[int]) -> Density:
    """p_h(x0) = softmax probability mass of the unsafe classes.

    logits_fn: x0 (B, ...) -> logits (B, C) of a classifier on clean inputs.
    unsafe_classes: indices in [0, C) of the classes counted as harmful.
    Returns a density x0 (B, ...) -> (B,).
    """
    idx = jnp.asarray(list(unsafe_classes), jnp.int32)
    if idx.ndim != 1 or idx.shape[0] == 0:
        raise ValueError(f"unsafe_classes must be a non-empty list of class indices, got {unsafe_classes}")

    def density(x0):
        # logsumexp over the unsafe logits minus over all keeps the mass exact when it is tiny.
        logits = logits_fn(x0)
        return jnp.exp(jax.nn.logsumexp(logits[:, idx], axis=-1) - jax.nn.logsumexp(logits, axis=-1))

    return density


def concept_scores(embed_fn: Callable[[jax.Array], jax.Array], concept_embeddings) -> Callable:
    """Cosine similarity of each sample's embedding to each concept embedding.

    embed_fn: x0 (B, ...) -> embeddings (B, E) (e.g. a CLIP image encoder).
    concept_embeddings: (M, E) (e.g. CLIP text embeddings of the concepts to avoid).
    Returns x0 (B, ...) -> (B, M) scores in [-1, 1].
    """
    c = jnp.asarray(concept_embeddings, jnp.float32)
    if c.ndim != 2:
        raise ValueError(f"concept_embeddings must be (M, E), got shape {c.shape}")
    c = c / jnp.linalg.norm(c, axis=-1, keepdims=True)

    def scores(x0):
        e = embed_fn(x0)
        e = e / jnp.linalg.norm(e, axis=-1, keepdims=True)
        return e @ c.T

    return scores


def concept_density(embed_fn: Callable[[jax.Array], jax.Array], concept_embeddings, reduce: str = "mean",
                    k: int | None = None) -> Density:
    """Concept pseudo-density: cosine similarity to the concepts, reduced over concepts.

    reduce: 'mean' (the seed's multi-concept density), 'max' (the any-concept gate; also top-1), or 'topk'
        (mean of the k largest scores per sample; k = M is 'mean', k = 1 is 'max'; which concepts are kept
        can change from step to step).
    The seed's cosine pseudo-density lies in (-1, 1) (it notes negative values are not seen in practice);
    it is clipped to [0, 1] here so log p_h is defined, and a clipped sample gets no gradient, which only
    matters below any sensible threshold eta > 0, where unguidance leaves the sample alone anyway.
    Returns x0 (B, ...) -> (B,).
    """
    scores = concept_scores(embed_fn, concept_embeddings)
    m = jnp.asarray(concept_embeddings).shape[0]
    if reduce == "topk":
        if k is None or not 1 <= k <= m:
            raise ValueError(f"reduce='topk' needs 1 <= k <= M = {m}, got k={k}")
    elif reduce not in ("mean", "max"):
        raise ValueError(f"reduce must be 'mean', 'max' or 'topk', got {reduce!r}")

    def density(x0):
        s = scores(x0)
        if reduce == "mean":
            r = jnp.mean(s, axis=-1)
        elif reduce == "max":
            r = jnp.max(s, axis=-1)
        else:
            r = jnp.mean(jax.lax.top_k(s, k)[0], axis=-1)
        return jnp.clip(r, 0.0, 1.0)

    return density


def unsafe_mask(gm: toy.GaussianMixture, unsafe_components: Sequence[int]) -> jax.Array:
    """(K,) float mask, 1 on the listed unsafe components of the mixture."""
    k = gm.weights.shape[0]
    idx = list(unsafe_components)
    if not idx or min(idx) < 0 or max(idx) >= k:
        raise ValueError(f"unsafe_components must be a non-empty list of indices in [0, {k}), got {idx}")
    return jnp.zeros((k,)).at[jnp.asarray(idx)].set(1.0)


def mixture_density(gm: toy.GaussianMixture, unsafe_components: Sequence[int], smoothing: float = 0.0) -> Density:
    """Oracle harm density for a Gaussian mixture: posterior mass of the unsafe components.

    p_h(x0) = sum_{k unsafe} p(k | x0) under the mixture blurred by ``smoothing`` (a noise level; 0 = the
    clean mixture, the exact "probability that x0 came from an unsafe component"). The clean posterior is
    nearly 0/1 away from the boundaries between modes, so its log has almost no slope inside a mode;
    smoothing > 0 softens it (the blurred mixture's posterior), which gives the gradient reach.
    Returns x0 (B, *event) -> (B,).
    """
    mask = unsafe_mask(gm, unsafe_components)
    return lambda x0: toy.posterior(gm, x0, smoothing) @ mask
