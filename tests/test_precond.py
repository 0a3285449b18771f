"""Preconditioning coefficients against hand-computed numbers, and the denoiser it builds."""
import math

import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import precond


def test_edm_coeffs_by_hand():
    c_skip, c_out, c_in, c_noise = (np.asarray(c) for c in precond.edm_coeffs(jnp.array([1.0, 2.0])))
    np.testing.assert_allclose(c_skip, [0.2, 0.25 / 4.25], rtol=1e-6)
    np.testing.assert_allclose(c_out, [0.5 / math.sqrt(1.25), 1 / math.sqrt(4.25)], rtol=1e-6)
    np.testing.assert_allclose(c_in, [1 / math.sqrt(1.25), 1 / math.sqrt(4.25)], rtol=1e-6)
    np.testing.assert_allclose(c_noise, [0.0, math.log(2) / 4], atol=1e-7)


def test_vp_ve_coeffs_by_hand():
    s = 1.0
    t = (math.sqrt(0.1 ** 2 + 2 * 19.9 * math.log(s * s + 1)) - 0.1) / 19.9
    c_skip, c_out, c_in, c_noise = (float(c[0]) for c in precond.vp_coeffs(jnp.array([s])))
    assert (c_skip, c_out) == (1.0, -1.0)
    assert c_in == pytest.approx(1 / math.sqrt(2)) and c_noise == pytest.approx(999 * t, rel=1e-5)
    c_skip, c_out, c_in, c_noise = (float(c[0]) for c in precond.ve_coeffs(jnp.array([3.0])))
    assert (c_skip, c_out, c_in) == (1.0, 3.0, 1.0) and c_noise == pytest.approx(math.log(1.5))


def test_iddpm_noise_label_is_grid_index():
    from jaxdiff.schedules import iddpm_u
    u = iddpm_u()
    _, _, _, c_noise = precond.iddpm_coeffs(jnp.asarray(u[[0, 500, 999]], jnp.float32))
    np.testing.assert_array_equal(np.asarray(c_noise), [999 - 0, 999 - 500, 999 - 999])


def test_precondition_applies_formula():
    # A raw net F(x_in, c_noise) = 3 * x_in + c_noise, checked against the formula written out.
    raw = lambda x_in, c_noise, cond: 3 * x_in + c_noise[:, None]
    d = precond.precondition(raw, precond.edm_coeffs)
    x = jnp.array([[1.0, -2.0], [0.5, 4.0]])
    sig = jnp.array([1.0, 2.0])
    got = np.asarray(d(x, sig))
    for b in range(2):
        s = float(sig[b])
        cs, co, ci, cn = 0.25 / (s * s + 0.25), s * 0.5 / math.sqrt(s * s + 0.25), 1 / math.sqrt(s * s + 0.25), math.log(s) / 4
        np.testing.assert_allclose(got[b], cs * np.asarray(x[b]) + co * (3 * ci * np.asarray(x[b]) + cn), rtol=1e-6)


def test_iddpm_out_channels_slice():
    raw = lambda x_in, c_noise, cond: jnp.concatenate([x_in, 100 + x_in], axis=-1)
    d = precond.precondition(raw, precond.iddpm_coeffs, out_channels=1)
    x = jnp.ones((2, 3, 3, 1))
    out = d(x, 0.5)
    assert out.shape == x.shape
    np.testing.assert_allclose(np.asarray(out), 1 - 0.5 * 1 / math.sqrt(1.25), rtol=1e-6)


def test_network_binding_fills_zero_labels():
    seen = {}

    class Net:
        def apply(self, variables, x, noise_labels, class_labels, augment_labels=None, train=False, rngs=None):
            seen["labels"] = class_labels
            return x

    d = precond.edm(Net(), {}, label_dim=4)
    d(jnp.ones((3, 2, 2, 1)), jnp.ones(3))
    assert seen["labels"].shape == (3, 4) and float(jnp.abs(seen["labels"]).sum()) == 0.0


def test_iddpm_binding_declares_the_grid_its_c_noise_rounds_to():
    from jaxdiff.denoiser import GridDenoiser, sigma_grid
    from jaxdiff.schedules import iddpm_u, round_sigma_host

    class Net:
        def apply(self, variables, x, noise_labels, class_labels, augment_labels=None, train=False, rngs=None):
            return x

    d = precond.iddpm(Net(), {}, out_channels=1)
    grid = sigma_grid(d)
    assert isinstance(d, GridDenoiser) and grid.shape == (1001,)
    np.testing.assert_array_equal(grid, precond.iddpm_grid())
    np.testing.assert_array_equal(grid, iddpm_u(dtype=np.float32))   # the reference's float32 u buffer
    assert precond.iddpm_sigma_range() == (grid[999], grid[0])
    s = np.exp(np.linspace(np.log(0.005), np.log(3e4), 301))
    _, _, _, c_noise = precond.iddpm_coeffs(jnp.asarray(s, jnp.float32))
    np.testing.assert_array_equal(999 - np.asarray(c_noise), round_sigma_host(s, grid, return_index=True))
    assert d(jnp.ones((2, 2, 2, 1)), 0.5).shape == (2, 2, 2, 1)
