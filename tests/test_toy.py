"""Exact mixture denoisers against numerical integration and closed forms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import toy


def test_1d_denoiser_matches_quadrature():
    gm = toy.mixture(means=[[-2.0], [1.0], [3.0]], stds=[0.5, 0.3, 1.0], weights=[0.2, 0.5, 0.3])
    grid = np.linspace(-12, 12, 200_001)
    prior = sum(w * np.exp(-0.5 * ((grid - m) / s) ** 2) / s for m, s, w in [(-2, .5, .2), (1, .3, .5), (3, 1., .3)])
    for x, sigma in [(0.3, 0.7), (-1.0, 2.0), (2.5, 0.1), (5.0, 10.0)]:
        lik = np.exp(-0.5 * ((x - grid) / sigma) ** 2)
        want = np.sum(grid * prior * lik) / np.sum(prior * lik)
        got = float(toy.denoise(gm, jnp.array([[x]]), sigma)[0, 0])
        assert got == pytest.approx(want, abs=2e-4)


def test_single_gaussian_closed_form_and_tweedie():
    gm = toy.mixture(means=[[1.0, -1.0, 0.5]], stds=[[0.5, 1.0, 2.0]])
    x = jax.random.normal(jax.random.key(0), (5, 3)) * 3
    sigma = jnp.array([0.1, 0.5, 1.0, 2.0, 5.0])
    s2 = np.array([0.25, 1.0, 4.0])
    want = np.array([1.0, -1.0, 0.5]) + s2 / (s2 + np.asarray(sigma)[:, None] ** 2) * (np.asarray(x) - [1.0, -1.0, 0.5])
    np.testing.assert_allclose(np.asarray(toy.denoise(gm, x, sigma)), want, rtol=1e-5)
    # Tweedie on a real mixture: D = x + sigma^2 grad log p_sigma(x).
    gm = toy.ring_mixture()
    x = jax.random.normal(jax.random.key(1), (6, 2)) * 4
    score = jax.vmap(jax.grad(lambda xi: toy.log_prob(gm, xi[None], 0.8)[0]))(x)
    np.testing.assert_allclose(np.asarray(toy.denoise(gm, x, 0.8)), np.asarray(x + 0.64 * score), atol=1e-4)


def test_conditional_selects_components_and_zero_row_is_unconditional():
    gm = toy.ring_mixture(labels=[0, 1] * 4, num_classes=2)
    x, labels = toy.sample(gm, jax.random.key(2), 4000, cond=jax.nn.one_hot(jnp.ones(4000, int), 2))
    assert bool(jnp.all(labels == 1))
    shares = np.asarray(toy.mode_shares(gm, x))
    assert shares[0::2].sum() < 0.01 and np.allclose(shares[1::2], 0.25, atol=0.03)
    xs = jax.random.normal(jax.random.key(3), (3, 2))
    np.testing.assert_allclose(np.asarray(toy.denoise(gm, xs, 1.0, jnp.zeros((3, 2)))),
                               np.asarray(toy.denoise(gm, xs, 1.0)), rtol=1e-6)


def test_image_shaped_mixture():
    means = jax.random.normal(jax.random.key(4), (3, 4, 4, 1))
    gm = toy.mixture(means, 0.2)
    x, _ = toy.sample(gm, jax.random.key(5), 7)
    assert x.shape == (7, 4, 4, 1)
    out = toy.denoise(gm, x, jnp.full((7,), 0.5))
    assert out.shape == x.shape
    with pytest.raises(ValueError, match="x must be"):
        toy.denoise(gm, jnp.zeros((2, 16)), 1.0)


def test_sample_statistics():
    gm = toy.mixture(means=[[0.0], [10.0]], stds=[1.0, 2.0], weights=[0.25, 0.75])
    x, _ = toy.sample(gm, jax.random.key(6), 200_000)
    x = np.asarray(x)[:, 0]
    assert x.mean() == pytest.approx(7.5, abs=0.03)
    assert x.var() == pytest.approx(0.25 * 1 + 0.75 * 4 + 0.25 * 0.75 * 100, rel=0.01)
