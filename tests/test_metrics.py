"""FID statistics, Inception Score and improved precision/recall against closed forms and hand-worked values."""
import math

import numpy as np
import pytest
import scipy.linalg
from scipy.special import softmax

from jaxdiff.metrics.frechet import FeatureStats, frechet_distance, load_stats, save_stats
from jaxdiff.metrics.inception_score import inception_score
from jaxdiff.metrics.precision_recall import manifold_radii, precision_recall


def gaussian_features(seed, n=5000, d=16, shift=0.0, scale=1.0):
    """(n, d) samples of a Gaussian with a random non-diagonal covariance."""
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(d, d)) / np.sqrt(d)
    return shift + scale * rng.normal(size=(n, d)) @ mixing


def sqrtm_frechet(mu1, s1, mu2, s2):
    """The textbook formula with a general matrix square root of s1 s2 (as pytorch-fid evaluates it)."""
    root = scipy.linalg.sqrtm(s1 @ s2).real
    return (mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(root)


def test_frechet_of_a_set_with_itself_is_zero():
    x = gaussian_features(0)
    mu, sigma = x.mean(0), np.cov(x, rowvar=False)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-6 * np.trace(sigma)


def test_frechet_matches_sqrtm_formula():
    a = gaussian_features(1)
    b = gaussian_features(2, shift=0.3, scale=1.5)
    args = (a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    want = sqrtm_frechet(*args)
    assert want > 1
    assert frechet_distance(*args) == pytest.approx(want, rel=1e-6)


def test_frechet_closed_form_for_diagonal_covariances():
    rng = np.random.default_rng(3)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    var1, var2 = rng.uniform(0.1, 3, 8), rng.uniform(0.1, 3, 8)
    want = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(var1) - np.sqrt(var2)) ** 2)
    assert frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2)) == pytest.approx(want, rel=1e-12)


def test_frechet_with_singular_covariances_is_real_and_finite():
    # Fewer samples than dimensions: both covariances are rank-deficient.
    a, b = gaussian_features(4, n=10, d=32), gaussian_features(5, n=10, d=32, shift=1.0)
    d = frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    assert np.isfinite(d) and d > 0


def test_frechet_rejects_bad_shapes():
    with pytest.raises(ValueError, match='dimensions differ'):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match='square'):
        frechet_distance(np.zeros(3), np.ones((3, 2)), np.zeros(3), np.eye(3))


@pytest.mark.parametrize('offset', [0.0, 1e4])
def test_feature_stats_streamed_over_uneven_chunks(offset):
    # A large offset with a small spread is where summing raw second moments would lose the covariance.
    x = gaussian_features(6, n=3000, d=12, shift=offset, scale=1e-2 if offset else 1.0)
    stats = FeatureStats()
    start = 0
    for size in [1, 7, 0, 1000, 1, 1991]:
        stats.update(x[start:start + size])
        start += size
    assert stats.count == len(x) == start
    np.testing.assert_allclose(stats.mean(), x.mean(0), rtol=1e-12)
    want = np.cov(x, rowvar=False)
    np.testing.assert_allclose(stats.cov(), want, rtol=1e-8, atol=1e-12 * np.abs(want).max())


def test_feature_stats_errors():
    stats = FeatureStats()
    with pytest.raises(ValueError, match='no features'):
        stats.mean()
    stats.update(np.zeros((1, 4)))
    with pytest.raises(ValueError, match='at least 2'):
        stats.cov()
    with pytest.raises(ValueError, match='4-dim'):
        stats.update(np.zeros((2, 5)))


def test_stats_round_trip_and_missing_keys(tmp_path):
    x = gaussian_features(7, n=100, d=5)
    path = str(tmp_path / 'ref_stats')  # no suffix: the file is written under exactly this name
    save_stats(path, x.mean(0), np.cov(x, rowvar=False))
    mu, sigma = load_stats(path)
    np.testing.assert_array_equal(mu, x.mean(0))
    np.testing.assert_array_equal(sigma, np.cov(x, rowvar=False))
    # Files written with pytorch-fid's / EDM's layout load too.
    other = tmp_path / 'other.npz'
    np.savez(other, mu=mu.astype(np.float32), sigma=sigma.astype(np.float32))
    assert load_stats(str(other))[1].dtype == np.float64
    bad = tmp_path / 'bad.npz'
    np.savez(bad, mean=mu, sigma=sigma)
    with pytest.raises(ValueError, match="lacks mu"):
        load_stats(str(bad))
    with pytest.raises(FileNotFoundError):
        load_stats(str(tmp_path / 'absent.npz'))


# Inception Score.

def test_is_of_confident_predictions_spread_over_k_classes_is_k():
    k, n = 5, 100
    logits = 50.0 * np.eye(k)[np.arange(n) % k]  # every contiguous split of 10 holds each class twice
    mean, std = inception_score(logits, splits=10)
    assert mean == pytest.approx(k, rel=1e-9)
    assert std == pytest.approx(0, abs=1e-9)


def test_is_of_identical_predictions_is_one():
    logits = np.tile([[0.3, -1.0, 2.0, 0.1]], (40, 1))
    assert inception_score(logits, splits=4) == pytest.approx((1.0, 0.0), abs=1e-12)


PROBS = np.array([
    [1 / 2, 1 / 2, 0],
    [1 / 2, 0, 1 / 2],
    [1, 0, 0],
    [1 / 4, 1 / 4, 1 / 2],
])


def test_is_hand_computed_one_split():
    # Marginal over all four rows: (2.25, 0.75, 1) / 4.
    m = (0.5625, 0.1875, 0.25)
    kl = [
        0.5 * math.log(0.5 / m[0]) + 0.5 * math.log(0.5 / m[1]),
        0.5 * math.log(0.5 / m[0]) + 0.5 * math.log(0.5 / m[2]),
        math.log(1 / m[0]),
        0.25 * math.log(0.25 / m[0]) + 0.25 * math.log(0.25 / m[1]) + 0.5 * math.log(0.5 / m[2]),
    ]
    mean, std = inception_score(PROBS, splits=1, from_logits=False)
    assert mean == pytest.approx(math.exp(sum(kl) / 4), rel=1e-12)
    assert std == 0


def test_is_hand_computed_two_splits():
    # Rows 0-1: marginal (1/2, 1/4, 1/4); both KLs are ln(2) / 2, so the split scores sqrt(2).
    first = math.sqrt(2)
    # Rows 2-3: marginal (5/8, 1/8, 1/4).
    kl2 = math.log(1 / 0.625)
    kl3 = 0.25 * math.log(0.25 / 0.625) + 0.25 * math.log(0.25 / 0.125) + 0.5 * math.log(0.5 / 0.25)
    second = math.exp((kl2 + kl3) / 2)
    mean, std = inception_score(PROBS, splits=2, from_logits=False)
    assert mean == pytest.approx((first + second) / 2, rel=1e-12)
    assert std == pytest.approx(abs(first - second) / 2, rel=1e-12)


def test_is_splits_are_contiguous_chunks_covering_all_rows():
    logits = np.random.default_rng(0).normal(size=(7, 4)) * 3
    # 7 rows in 3 splits: [0, 2), [2, 4), [4, 7).
    parts = [inception_score(logits[a:b], splits=1)[0] for a, b in [(0, 2), (2, 4), (4, 7)]]
    assert inception_score(logits, splits=3) == pytest.approx((np.mean(parts), np.std(parts)), rel=1e-12)
    assert inception_score(logits, splits=3) == pytest.approx(
        inception_score(softmax(logits, axis=1), splits=3, from_logits=False), rel=1e-12)


def test_is_rejects_bad_input():
    with pytest.raises(ValueError, match='splits'):
        inception_score(np.zeros((3, 2)), splits=4)
    with pytest.raises(ValueError, match='probabilities'):
        inception_score(np.ones((3, 2)), splits=1, from_logits=False)


# Precision and recall.

def test_precision_recall_hand_computed_1d():
    # k=1. Real radii: 0 -> 1 (to 1), 1 -> 1 (to 0), 3 -> 2 (to 1): real manifold [-1, 1] u [0, 2] u [1, 5].
    # Fake radii: 4 -> 1, 5 -> 1, 6 -> 1, 10 -> 4: fake manifold [3, 5] u [4, 6] u [5, 7] u [6, 14].
    real = np.array([[0.0], [1.0], [3.0]])
    fake = np.array([[4.0], [5.0], [6.0], [10.0]])
    np.testing.assert_array_equal(manifold_radii(real, k=1), [1, 1, 4])  # squared
    np.testing.assert_array_equal(manifold_radii(fake, k=1), [1, 1, 1, 16])
    # Precision: 4 and 5 (on the surface of 3's sphere: counts) are inside; 6 and 10 are not -> 2/4.
    # Recall: only 3 (on the surface of 4's sphere) is inside -> 1/3.
    precision, recall = precision_recall(real, fake, k=1)
    assert precision == 0.5
    assert recall == pytest.approx(1 / 3)


def test_precision_recall_hand_computed_2d():
    # k=2. Unit-square corners: each has two neighbours at distance 1, so every squared radius is 1.
    real = np.array([[0, 0], [1, 0], [0, 1], [1, 1]], np.float32)
    # Squared fake distances: A-B 2.5, A-C 12.5, A-D 6.5, B-C 10, B-D 8, C-D 34 -> squared radii 6.5, 8, 12.5, 8.
    fake = np.array([[0.5, 0.5], [2, 0], [3, 3], [0, -2]], np.float32)
    np.testing.assert_array_equal(manifold_radii(real, k=2), [1, 1, 1, 1])
    np.testing.assert_allclose(manifold_radii(fake, k=2), [6.5, 8, 12.5, 8])
    # Precision: A (0.5 from every corner) and B (exactly 1 from (1, 0)) are inside; C (8 from (1, 1)) and
    # D (4 from (0, 0)) are not. Recall: every corner is 0.5 from A, inside A's sphere.
    assert precision_recall(real, fake, k=2) == (0.5, 1.0)


def test_precision_recall_identical_and_disjoint_sets():
    x = np.random.default_rng(1).normal(size=(200, 8))
    assert precision_recall(x, x) == (1.0, 1.0)
    assert precision_recall(x, x + 1000.0) == (0.0, 0.0)


def test_precision_recall_batched_equals_unbatched():
    rng = np.random.default_rng(2)
    real, fake = rng.normal(size=(300, 8)), rng.normal(size=(250, 8)) * 1.3 + 0.2
    whole = precision_recall(real, fake, batch_size=10_000)
    assert 0 < whole[0] < 1 and 0 < whole[1] < 1
    assert precision_recall(real, fake, batch_size=7) == whole


def test_precision_recall_rejects_bad_input():
    with pytest.raises(ValueError, match='dimensions differ'):
        precision_recall(np.zeros((5, 2)), np.zeros((5, 3)))
    with pytest.raises(ValueError, match='k=3'):
        precision_recall(np.zeros((3, 2)), np.zeros((5, 2)))
