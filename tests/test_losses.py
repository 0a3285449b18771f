"""Losses: noise-level distributions and weights, and the EDM weighting's unit loss at the optimum."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import losses


def test_edm_levels_distribution_and_weight():
    lv = losses.edm_levels()
    s = lv.sample(jax.random.key(0), 200_000)
    ls = np.log(np.asarray(s))
    assert ls.mean() == pytest.approx(-1.2, abs=0.01) and ls.std() == pytest.approx(1.2, abs=0.01)
    assert float(lv.weight(jnp.array(2.0))) == pytest.approx((4 + 0.25) / (2 * 0.5) ** 2)


def test_vp_ve_levels_ranges():
    s = np.asarray(losses.vp_levels().sample(jax.random.key(1), 100_000))
    lo, hi = math.sqrt(math.expm1(0.5 * 19.9 * 1e-10 + 0.1 * 1e-5)), math.sqrt(math.expm1(0.5 * 19.9 + 0.1))
    assert s.min() >= lo * 0.999 and s.max() <= hi * 1.001
    s = np.asarray(losses.ve_levels().sample(jax.random.key(2), 100_000))
    ls = np.log(s)
    assert ls.min() >= math.log(0.02) - 1e-6 and ls.max() <= math.log(100) + 1e-6
    # log-uniform: mean of ln sigma is the midpoint.
    assert ls.mean() == pytest.approx((math.log(0.02) + math.log(100)) / 2, abs=0.02)
    assert float(losses.ve_levels().weight(jnp.array(4.0))) == 1 / 16


def test_edm_loss_is_one_at_the_optimum_for_gaussian_data():
    # For x0 ~ N(0, sd^2 I) the exact denoiser is sd^2/(sd^2+s^2) x, its error variance sd^2 s^2/(sd^2+s^2),
    # and EDM's weight (s^2+sd^2)/(s sd)^2 makes the expected loss exactly 1 at every sigma.
    sd = 0.5
    opt = lambda x, sigma, cond=None: sd ** 2 / (sd ** 2 + sigma[:, None] ** 2) * x
    x0 = sd * jax.random.normal(jax.random.key(3), (100_000, 4))
    loss = losses.edm_loss(opt, x0, jax.random.key(4))
    assert loss.shape == x0.shape
    assert float(loss.mean()) == pytest.approx(1.0, abs=0.01)


def test_weighted_error_formula():
    d = lambda x, sigma, cond=None: 0.5 * x
    x0 = jnp.array([[1.0, 2.0]])
    n = jnp.array([[0.5, -1.0]])
    got = losses.weighted_error(d, x0, jnp.array([2.0]), n, lambda s: 1 / s ** 2)
    y = np.array([[2.0, 0.0]])
    np.testing.assert_allclose(np.asarray(got), 0.25 * (0.5 * y - np.array([[1.0, 2.0]])) ** 2)
