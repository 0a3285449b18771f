"""Classifier guidance (Dhariwal & Nichol 2021; Song et al. 2021) as a denoiser transform.

Bayes' rule on the noisy marginals, p_sigma(x | y) = p_sigma(y | x) p_sigma(x) / p(y), gives the scores

    grad_x log p_sigma(x | y) = grad_x log p_sigma(x) + grad_x log p_sigma(y | x).

Tweedie's formula ties the score to the denoiser, score = (D - x) / sigma^2, i.e. D = x + sigma^2 score, so
adding the classifier term to the score is adding sigma^2 times it to the denoiser:

    D_guided(x, sigma, y) = D(x, sigma, y) + scale * sigma^2 * grad_x log p_sigma(y | x).

With the exact noisy posterior p_sigma(y | x), an unconditional D and scale = 1 this is exactly the
conditional denoiser E[x0 | x, y]; scale > 1 pushes samples further towards where the classifier is
confident (the score of p_sigma(x) p_sigma(y | x)^scale, which is not the noised version of any one
distribution, hence "sharpened" rather than an exact target).

:func:`class_log_prob` turns a noise-conditional classifier's logits into log p_sigma(y | x);
:func:`jaxdiff.sampling.model.noisy_classifier_logits` loads one trained by ``train.py`` with
``task='noisy_classifier'`` (e.g. configs/classifier/digits_noisy.py).
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from jaxdiff.denoiser import expand_sigma
from jaxdiff.transforms.base import Transform, stateless

LogProbFn = Callable[[jax.Array, jax.Array, Any], jax.Array]


def classifier_guidance(log_prob_fn: LogProbFn, scale: float) -> Transform:
    """Add ``scale * sigma^2 * grad_x log p_sigma(y | x)`` to the denoiser (module docstring's derivation).

    log_prob_fn: (x (B, ...), sigma (B,) or (), cond) -> (B,) log p_sigma(y | x) of the class the condition
        names, e.g. a noise-conditional classifier's log-softmax picked at the label in cond. Each sample's
        log-probability must depend on its own row of x only (true for per-sample classifiers), so the
        gradient of the batch sum is the per-sample gradient.
    scale: guidance strength gamma (1 = Bayes' rule with an exact classifier).
    The inner denoiser is called with the same cond: wrap an unconditional model to ignore it, or chain
    after ``cfg`` (``chain(cfg(w), classifier_guidance(f, s))``) to add the classifier term to CFG's output.
    Shapes: x (B, ...), sigma () or (B,); returns (B, ...). One denoiser and one classifier gradient per call.
    """

    def combine(call, x, sigma, cond):
        grad = jax.grad(lambda z: jnp.sum(log_prob_fn(z, sigma, cond)))(x)
        return call(x, sigma, cond) + scale * expand_sigma(sigma, x) ** 2 * grad

    return stateless(combine)


LogitsFn = Callable[[jax.Array, jax.Array], jax.Array]


def class_log_prob(logits_fn: LogitsFn, num_classes: int) -> LogProbFn:
    """log_prob_fn(x (B,H,W,C), sigma () or (B,), cond (B, num_classes) one-hot) -> (B,) for
    :func:`classifier_guidance`, from a noise-conditional classifier's logits_fn(x, sigma) -> (B, num_classes).

    cond rows weight the classes' log-probabilities (sum_k cond_k log p(k | x)): a one-hot row picks its class, an
    all-zero row (the unconditional label) gives 0 and so no guidance.
    """

    def log_prob(x, sigma, cond):
        if cond is None or cond.shape != (x.shape[0], num_classes):
            got = None if cond is None else cond.shape
            raise ValueError(f'classifier guidance needs cond of shape ({x.shape[0]}, {num_classes}) '
                             f'(one-hot target classes), got {got}')
        return jnp.sum(cond * jax.nn.log_softmax(logits_fn(x, sigma), axis=-1), axis=-1)

    return log_prob
