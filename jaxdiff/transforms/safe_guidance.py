"""Safe classifier guidance: classifier guidance towards "not unsafe" with a noise-conditional classifier.

Conditioning the data on safety is Bayes' rule on the noisy marginals,

    grad_x log p_sigma(x | safe) = grad_x log p_sigma(x) + grad_x log P_sigma(safe | x),
    P_sigma(safe | x) = 1 - P_sigma(unsafe | x),

so with an exact noisy posterior and scale 1 the guided denoiser *is* the safe part's denoiser (for a mixture,
:func:`jaxdiff.transforms.exact_safe_denoiser`'s output). The usual negative guidance instead adds
``-grad log P_sigma(unsafe | x)``: the two agree only where P(unsafe | x) is near 1/2. In safe regions
(P(unsafe) -> 0) negative guidance still pushes with ``grad P / P``, which stays large, and so keeps moving
samples that were never unsafe (the skew of the safe modes it shows on the 2-D mixture), while the Bayes term
``-grad P / (1 - P)`` vanishes there; inside unsafe regions it is the other way round.
"""
from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from jaxdiff.transforms.classifier import classifier_guidance
from jaxdiff.transforms.base import Transform


def safe_log_prob(logits_fn: Callable[[jax.Array, jax.Array], jax.Array], unsafe_classes: Sequence[int],
                  num_classes: int) -> Callable:
    """log P_sigma(safe | x) = logsumexp of the safe classes' logits - logsumexp of all, (B,).

    logits_fn: (x (B, ...), sigma () or (B,)) -> (B, num_classes) logits of a noise-conditional classifier.
    unsafe_classes: the classes whose union is "unsafe"; every other class is safe.
    Returns log_prob_fn(x, sigma, cond) -> (B,) (cond is ignored: safety does not depend on the prompt here).
    Summing the safe logits in log space keeps the value exact where the unsafe mass is close to 1.
    """
    unsafe = sorted(set(int(k) for k in unsafe_classes))
    if not unsafe or unsafe[0] < 0 or unsafe[-1] >= num_classes or len(unsafe) == num_classes:
        raise ValueError(f'unsafe_classes must be a non-empty proper subset of 0..{num_classes - 1}, '
                         f'got {list(unsafe_classes)}')
    safe = jnp.ones((num_classes,), bool).at[jnp.asarray(unsafe)].set(False)

    def log_prob(x, sigma, cond=None):
        logits = logits_fn(x, sigma)
        return (jax.nn.logsumexp(jnp.where(safe, logits, -jnp.inf), axis=-1)
                - jax.nn.logsumexp(logits, axis=-1))

    return log_prob


def safe_classifier_guidance(logits_fn: Callable[[jax.Array, jax.Array], jax.Array], unsafe_classes: Sequence[int],
                             num_classes: int, scale: float = 1.0) -> Transform:
    """D + scale * sigma^2 * grad_x log P_sigma(safe | x): guidance away from the unsafe classes on x_t.

    logits_fn, unsafe_classes, num_classes: as :func:`safe_log_prob` (e.g.
    ``jaxdiff.sampling.model.noisy_classifier_logits(run_dir)``, whose ``.num_classes`` gives the count).
    scale: 1 is Bayes' rule (exact with an exact classifier); larger pushes further from the unsafe classes.
    Shapes: x (B, ...), sigma () or (B,), cond the inner denoiser's -> (B, ...). One denoiser call and one
    classifier gradient per evaluation.
    """
    return classifier_guidance(safe_log_prob(logits_fn, unsafe_classes, num_classes), scale)
