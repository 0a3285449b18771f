"""Transform laws: CFG limits and formula, weight schedules, chain, and stateful transforms."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import transforms as G
from jaxdiff import schedules, toy
from jaxdiff.denoiser import StatefulDenoiser, as_stateful

GM = toy.ring_mixture(labels=[0, 1, 2, 3] * 2, num_classes=4)
D = toy.denoiser(GM)
X = jax.random.normal(jax.random.key(0), (5, 2)) * 3
C = jax.nn.one_hot(jnp.array([0, 1, 2, 3, 0]), 4)
NEG = jax.nn.one_hot(jnp.array([1, 2, 3, 0, 2]), 4)


def test_cfg_weight_one_is_conditional_and_zero_is_unconditional():
    np.testing.assert_allclose(G.cfg(1.0)(D)(X, 1.3, C), D(X, 1.3, C), atol=1e-6)
    np.testing.assert_allclose(G.cfg(0.0)(D)(X, 1.3, C), D(X, 1.3, None), atol=1e-6)


def test_cfg_formula_in_eps_space():
    # The x0-space combination equals the eps-space one: eps = eps_u + w (eps_c - eps_u).
    sigma, w = 0.9, 3.5
    eps = lambda d: (X - d) / sigma
    want_eps = eps(D(X, sigma, None)) + w * (eps(D(X, sigma, C)) - eps(D(X, sigma, None)))
    got = G.cfg(w)(D)(X, sigma, C)
    np.testing.assert_allclose(np.asarray(eps(got)), np.asarray(want_eps), rtol=1e-5, atol=1e-5)


def test_negative_condition_modes():
    sigma, w, wn = 0.7, 2.0, 0.5
    du, dc, dn = D(X, sigma, None), D(X, sigma, C), D(X, sigma, NEG)
    got = G.cfg(w, negative=NEG, negative_weight=wn)(D)(X, sigma, C)
    np.testing.assert_allclose(got, du + w * (dc - du) - wn * (dn - du), atol=1e-5)
    got = G.cfg(w, negative=NEG, negative_mode="replace")(D)(X, sigma, C)
    np.testing.assert_allclose(got, dn + w * (dc - dn), atol=1e-5)


@pytest.mark.parametrize("name", ["constant", "linear", "invlinear", "cosine", "sine", "v_shape", "lambda_shape"])
def test_parameter_free_schedules_average_to_w(name):
    s = (np.arange(100_000) + 0.5) / 100_000
    vals = np.asarray(G.WEIGHT_SCHEDULES[name](jnp.asarray(s), 3.0))
    assert vals.mean() == pytest.approx(3.0, rel=1e-4)


def test_schedule_shapes_and_progress():
    grid = schedules.karras_sigmas(11)[:-1].astype(np.float32)
    lin = np.asarray(G.guidance_weight(2.0, grid, "linear"))
    np.testing.assert_allclose(lin, 4.0 * np.linspace(0, 1, 11), atol=1e-4)  # 0 at pure noise, 2w at the end
    assert np.all(np.diff(np.asarray(G.guidance_weight(2.0, grid, "cosine"))) >= 0)
    np.testing.assert_allclose(G.guidance_weight(2.0, grid, "clamp_linear", c=1.5), np.maximum(1.5, lin), atol=1e-4)
    # pcs, 0.5 w (1 - cos(pi s^a)) with s = (T - t)/T: 0 at pure noise, w at the end, half of 'cosine' at a = 1;
    # a = 2 at s = 1/2 is 0.5 w (1 - cos(pi/4)).
    pcs = np.asarray(G.guidance_weight(2.0, grid, "pcs", a=2.0))
    assert pcs[0] == pytest.approx(0.0, abs=1e-6) and pcs[-1] == pytest.approx(2.0, abs=1e-4)
    half = float(G.WEIGHT_SCHEDULES["pcs"](jnp.float32(0.5), 2.0, a=2.0))
    assert half == pytest.approx(1.0 - np.cos(np.pi / 4), rel=1e-6)
    cosine = np.asarray(G.guidance_weight(2.0, grid, "cosine"))
    np.testing.assert_allclose(G.guidance_weight(2.0, grid, "pcs"), 0.5 * cosine, atol=1e-5)
    with pytest.raises(ValueError, match="unknown CFG weight schedule"):
        G.cfg(1.0, schedule="nope")


def test_chain_of_nothing_is_identity_and_chain_order():
    assert G.chain()(D) is D
    shift = lambda a: G.stateless(lambda call, x, s, c: call(x, s, c) + a)
    scale = lambda a: G.stateless(lambda call, x, s, c: call(x, s, c) * a)
    np.testing.assert_allclose(G.chain(shift(1.0), scale(2.0))(D)(X, 1.0, C), (D(X, 1.0, C) + 1.0) * 2.0, rtol=1e-6)


def _counter():
    """A stateful transform counting its evaluations (state: int32 scalar)."""
    return G.stateful(lambda x: jnp.zeros((), jnp.int32), lambda call, x, s, c, n: (call(x, s, c), n + 1))


def test_stateful_state_threads_through_chain():
    sd = G.chain(_counter(), G.cfg(2.0), _counter())(D)
    assert isinstance(sd, StatefulDenoiser)
    state = sd.init(X)
    for _ in range(3):
        out, state = sd.apply(X, 1.0, C, state)
    outer, (inner, ()) = state[0], state[1]
    # The outer counter sees 3 calls; CFG calls the inner denoiser twice per call.
    assert int(outer) == 3 and int(inner) == 6
    np.testing.assert_allclose(out, G.cfg(2.0)(D)(X, 1.0, C), atol=1e-6)


def test_stateful_advances_once_per_call_inside_scan_and_jits_once():
    traces = []
    sd = as_stateful(G.chain(G.cfg(1.5), _counter())(D))

    @jax.jit
    def run(x):
        def body(carry, sigma):
            x, st = carry
            traces.append(1)
            x0, st = sd.apply(x, sigma, C, st)
            return (x0, st), None
        (x, st), _ = jax.lax.scan(body, (x, sd.init(x)), jnp.linspace(2.0, 0.1, 7))
        return x, st

    _, st = run(X)
    run(X + 1)
    assert int(st[0]) == 7 and len(traces) == 1


def test_stateless_transforms_keep_a_declared_sigma_grid():
    from jaxdiff.denoiser import GridDenoiser, sigma_grid
    grid = np.array([0.0, 0.5, 1.0, 2.0])
    guided = G.cfg(2.0)(GridDenoiser(D, grid))
    np.testing.assert_array_equal(sigma_grid(guided), grid)
    np.testing.assert_allclose(guided(X, 1.0, C), G.cfg(2.0)(D)(X, 1.0, C), atol=1e-6)
    assert sigma_grid(G.cfg(2.0)(D)) is None
