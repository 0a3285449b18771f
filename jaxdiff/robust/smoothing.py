"""Randomized smoothing (Cohen, Rosenfeld & Kolter 2019) with a diffusion denoiser as the base classifier
(Carlini et al. 2023, "(Certified!!) adversarial robustness for free!").

The smoothed classifier is g(x) = argmax_c P(f(x + delta) = c), delta ~ N(0, sigma^2 I), for images x in [0, 1]
and pixel-space noise sigma. If the top class has probability pA >= 1/2, g is constant within the L2 ball of
radius sigma * Phi^-1(pA) around x. P is estimated by Monte Carlo, so predictions and radii hold with
probability 1 - alpha (reference: locuslab/smoothing ``code/core.py``).

Base classifiers here are ``base(x (B, H, W, C) in [0, 1], keys (B,)) -> logits (B, K)``: the noise is drawn
*inside* the base from one key per sample, so a smoothing sample is a function of its key alone.

- :func:`gaussian_classifier`: Cohen's base, logits_fn(x + sigma n).
- :func:`denoised_classifier`: Carlini's base, logits_fn(one-shot-denoise(x + sigma n)).

Denoised smoothing in EDM terms. Carlini et al. pick the DDPM step t with sqrt(1 - abar_t)/sqrt(abar_t) >= 2 sigma
(the model's data live in [-1, 1], where the pixel noise sigma becomes 2 sigma) and build
x_t = sqrt(abar_t) ((2x - 1) + 2 sigma eps). Dividing out sqrt(abar_t) gives EDM's unscaled x' = (2x - 1) + 2 sigma n
at noise level exactly 2 sigma, so the one-shot denoise is D(x', 2 sigma), with no search over a discrete grid.
(The reference's discrete t gives a noise level slightly above 2 sigma; the continuous form is exact.)
As in the reference (``clip_denoised=True``) the estimate is clipped to the data range.

Certification follows Cohen et al.: n0 samples select the class, n *separate* samples estimate pA's
Clopper-Pearson lower bound at level alpha; abstain (:data:`ABSTAIN`, radius 0) when it is below 1/2.
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

ABSTAIN = -1

# base(x (B, ...) in [0, 1], keys (B,)) -> logits (B, K); the smoothing noise is drawn inside from the keys.
BaseClassifier = Callable[[jax.Array, jax.Array], jax.Array]


# --- noise --------------------------------------------------------------------------------------------------

def is_per_sample_key(key) -> bool:
    """(B,) typed keys or (B, 2) raw uint32 keys are per-sample; a () typed or (2,) raw key is one key."""
    key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
    return key.ndim == (1 if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else 2)


def normal_like(key, x: jax.Array) -> jax.Array:
    """N(0, I) noise shaped like x (B, ...).

    One key: ``jax.random.normal(key, x.shape)``. (B,) per-sample keys: row b is
    ``jax.random.normal(key[b], x.shape[1:])``, so it depends on its own key only, not on the batch.
    """
    if is_per_sample_key(key):
        return jax.vmap(lambda k: jax.random.normal(k, x.shape[1:], x.dtype))(key)
    return jax.random.normal(key, x.shape, x.dtype)


# --- base classifiers ---------------------------------------------------------------------------------------

def one_shot_denoise(denoiser, x01: jax.Array, sigma: float, key, cond=None) -> jax.Array:
    """Carlini et al.'s one-shot denoising in EDM form (module docstring).

    x01: (B, H, W, C) images in [0, 1]; sigma: pixel-space noise std (in [0, 1] units); key: one key or (B,)
    per-sample keys (:func:`normal_like`); cond: the denoiser's conditioning or None.
    x' = (2 x01 - 1) + 2 sigma n;  returns clip((D(x', 2 sigma) + 1) / 2, 0, 1), (B, H, W, C).
    """
    x = 2.0 * jnp.asarray(x01) - 1.0
    # [0, 1] -> [-1, 1] doubles every length, the noise std included.
    noisy = x + 2.0 * sigma * normal_like(key, x)
    x0 = denoiser(noisy, jnp.full(x.shape[:1], 2.0 * sigma, x.dtype), cond)
    return jnp.clip((x0 + 1.0) / 2.0, 0.0, 1.0)


def denoised_classifier(denoiser, logits_fn: Callable[[jax.Array], jax.Array], sigma: float,
                        cond=None) -> BaseClassifier:
    """The base f of denoised smoothing: ``base(x, keys) = logits_fn(one_shot_denoise(x, sigma, keys))``.

    logits_fn: x (B, H, W, C) in [0, 1] -> (B, K), an off-the-shelf classifier of clean images.
    Returns base(x (B, H, W, C) in [0, 1], keys (B,)) -> (B, K).
    """
    def base(x, keys):
        return logits_fn(one_shot_denoise(denoiser, x, sigma, keys, cond))
    return base


def gaussian_classifier(logits_fn: Callable[[jax.Array], jax.Array], sigma: float) -> BaseClassifier:
    """Cohen et al.'s base: ``base(x, keys) = logits_fn(x + sigma n)`` (no clipping, as in the reference).

    For a classifier trained with Gaussian noise augmentation; shapes as :func:`denoised_classifier`.
    """
    def base(x, keys):
        return logits_fn(x + sigma * normal_like(keys, x))
    return base


# --- Monte Carlo counts -------------------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("base", "batch"))
def _batch_counts(base: BaseClassifier, x: jax.Array, key, start, num, *, batch: int) -> jax.Array:
    """Class counts (K,) of base on samples start .. start + batch - 1 of x, those with index >= num masked.

    Sample i uses fold_in(key, i): counts do not depend on the batch size. The batch has a fixed size (the last
    one is masked rather than shortened) so every call reuses one compilation.
    """
    idx = start + jnp.arange(batch)
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(idx)
    logits = base(jnp.broadcast_to(x, (batch,) + x.shape), keys)
    pred = jnp.argmax(logits, axis=-1)
    return jnp.zeros(logits.shape[-1], jnp.int32).at[pred].add((idx < num).astype(jnp.int32))


def sample_counts(base: BaseClassifier, x: jax.Array, num: int, batch: int, key) -> np.ndarray:
    """Cohen's ``_sample_noise``: how often base(x + noise) predicts each class over ``num`` draws.

    base: see :data:`BaseClassifier` (jitted once per base object and batch size; pass the same object again to
    reuse the compilation). x: one image (H, W, C) in [0, 1]. key: one key; draw i uses fold_in(key, i).
    Returns (K,) int64 counts summing to num.
    """
    if num < 1 or batch < 1:
        raise ValueError(f"sample_counts: num and batch must be >= 1, got num={num}, batch={batch}")
    x = jnp.asarray(x)
    total = None
    for start in range(0, num, batch):
        c = _batch_counts(base, x, key, start, num, batch=batch)
        total = c if total is None else total + c
    return np.asarray(total, np.int64)


# --- statistics ---------------------------------------------------------------------------------------------

def lower_confidence_bound(k: int, n: int, alpha: float) -> float:
    """One-sided (1 - alpha) Clopper-Pearson lower bound on a binomial proportion from k successes in n.

    The alpha-quantile of Beta(k, n - k + 1), i.e. statsmodels' proportion_confint(k, n, alpha=2 alpha,
    method='beta')[0] as in the reference; 0 when k = 0.
    """
    if not 0 <= k <= n:
        raise ValueError(f"lower_confidence_bound: need 0 <= k <= n, got k={k}, n={n}")
    if k == 0:
        return 0.0
    return float(stats.beta.ppf(alpha, k, n - k + 1))


def predict_from_counts(counts, alpha: float) -> int:
    """Cohen's PREDICT decision: the top class if a two-sided binomial test (p = 1/2) of the top two counts
    rejects at level alpha, else :data:`ABSTAIN`. counts: (K,) ints, K >= 2.

    Ties are broken towards the lower class index (the reference's unstable argsort leaves them arbitrary; a tie
    never passes the test anyway).
    """
    counts = np.asarray(counts)
    top2 = np.argsort(-counts, kind="stable")[:2]
    c1, c2 = int(counts[top2[0]]), int(counts[top2[1]])
    if stats.binomtest(c1, c1 + c2, p=0.5).pvalue > alpha:
        return ABSTAIN
    return int(top2[0])


def certify_from_counts(counts_selection, counts_estimation, sigma: float, alpha: float) -> tuple[int, float]:
    """Cohen's CERTIFY decision from the two sets of counts (K,) each.

    cA = argmax of the selection counts; pA = :func:`lower_confidence_bound` of cA's estimation count;
    returns (ABSTAIN, 0.0) if pA < 1/2, else (cA, sigma * Phi^-1(pA)).
    """
    c_a = int(np.argmax(np.asarray(counts_selection)))
    n = int(np.sum(counts_estimation))
    p_a = lower_confidence_bound(int(np.asarray(counts_estimation)[c_a]), n, alpha)
    if p_a < 0.5:
        return ABSTAIN, 0.0
    return c_a, float(sigma * stats.norm.ppf(p_a))


# --- Monte Carlo algorithms ---------------------------------------------------------------------------------

def predict(base: BaseClassifier, x: jax.Array, key, *, n: int = 100_000, alpha: float = 0.001,
            batch: int = 1000) -> int:
    """Cohen et al.'s PREDICT for one image x (H, W, C): the smoothed class or ABSTAIN; wrong with
    probability at most alpha. n draws (:func:`sample_counts`), then :func:`predict_from_counts`."""
    return predict_from_counts(sample_counts(base, x, n, batch, key), alpha)


def certify(base: BaseClassifier, x: jax.Array, key, *, sigma: float, n0: int = 100, n: int = 100_000,
            alpha: float = 0.001, batch: int = 1000) -> tuple[int, float]:
    """Cohen et al.'s CERTIFY for one image x (H, W, C) in [0, 1].

    sigma: the smoothing noise std that ``base`` draws (it sets the radius). The selection and estimation
    draws use the two halves of ``jax.random.split(key)`` so they are independent, as the test requires.
    Returns (class or ABSTAIN, L2 radius; 0.0 on abstention). Defaults: n0 = 100, n = 100,000, alpha = 0.001.
    """
    k_sel, k_est = jax.random.split(key)
    counts_sel = sample_counts(base, x, n0, batch, k_sel)
    counts_est = sample_counts(base, x, n, batch, k_est)
    return certify_from_counts(counts_sel, counts_est, sigma, alpha)


def predict_batch(base: BaseClassifier, xs: jax.Array, key, **kwargs) -> np.ndarray:
    """:func:`predict` on each image of xs (B, H, W, C) with key fold_in(key, i); returns (B,) int64."""
    return np.array([predict(base, xs[i], jax.random.fold_in(key, i), **kwargs) for i in range(xs.shape[0])],
                    np.int64)


def certify_batch(base: BaseClassifier, xs: jax.Array, key, **kwargs) -> tuple[np.ndarray, np.ndarray]:
    """:func:`certify` on each image of xs (B, H, W, C), one at a time as the reference does, with key
    fold_in(key, i). Returns (classes (B,) int64 with ABSTAIN = -1, radii (B,) float64)."""
    out = [certify(base, xs[i], jax.random.fold_in(key, i), **kwargs) for i in range(xs.shape[0])]
    return np.array([c for c, _ in out], np.int64), np.array([r for _, r in out], np.float64)


def certified_accuracy(radii, correct, thresholds) -> np.ndarray:
    """Certified accuracy at each radius threshold: the fraction of examples that are correct *and* certified
    at radius >= r (Cohen et al.'s ``analyze.py``). radii, correct: (N,); thresholds: (R,) -> (R,) float64.

    Abstentions count as incorrect (their class is ABSTAIN), whatever their radius.
    """
    radii = np.asarray(radii, np.float64)
    correct = np.asarray(correct, bool)
    if radii.shape != correct.shape or radii.ndim != 1:
        raise ValueError(f"certified_accuracy: radii and correct must be (N,) alike, got {radii.shape} and "
                         f"{correct.shape}")
    thresholds = np.atleast_1d(np.asarray(thresholds, np.float64))
    return np.mean(correct[None, :] & (radii[None, :] >= thresholds[:, None]), axis=1)
