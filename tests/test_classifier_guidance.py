"""Classifier guidance against exact mixture oracles: with the exact noisy class posterior it is Bayes' rule."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import transforms as G
from jaxdiff import toy
from jaxdiff.transforms.classifier import classifier_guidance
from jaxdiff.solvers import edm_sampler

RING = toy.ring_mixture(labels=[0, 1, 2, 3] * 2, num_classes=4)


def exact_log_prob(gm):
    """log p_sigma(y | x) of the sigma-noised mixture, y the one-hot class in cond: (B,).

    Bayes' rule on toy.log_prob's noisy densities (logsumexp-stable far from every mode):
    log p(x | y) + log p(y) - log p(x), with p(y) the total weight of class y's components.
    """
    class_prior = jax.nn.one_hot(gm.labels, gm.num_classes).T @ gm.weights  # (C,)

    def log_prob(x, sigma, cond):
        return toy.log_prob(gm, x, sigma, cond) + jnp.log(cond @ class_prior) - toy.log_prob(gm, x, sigma)

    return log_prob


def unconditional(gm):
    """The mixture's denoiser ignoring cond, so only the classifier term carries the class."""
    return lambda x, sigma, cond=None: toy.denoise(gm, x, sigma, None)


def sample_classes(gm, denoiser, y, n=512, seed=0):
    """Classes (n,) of exact-denoiser samples guided towards class y, read off by the clean posterior."""
    z = jax.random.normal(jax.random.key(seed), (n, 2))
    x = edm_sampler(denoiser, z, cond=jax.nn.one_hot(jnp.full((n,), y), gm.num_classes), num_steps=32)
    return gm.labels[jnp.argmax(toy.posterior(gm, x, 0.0), axis=-1)]


def test_exact_posterior_with_scale_one_is_the_conditional_denoiser():
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(k1, (64, 2)) * 4
    sigma = jnp.exp(jax.random.uniform(k2, (64,), minval=np.log(0.05), maxval=np.log(20.0)))
    cond = jax.nn.one_hot(jax.random.randint(k3, (64,), 0, 4), 4)
    guided = classifier_guidance(exact_log_prob(RING), 1.0)(unconditional(RING))
    np.testing.assert_allclose(guided(x, sigma, cond), toy.denoise(RING, x, sigma, cond), atol=2e-4, rtol=1e-4)


def test_sampling_with_scale_one_gives_the_class():
    guided = classifier_guidance(exact_log_prob(RING), 1.0)(unconditional(RING))
    for y in (0, 3):
        assert float(jnp.mean(sample_classes(RING, guided, y) == y)) >= 0.99


def test_larger_scales_sharpen_an_overlapping_class():
    # Two overlapping classes: at scale 1 about 1/6 of class-0 samples fall on class 1's side.
    gm = toy.mixture(np.array([[-0.5, 0.0], [0.5, 0.0]]), 0.5, labels=[0, 1])
    purity = {s: float(jnp.mean(sample_classes(gm, classifier_guidance(exact_log_prob(gm), s)(unconditional(gm)),
                                               0, n=2000) == 0)) for s in (1.0, 4.0)}
    assert purity[1.0] == pytest.approx(0.84, abs=0.04)  # Phi(1), the exact class-conditional's purity
    assert purity[4.0] > purity[1.0] + 0.08


def test_chains_after_cfg_and_jits_once():
    x = jax.random.normal(jax.random.key(1), (8, 2)) * 3
    cond = jax.nn.one_hot(jnp.arange(8) % 4, 4)
    d = toy.denoiser(RING)
    log_prob = exact_log_prob(RING)
    got = G.chain(G.cfg(2.0), classifier_guidance(log_prob, 0.5))(d)(x, 0.7, cond)
    grad = jax.grad(lambda z: jnp.sum(log_prob(z, 0.7, cond)))(x)
    np.testing.assert_allclose(got, G.cfg(2.0)(d)(x, 0.7, cond) + 0.5 * 0.7 ** 2 * grad, atol=1e-5)

    traces = []

    @jax.jit
    def run(z):
        traces.append(1)
        return edm_sampler(G.chain(G.cfg(2.0), classifier_guidance(log_prob, 0.5))(d), z, cond=cond, num_steps=8)

    assert np.all(np.isfinite(run(x)))
    run(x + 1.0)
    assert len(traces) == 1
