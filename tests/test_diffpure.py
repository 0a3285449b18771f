"""DiffPure (jaxdiff.robust.diffpure) with exact Gaussian-mixture denoisers as the model: the VP -> EDM noise map,
purification of a point near a mode against the closed-form laws of the reverse SDE and the probability-flow ODE
for Gaussian data, gradients against finite differences, EOT as a mean of draws, per-sample keys, one trace."""
import numpy as np
import pytest

import jax
import jax.numpy as jnp

from jaxdiff import toy
from jaxdiff.robust import diffpure as dp
from jaxdiff.robust import pgd as pgd_mod

SHAPE = (4, 4, 1)
S, M = 0.3, 0.5  # mode std and |mean| per pixel, in the model's [-1, 1] space


def two_modes():
    """Modes at -M and +M on every pixel (classes 0 / 1), std S: the exact denoiser of their mixture."""
    return toy.denoiser(toy.mixture(jnp.stack([jnp.full(SHAPE, -M), jnp.full(SHAPE, M)]), S))


def brightness_logits(x):
    """A fixed classifier of [0, 1] images: class 1 when the mean pixel is above 1/2."""
    b = x.mean((1, 2, 3))
    return jnp.stack([0.5 - b, b - 0.5], -1) * 10.0


def test_vp_time_to_sigma():
    # sigma(t) = sqrt(1/abar - 1), abar(t) = exp(-19.9 t^2 / 2 - 0.1 t) (Song's beta_min 0.1, beta_max 20).
    abar = np.exp(-0.5 * 19.9 * 0.1 ** 2 - 0.1 * 0.1)
    assert dp.vp_time_to_sigma(0.1) == pytest.approx(np.sqrt(1 / abar - 1), rel=1e-12)
    grid = dp.purification_sigmas(0.1, 4)
    assert grid.shape == (5,) and grid[-1] == 0.0 and grid[0] == pytest.approx(dp.vp_time_to_sigma(0.1))
    assert grid[2] == pytest.approx(dp.vp_time_to_sigma(0.05))  # uniform in VP time
    with pytest.raises(ValueError, match='t_star'):
        dp.purification_sigmas(0.0, 4)
    with pytest.raises(ValueError, match='solver'):
        dp.diffpure(two_modes(), jnp.zeros((1,) + SHAPE), 0.1, jax.random.key(0), num_steps=2, solver='rk4')


@pytest.mark.parametrize('solver', dp.SOLVERS)
def test_tiny_t_star_returns_the_input(solver):
    x = jax.random.uniform(jax.random.key(0), (4,) + SHAPE, minval=0.2, maxval=0.8)
    out = dp.diffpure(two_modes(), x, 1e-5, jax.random.key(1), num_steps=4, solver=solver)
    # sigma* = 0.001 in [-1, 1] (5e-4 in [0, 1]): what is left is noise of about that size (the 'sde' solver adds
    # a little more) and a 1e-5 shrink towards the modes.
    np.testing.assert_allclose(out, x, atol=4e-3)
    assert float(jnp.abs(out - x).mean()) < 1e-3


@pytest.mark.parametrize('solver,num_steps', [('sde', 100), ('ode', 20)])
def test_purifying_a_point_near_a_mode_matches_the_gaussian_closed_form(solver, num_steps):
    """Start x = mu + delta near the +M mode. For Gaussian data N(mu, S^2) and x* = x + sigma* n:
    reverse SDE: x0 ~ p(x0 | x*), so the output has mean mu + a delta, a = S^2/(S^2 + sigma*^2), and variance
        a^2 sigma*^2 + S^2 sigma*^2 / (S^2 + sigma*^2);
    PF-ODE: the flow map x0 = mu + b (x* - mu), b = S / sqrt(S^2 + sigma*^2): mean mu + b delta, std b sigma*.
    (The other mode is 4 standard deviations per pixel away, so its posterior weight is negligible.)"""
    delta, sig = 0.2, dp.vp_time_to_sigma(0.1)
    x01 = jnp.full((1024,) + SHAPE, (M + delta + 1) / 2)
    out = np.asarray(dp.diffpure(two_modes(), x01, 0.1, jax.random.key(2), num_steps=num_steps, solver=solver))
    out = 2 * out - 1  # back to the model's space
    if solver == 'sde':
        a = S ** 2 / (S ** 2 + sig ** 2)
        mean, std = M + a * delta, np.sqrt(a ** 2 * sig ** 2 + S ** 2 * sig ** 2 / (S ** 2 + sig ** 2))
    else:
        b = S / np.sqrt(S ** 2 + sig ** 2)
        mean, std = M + b * delta, b * sig
    se = std / np.sqrt(out.size)  # pixels are independent under one diagonal Gaussian mode
    assert abs(out.mean() - mean) < 5 * se
    # Ancestral steps miss a little of the posterior variance at finite step counts (1% at 100 steps).
    assert out.std() == pytest.approx(std, rel=0.03)
    assert np.all(out.mean((1, 2, 3)) > 0)  # every purified image stays on the + mode


@pytest.mark.parametrize('solver', dp.SOLVERS)
def test_gradients_through_the_purifier(solver):
    f = dp.purified_classifier(two_modes(), brightness_logits, 0.1, 4, solver=solver)
    x = jax.random.uniform(jax.random.key(3), (3,) + SHAPE, minval=0.3, maxval=0.7)
    y = jnp.array([0, 1, 1])
    key = jax.random.key(4)

    def loss(z):
        logits = f(z, key)  # fixed key: a deterministic, smooth function of z
        return -jnp.sum(jax.nn.log_softmax(logits)[jnp.arange(3), y])

    loss = jax.jit(loss)
    g = jax.grad(loss)(x)
    assert np.all(np.isfinite(g)) and float(jnp.abs(g).max()) > 1e-3
    # Directional derivative against a central difference.
    v = jax.random.normal(jax.random.key(5), x.shape)
    h = 1e-3  # the loss is sharply curved between the modes: larger steps see the curvature
    fd = (loss(x + h * v) - loss(x - h * v)) / (2 * h)
    assert float(jnp.vdot(g, v)) == pytest.approx(float(fd), rel=1e-2)


def test_eot_is_the_mean_of_individual_draws():
    f = jax.jit(dp.purified_classifier(two_modes(), brightness_logits, 0.1, 5))
    x = jax.random.uniform(jax.random.key(6), (3,) + SHAPE)
    key = jax.random.key(7)
    eot = jax.jit(dp.eot_logits_fn(f, key, 4))
    want = jnp.mean(jnp.stack([f(x, jax.random.fold_in(key, j)) for j in range(4)]), 0)
    np.testing.assert_allclose(eot(x), want, atol=1e-5)
    # The attacks accept it as a logits_fn of x alone and stay in the ball.
    x_adv = pgd_mod.pgd(eot, x, jnp.array([0, 1, 0]), 8 / 255, key=jax.random.key(8), n_steps=1)
    assert float(jnp.abs(x_adv - x).max()) <= 8 / 255 + 1e-6


def test_per_sample_keys(solver='sde'):  # 'ode' draws its forward noise by the same code
    x = jax.random.uniform(jax.random.key(9), (3,) + SHAPE)
    keys = jax.random.split(jax.random.key(10), 3)
    denoiser = two_modes()
    run = jax.jit(lambda z, k: dp.diffpure(denoiser, z, 0.1, k, num_steps=4, solver=solver))
    rows = jnp.concatenate([run(x[b:b + 1], keys[b:b + 1]) for b in range(3)])
    np.testing.assert_allclose(run(x, keys), rows, atol=1e-5)


def test_purified_classifier_traces_once():
    traces = []

    def logits_fn(x):
        traces.append(1)  # runs only while tracing
        return brightness_logits(x)

    f = jax.jit(dp.purified_classifier(two_modes(), logits_fn, 0.1, 6))
    x = jax.random.uniform(jax.random.key(11), (2,) + SHAPE)
    a = f(x, jax.random.key(12))
    b = f(x * 0.9, jax.random.key(13))
    assert len(traces) == 1 and not np.allclose(a, b)
