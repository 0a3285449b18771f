"""Sigma grids and parametrisations against their formulas, computed independently with math."""
import math

import numpy as np
import pytest

from jaxdiff import schedules as S
from jaxdiff.transforms.trajectory import progress


def test_karras_grid_matches_formula():
    n, smin, smax, rho = 18, 0.002, 80.0, 7.0
    grid = S.karras_sigmas(n, smin, smax, rho)
    assert grid.shape == (n + 1,) and grid[-1] == 0.0
    for i in range(n):
        want = (smax ** (1 / rho) + i / (n - 1) * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
        assert grid[i] == pytest.approx(want, rel=1e-12)
    assert grid[0] == pytest.approx(80.0) and grid[n - 1] == pytest.approx(0.002)
    assert np.all(np.diff(grid) < 0)


def test_vp_sigma_and_inverse():
    for t in [1e-5, 1e-3, 0.3, 1.0]:
        want = math.sqrt(math.exp(0.5 * 19.9 * t * t + 0.1 * t) - 1)
        got = float(S.vp_sigma(np.float64(t)))
        assert got == pytest.approx(want, rel=1e-10)
        assert float(S.vp_sigma_inv(np.float64(got))) == pytest.approx(t, rel=1e-8)
    # Derivative against a central finite difference.
    t, h = 0.4, 1e-6
    fd = (float(S.vp_sigma(np.float64(t + h))) - float(S.vp_sigma(np.float64(t - h)))) / (2 * h)
    assert float(S.vp_sigma_deriv(np.float64(t))) == pytest.approx(fd, rel=1e-6)


def test_ve_and_vp_grids():
    ve = S.ve_sigmas(4, 0.02, 100.0)
    np.testing.assert_allclose(ve[:-1], [100.0, 100 * (0.0002) ** (1 / 3), 100 * (0.0002) ** (2 / 3), 0.02])
    vp = S.vp_sigmas(3, epsilon_s=1e-3)
    np.testing.assert_allclose(vp[:-1], [math.sqrt(math.expm1(0.5 * 19.9 * t * t + 0.1 * t))
                                         for t in (1.0, (1 + 1e-3) / 2, 1e-3)])
    assert float(S.ve_sigma(np.float64(4.0))) == 2.0 and S.ve_sigma_inv(3.0) == 9.0


def test_iddpm_grid_endpoints():
    u = S.iddpm_u()
    assert u.shape == (1001,) and u[1000] == 0.0
    # u_999 from the recursion with u_1000 = 0: sqrt(1 / max(abar(999)/abar(1000), C1) - 1).
    ab = lambda j: math.sin(0.5 * math.pi * j / 1000 / 1.008) ** 2
    assert u[999] == pytest.approx(math.sqrt(1 / max(ab(999) / ab(1000), 0.001) - 1), rel=1e-10)
    grid = S.iddpm_sigmas(10)
    assert np.all(np.isin(grid[:-1], u)) and grid[0] <= 81 and grid[-2] >= 0.002


def test_ddpm_grid():
    betas = np.linspace(1e-4, 0.02, 1000)
    abar = np.cumprod(1 - betas)
    grid = S.ddpm_sigmas(1000)
    np.testing.assert_allclose(grid[:-1], np.sqrt((1 - abar) / abar)[::-1], rtol=1e-10)


def test_progress_endpoints():
    assert float(progress(80.0)) == 0.0 and float(progress(0.002)) == pytest.approx(1.0)
    grid = S.karras_sigmas(5)
    np.testing.assert_allclose(np.asarray(progress(grid[:-1].astype(np.float32))), np.linspace(0, 1, 5), atol=1e-5)


def test_bad_steps():
    with pytest.raises(ValueError, match="num_steps"):
        S.karras_sigmas(0)
