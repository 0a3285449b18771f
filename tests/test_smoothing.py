"""Randomized smoothing (jaxdiff.robust.smoothing) against independent truth: the Clopper-Pearson bound as the root
of the binomial tail, binomial test p-values summed by hand, certification on a base classifier whose counts are
exactly binomial with known p, one-shot denoising against the Gaussian posterior mean in closed form, and
certified accuracy on a hand-made table."""
import math

import numpy as np
import pytest
from scipy import optimize, stats

import jax
import jax.numpy as jnp

from jaxdiff import toy
from jaxdiff.robust import smoothing as sm

SHAPE = (4, 4, 1)


# --- bases with known class probabilities ---------------------------------------------------------------------

def threshold_base(probs):
    """A base classifier whose class is a deterministic function of one N(0, 1) draw per key: class c when
    Phi^-1(P_<c) <= z < Phi^-1(P_<=c), so each sample is class c with probability exactly probs[c]."""
    cuts = jnp.asarray(stats.norm.ppf(np.cumsum(probs)[:-1]), jnp.float32)
    k = len(probs)

    def base(x, keys):
        z = jax.vmap(lambda key: jax.random.normal(key, ()))(keys)
        cls = jnp.sum(z[:, None] >= cuts[None, :], axis=1)
        return jax.nn.one_hot(cls, k)  # x is ignored: the class depends on the noise only
    return base


def clopper_pearson_root(k, n, alpha):
    """The p with P(Bin(n, p) >= k) = alpha: the one-sided lower bound, found by root finding."""
    return optimize.brentq(lambda p: stats.binom.sf(k - 1, n, p) - alpha, 1e-12, 1 - 1e-12, xtol=1e-14)


def two_sided_binom_p(c1, n):
    """Exact two-sided p-value of c1 successes out of n under p = 1/2 (symmetric, so twice the upper tail)."""
    hi = max(c1, n - c1)
    return min(1.0, 2 * sum(math.comb(n, j) for j in range(hi, n + 1)) / 2 ** n)


# --- statistics ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('k,n,alpha', [(1, 10, 0.05), (7, 10, 0.001), (523, 1000, 0.001), (99_000, 100_000, 0.001),
                                       (3, 100, 0.2)])
def test_lower_confidence_bound_is_the_binomial_tail_root(k, n, alpha):
    assert sm.lower_confidence_bound(k, n, alpha) == pytest.approx(clopper_pearson_root(k, n, alpha), rel=1e-7)


def test_lower_confidence_bound_edges():
    assert sm.lower_confidence_bound(0, 50, 0.001) == 0.0
    # All successes: P(Bin(n, p) >= n) = p^n = alpha.
    assert sm.lower_confidence_bound(100, 100, 0.001) == pytest.approx(0.001 ** (1 / 100), rel=1e-10)
    with pytest.raises(ValueError, match='0 <= k <= n'):
        sm.lower_confidence_bound(11, 10, 0.01)


@pytest.mark.parametrize('counts,alpha', [([60, 40, 0], 0.001), ([60, 40, 0], 0.1), ([0, 100, 3], 0.001),
                                          ([50, 50], 0.5), ([30, 5, 36], 0.2)])
def test_predict_from_counts_matches_hand_binomial_test(counts, alpha):
    order = np.argsort(-np.asarray(counts), kind='stable')
    c1, c2 = counts[order[0]], counts[order[1]]
    want = int(order[0]) if two_sided_binom_p(c1, c1 + c2) <= alpha else sm.ABSTAIN
    assert sm.predict_from_counts(counts, alpha) == want


def test_certify_from_counts_by_hand():
    # Selection picks class 2; its estimation count is 950 / 1000.
    c, r = sm.certify_from_counts([1, 3, 96], [20, 30, 950], sigma=0.5, alpha=0.001)
    assert c == 2
    assert r == pytest.approx(0.5 * stats.norm.ppf(clopper_pearson_root(950, 1000, 0.001)), rel=1e-6)
    # The selected class is not re-chosen from the estimation counts: a bad selection abstains.
    assert sm.certify_from_counts([90, 0, 10], [20, 30, 950], sigma=0.5, alpha=0.001) == (sm.ABSTAIN, 0.0)


# --- Monte Carlo on the threshold base -------------------------------------------------------------------------

X = jnp.full(SHAPE, 0.5)


def test_sample_counts_are_binomial_and_batch_independent():
    probs = [0.7, 0.2, 0.1]
    base = threshold_base(probs)
    n = 20_000
    counts = sm.sample_counts(base, X, n, 4096, jax.random.key(0))
    assert counts.shape == (3,) and counts.dtype == np.int64 and counts.sum() == n
    sd = np.sqrt(n * np.asarray(probs) * (1 - np.asarray(probs)))
    assert np.all(np.abs(counts - n * np.asarray(probs)) < 5 * sd)
    # Draw i uses fold_in(key, i): the batch size (and the masked tail) does not change the counts.
    np.testing.assert_array_equal(sm.sample_counts(base, X, n, 3000, jax.random.key(0)), counts)


@pytest.mark.parametrize('probs,abstains', [([0.9, 0.06, 0.04], False), ([0.15, 0.85], False),
                                            ([0.5, 0.3, 0.2], True)])
def test_certify_radius_from_observed_counts(probs, abstains):
    base = threshold_base(probs)
    sigma, n0, n, alpha, batch = 0.25, 100, 20_000, 0.001, 4096
    key = jax.random.key(3)
    c, r = sm.certify(base, X, key, sigma=sigma, n0=n0, n=n, alpha=alpha, batch=batch)
    # The documented key use: selection and estimation draw from the two halves of split(key).
    k_sel, k_est = jax.random.split(key)
    sel = sm.sample_counts(base, X, n0, batch, k_sel)
    est = sm.sample_counts(base, X, n, batch, k_est)
    c_hat = int(np.argmax(sel))
    p_a = clopper_pearson_root(int(est[c_hat]), n, alpha)
    if abstains:
        assert p_a < 0.5 and (c, r) == (sm.ABSTAIN, 0.0)
    else:
        assert c == int(np.argmax(probs)) == c_hat
        assert r == pytest.approx(sigma * stats.norm.ppf(p_a), rel=1e-6)
        assert 0 < r < sigma * stats.norm.ppf(max(probs))  # a lower bound on the true radius


def test_predict_abstains_on_a_coin_and_answers_a_clear_base():
    assert sm.predict(threshold_base([0.5, 0.5]), X, jax.random.key(4), n=2000, alpha=0.001, batch=1000) == sm.ABSTAIN
    assert sm.predict(threshold_base([0.1, 0.9]), X, jax.random.key(4), n=2000, alpha=0.001, batch=1000) == 1


# --- denoised smoothing ----------------------------------------------------------------------------------------

def test_one_shot_denoise_is_the_gaussian_posterior_mean():
    # Data in [-1, 1]: one Gaussian N(mu, s^2) per pixel, so E[x0 | x'] = mu + s^2 / (s^2 + (2 sigma)^2) (x' - mu).
    mu = jnp.linspace(-0.6, 0.9, 16).reshape(SHAPE)
    s, sigma = 0.4, 0.25
    gm = toy.mixture(mu[None], s)
    x01 = jax.random.uniform(jax.random.key(5), (6,) + SHAPE)
    key = jax.random.key(6)
    noisy = (2 * x01 - 1) + 2 * sigma * jax.random.normal(key, x01.shape)
    want = np.clip((mu + s ** 2 / (s ** 2 + 4 * sigma ** 2) * (noisy - mu) + 1) / 2, 0, 1)
    got = sm.one_shot_denoise(toy.denoiser(gm), x01, sigma, key)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert float(got.min()) >= 0 and float(got.max()) <= 1
    # Per-sample keys: row b is the one-image result with key b.
    keys = jax.random.split(key, 6)
    denoise = jax.jit(lambda x, k: sm.one_shot_denoise(toy.denoiser(gm), x, sigma, k))
    rows = jnp.concatenate([denoise(x01[b:b + 1], keys[b][None]) for b in range(6)])
    np.testing.assert_allclose(denoise(x01, keys), rows, atol=1e-6)


def test_one_shot_denoise_clips_to_the_image_box():
    gm = toy.mixture(jnp.full((1,) + SHAPE, 3.0), 0.1)  # data far beyond the box: the estimate overshoots 1
    got = sm.one_shot_denoise(toy.denoiser(gm), jnp.ones((2,) + SHAPE), 0.1, jax.random.key(0))
    np.testing.assert_array_equal(got, 1.0)


def two_mode_setup():
    """Two well separated image modes in [-1, 1] (all pixels -0.5 / +0.5, classes 0 / 1) and a classifier of
    clean [0, 1] images by mean brightness."""
    gm = toy.mixture(jnp.stack([jnp.full(SHAPE, -0.5), jnp.full(SHAPE, 0.5)]), 0.1)
    logits_fn = lambda x: jnp.stack([0.5 - x.mean((1, 2, 3)), x.mean((1, 2, 3)) - 0.5], -1) * 20
    return gm, logits_fn


def test_denoised_classifier_is_logits_of_the_one_shot_denoise():
    gm, logits_fn = two_mode_setup()
    base = sm.denoised_classifier(toy.denoiser(gm), logits_fn, 0.25)
    x = jax.random.uniform(jax.random.key(7), (5,) + SHAPE)
    keys = jax.random.split(jax.random.key(8), 5)
    np.testing.assert_allclose(base(x, keys), logits_fn(sm.one_shot_denoise(toy.denoiser(gm), x, 0.25, keys)),
                               atol=1e-6)


def test_certify_denoised_smoothing_end_to_end():
    gm, logits_fn = two_mode_setup()
    # Pixel noise 0.12 is 0.24 in [-1, 1]; averaged over 16 pixels it is 0.06, an eighth of the way from a mode's
    # brightness to the midpoint between the modes, so the posterior never picks the wrong mode in these draws.
    sigma, n, alpha = 0.12, 1000, 0.001
    base = sm.denoised_classifier(toy.denoiser(gm), logits_fn, sigma)
    xs = jnp.stack([jnp.full(SHAPE, 0.25), jnp.full(SHAPE, 0.75)])  # mode 0 and mode 1 in [0, 1]
    classes, radii = sm.certify_batch(base, xs, jax.random.key(9), sigma=sigma, n0=100, n=n, alpha=alpha, batch=500)
    np.testing.assert_array_equal(classes, [0, 1])
    # Every noisy copy is denoised onto the right mode, so nA = n and pA = alpha^(1/n).
    np.testing.assert_allclose(radii, sigma * stats.norm.ppf(alpha ** (1 / n)), rtol=1e-6)
    np.testing.assert_array_equal(sm.predict_batch(base, xs, jax.random.key(10), n=200, batch=200), [0, 1])


def test_certified_accuracy_by_hand():
    radii = [0.0, 0.5, 1.0, 0.25, 0.75]
    correct = [False, True, True, False, True]  # the first is an abstention (radius 0, counted wrong)
    got = sm.certified_accuracy(radii, correct, [0.0, 0.25, 0.5, 0.6, 1.0, 1.5])
    np.testing.assert_allclose(got, [3 / 5, 3 / 5, 3 / 5, 2 / 5, 1 / 5, 0.0])
    with pytest.raises(ValueError, match='alike'):
        sm.certified_accuracy([0.1, 0.2], [True], [0.0])
