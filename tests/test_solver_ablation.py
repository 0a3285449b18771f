"""EDM's ablation sampler and iDDPM grid rounding against float64 numpy transcriptions of NVlabs/edm's
generate.py loops (edm_sampler, ablation_sampler) with the reference's net.round_sigma / net.sigma_min/max.

Oracles: the exact Gaussian-mixture denoiser (written again here in float64 numpy) and, for iDDPM, a tiny
deterministic stand-in F behind iDDPM preconditioning, so c_in, c_out and c_noise all matter. The full product
of choices runs through one jitted ``run_plan`` per (heun, stochastic) pair: plans are data, not constants.
"""
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import precond, schedules, toy
from jaxdiff import solvers as S
from jaxdiff.denoiser import StatefulDenoiser, sigma_grid
from jaxdiff.sampling import options
from jaxdiff.solvers import ablation

MEANS = np.array([[2.0, 1.0], [-1.5, 0.5], [0.3, -2.0]])
STD = 0.4
GM = toy.mixture(MEANS, STD)
DEN = toy.denoiser(GM)
Z = jax.random.normal(jax.random.key(0), (6, 2))
KEY = jax.random.key(7)


def _f64(a):
    return np.asarray(a, np.float64)


def _gm_denoise(x, sigma):
    """Exact E[x0 | x] of the 3-component isotropic mixture in float64; x (B, 2), sigma scalar."""
    var = STD ** 2 + sigma ** 2
    logits = -0.5 * np.sum((x[:, None] - MEANS) ** 2, -1) / var
    post = np.exp(logits - logits.max(1, keepdims=True))
    post /= post.sum(1, keepdims=True)
    return np.einsum("bk,bkd->bd", post, MEANS + STD ** 2 / var * (x[:, None] - MEANS))


class _Net:
    """The reference's view of a network: D(x, sigma) plus round_sigma and the supported sigma range."""

    def __init__(self, denoise, round_sigma=lambda s: np.asarray(s, np.float64), lo=0.0, hi=math.inf):
        self.denoise, self.round_sigma, self.sigma_min, self.sigma_max = denoise, round_sigma, lo, hi


def _noise(i, shape):
    return _f64(jax.random.normal(jax.random.fold_in(KEY, i), shape))   # jaxdiff's draw for step i


# ----------------------------------------------------------------------------------------------------------
# Float64 transcriptions of the reference loops (generate.py), written out step by step.

def _ref_edm(net, z, num_steps, sigma_min=0.002, sigma_max=80.0, rho=7.0, S_churn=0.0, S_min=0.0,
             S_max=math.inf, S_noise=1.0):
    lo, hi = max(sigma_min, net.sigma_min), min(sigma_max, net.sigma_max)
    i = np.arange(num_steps, dtype=np.float64)
    t = (hi ** (1 / rho) + i / (num_steps - 1) * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
    t = np.append(net.round_sigma(t), 0.0)                                   # rounded, then t_N = 0
    x = _f64(z) * t[0]
    for k in range(num_steps):
        g = min(S_churn / num_steps, math.sqrt(2) - 1) if S_min <= t[k] <= S_max else 0.0
        th = float(net.round_sigma(t[k] + g * t[k]))                        # t_hat rounded too
        xh = x + math.sqrt(th ** 2 - t[k] ** 2) * S_noise * _noise(k, x.shape)
        d = (xh - net.denoise(xh, th)) / th
        x = xh + (t[k + 1] - th) * d
        if k < num_steps - 1:                                               # t_next: from the rounded grid
            x = xh + (t[k + 1] - th) * (0.5 * d + 0.5 * (x - net.denoise(x, t[k + 1])) / t[k + 1])
    return x


def _ref_ablation(net, z, num_steps, sigma_min=None, sigma_max=None, rho=7.0, solver="heun",
                  discretization="edm", schedule="linear", scaling="none", epsilon_s=1e-3, C_1=0.001,
                  C_2=0.008, M=1000, alpha=1.0, S_churn=0.0, S_min=0.0, S_max=math.inf, S_noise=1.0):
    vp_sig = lambda bd, bm: (lambda t: np.sqrt(np.exp(0.5 * bd * t ** 2 + bm * t) - 1))
    if sigma_min is None:
        sigma_min = {"vp": vp_sig(19.9, 0.1)(epsilon_s), "ve": 0.02, "iddpm": 0.002, "edm": 0.002}[discretization]
    if sigma_max is None:
        sigma_max = {"vp": vp_sig(19.9, 0.1)(1.0), "ve": 100.0, "iddpm": 81.0, "edm": 80.0}[discretization]
    sigma_min, sigma_max = max(sigma_min, net.sigma_min), min(sigma_max, net.sigma_max)
    bd = 2 * (np.log(sigma_min ** 2 + 1) / epsilon_s - np.log(sigma_max ** 2 + 1)) / (epsilon_s - 1)
    bm = np.log(sigma_max ** 2 + 1) - 0.5 * bd
    i = np.arange(num_steps, dtype=np.float64)
    ramp = i / (num_steps - 1)
    if discretization == "vp":
        sig_steps = vp_sig(bd, bm)(1 + ramp * (epsilon_s - 1))
    elif discretization == "ve":
        sig_steps = np.sqrt(sigma_max ** 2 * (sigma_min ** 2 / sigma_max ** 2) ** ramp)
    elif discretization == "iddpm":
        u = np.zeros(M + 1)
        f = np.float32   # the reference's j is an int64 tensor: abar and its ratio are float32, u float64
        abar = lambda j: np.sin(f(0.5 * np.pi) * f(j) / f(M) / f(C_2 + 1)) ** 2
        for j in range(M, 0, -1):
            u[j - 1] = np.sqrt((u[j] ** 2 + 1) / np.float64(max(abar(j - 1) / abar(j), f(C_1))) - 1)
        kept = u[(u >= sigma_min) & (u <= sigma_max)]
        sig_steps = kept[np.round((len(kept) - 1) / (num_steps - 1) * i).astype(np.int64)]
    else:
        sig_steps = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    if schedule == "vp":
        sig = vp_sig(bd, bm)
        dsig = lambda t: 0.5 * (bm + bd * t) * (sig(t) + 1 / sig(t))
        inv = lambda s: (np.sqrt(bm ** 2 + 2 * bd * np.log(s ** 2 + 1)) - bm) / bd
    elif schedule == "ve":
        sig, dsig, inv = np.sqrt, (lambda t: 0.5 / np.sqrt(t)), (lambda s: s ** 2)
    else:
        sig, dsig, inv = (lambda t: t), (lambda t: 1.0), (lambda s: s)
    if scaling == "vp":
        sc = lambda t: 1 / np.sqrt(1 + sig(t) ** 2)
        dsc = lambda t: -sig(t) * dsig(t) * sc(t) ** 3
    else:
        sc, dsc = (lambda t: 1.0), (lambda t: 0.0)
    drift = lambda x, t: ((dsig(t) / sig(t) + dsc(t) / sc(t)) * x
                          - dsig(t) * sc(t) / sig(t) * net.denoise(x / sc(t), sig(t)))
    t = np.append(inv(net.round_sigma(sig_steps)), 0.0)
    x = _f64(z) * (sig(t[0]) * sc(t[0]))
    for k in range(num_steps):
        g = min(S_churn / num_steps, math.sqrt(2) - 1) if S_min <= sig(t[k]) <= S_max else 0.0
        th = inv(float(net.round_sigma(sig(t[k]) + g * sig(t[k]))))
        xh = (sc(th) / sc(t[k]) * x
              + math.sqrt(max(sig(th) ** 2 - sig(t[k]) ** 2, 0.0)) * sc(th) * S_noise * _noise(k, x.shape))
        h = t[k + 1] - th
        d = drift(xh, th)
        if solver == "euler" or k == num_steps - 1:
            x = xh + h * d
        else:
            tp = th + alpha * h
            x = xh + h * ((1 - 1 / (2 * alpha)) * d + 1 / (2 * alpha) * drift(xh + alpha * h * d, tp))
    return x


# ----------------------------------------------------------------------------------------------------------
# (7) The ablation sampler, every combination.

PRODUCT = list(itertools.product(ablation.ODE_SOLVERS, ablation.DISCRETIZATIONS, ablation.SCHEDULES,
                                 ablation.SCALINGS))

_RUNNERS = {}


def _run(den, plan, key=None):
    """run_plan jitted once per (denoiser, heun, stochastic): the plan's numbers are arguments."""
    tag = (id(den), plan.heun, plan.stochastic)
    if tag not in _RUNNERS:
        _RUNNERS[tag] = jax.jit(lambda z, start, steps, k: ablation.run_plan(
            den, z, ablation.AblationPlan(start, steps, plan.heun, plan.stochastic), key=k))
    return _f64(_RUNNERS[tag](Z, plan.start, plan.steps, key))


def _tolerance(ref, rel=2e-4):
    return rel * max(1.0, float(np.abs(ref).max()))


def _execute64(plan, den):
    """run_plan's deterministic step written out in float64 numpy: the plan's formulas without float32 rounding."""
    st, x = plan.steps, _f64(Z) * plan.start
    for i in range(len(st["h"])):
        drift = lambda y, at: (st["a_" + at][i] * y
                               - st["b_" + at][i] * den(y * st["inv_s_" + at][i], st["sig_" + at][i]))
        xh = st["ratio"][i] * x
        d = drift(xh, "hat")
        w = st["w_prime"][i]
        x = (xh + st["h"][i] * ((1 - w) * d + w * drift(xh + st["alpha_h"][i] * d, "prime")) if st["correct"][i]
             else xh + st["h"][i] * d)
    return x


def test_full_product_matches_reference_loop():
    """Every solver x discretization x schedule x scaling (and alpha 0.6), 4 steps: the plan reproduces the
    reference in float64 to 1e-9 (1e-5 for 'iddpm', whose float32 alpha-bar goes through another float32 sin
    than this file's, an ulp apart); the jitted float32 run to 5e-3 relative (4-step Heun on sigma(t) = sqrt(t)
    divides x - D by 2 t_next ~ 1e-5, which magnifies float32 rounding of the O(1) denoiser output)."""
    net = _Net(_gm_denoise)
    for combo in PRODUCT:
        kw = dict(zip(("ode_solver", "discretization", "schedule", "scaling"), combo))
        for alpha in ((1.0, 0.6) if combo[0] == "heun" else (1.0,)):
            plan = ablation.ablation_plan(num_steps=4, alpha=alpha, **kw)
            ref = _ref_ablation(net, Z, 4, solver=combo[0], alpha=alpha, **dict(list(kw.items())[1:]))
            msg = f"{combo} alpha={alpha}"
            exact = _tolerance(ref, 1e-5 if combo[1] == "iddpm" else 1e-9)
            np.testing.assert_allclose(_execute64(plan, _gm_denoise), ref, atol=exact, err_msg=msg)
            np.testing.assert_allclose(_run(DEN, plan), ref, atol=_tolerance(ref, 5e-3), err_msg=msg)


@pytest.mark.parametrize("preset", list(ablation.PRESETS))
def test_presets_through_public_sampler_match_reference(preset):
    """Table 1's samplers through ablation_sampler itself (12 steps)."""
    kw = ablation.PRESETS[preset]
    ref = _ref_ablation(_Net(_gm_denoise), Z, 12, solver=kw["ode_solver"], **dict(list(kw.items())[1:]))
    got = _f64(S.ablation_sampler(DEN, Z, num_steps=12, **kw))
    np.testing.assert_allclose(got, ref, atol=_tolerance(ref))


@pytest.mark.parametrize("combo", [("heun", "edm", "linear", "none"), ("euler", "vp", "vp", "vp"),
                                   ("heun", "ve", "ve", "none"), ("heun", "iddpm", "vp", "vp")])
def test_churn_matches_reference_loop(combo):
    kw = dict(zip(("ode_solver", "discretization", "schedule", "scaling"), combo))
    churn = dict(S_churn=6.0, S_min=0.05, S_max=50.0, S_noise=1.003)
    plan = ablation.ablation_plan(num_steps=5, **kw, **churn)
    assert plan.stochastic
    ref = _ref_ablation(_Net(_gm_denoise), Z, 5, solver=combo[0], **dict(list(kw.items())[1:]), **churn)
    np.testing.assert_allclose(_run(DEN, plan, KEY), ref, atol=_tolerance(ref))


def test_edm_preset_equals_edm_sampler_plan_and_sample_py_registration():
    plan = ablation.ablation_plan(num_steps=18, **ablation.PRESETS["edm"])
    sig = schedules.karras_sigmas(18)
    np.testing.assert_allclose(plan.steps["sig_hat"], sig[:-1], rtol=1e-12)
    np.testing.assert_allclose(plan.steps["h"], np.diff(sig), rtol=1e-12)
    assert plan.start == sig[0] and plan.heun and not plan.stochastic and plan.steps["correct"].sum() == 17
    assert options.SOLVERS["ablation"] is S.ablation_sampler
    resolved = options.resolve_solver("ablation", {"discretization": "ve", "ode_solver": "euler"},
                                      precond.VE_SIGMA_RANGE)
    assert (resolved["sigma_min"], resolved["sigma_max"]) == (0.02, 100.0)
    resolved = options.resolve_solver("ablation", {"discretization": "vp"}, precond.VP_SIGMA_RANGE)
    assert resolved["sigma_min"] == pytest.approx(float(schedules.vp_sigma(1e-3)))
    assert resolved["sigma_max"] == pytest.approx(float(schedules.vp_sigma(1.0)))
    assert options.resolve_solver("ablation", {}, (0.02, 100.0))["sigma_min"] == 0.02   # clipped like edm
    with pytest.raises(ValueError, match="takes no option"):
        options.resolve_solver("ablation", {"solver": "euler"}, (0.0, math.inf))


def test_nfe_state_dtype_and_errors():
    calls = []

    def apply(x, sigma, cond, state):
        jax.debug.callback(lambda c: calls.append(int(c)), state + 1)
        return toy.denoise(GM, x, sigma, cond), state + 1

    counted = StatefulDenoiser(lambda x: jnp.zeros((), jnp.int32), apply)
    keys = jax.random.split(KEY, 3)
    z = Z[:3].astype(jnp.bfloat16)
    x = S.ablation_sampler(counted, z, key=keys, num_steps=4, S_churn=5.0)
    assert x.dtype == jnp.bfloat16 and x.shape == z.shape and max(calls) == len(calls) == 7
    with pytest.raises(ValueError, match="key"):
        S.ablation_sampler(toy.denoiser(GM), Z, num_steps=5, S_churn=5.0)
    for bad in (dict(ode_solver="rk4"), dict(discretization="cosine"), dict(schedule="x"), dict(scaling="ve"),
                dict(alpha=0.0), dict(sigma_min=5.0, sigma_max=1.0)):
        with pytest.raises(ValueError):
            ablation.ablation_plan(num_steps=4, **bad)


# ----------------------------------------------------------------------------------------------------------
# (6) iDDPM: the reference rounds the grid and t_hat with net.round_sigma (the net's float32 u buffer).

def _u_float32(M=1000, C_1=0.001, C_2=0.008):
    """iDDPMPrecond's u buffer: the same recursion evaluated in float32, as the reference's torch module."""
    f = np.float32
    abar = lambda j: np.sin(f(0.5 * np.pi) * f(j) / f(M) / f(C_2 + 1)) ** 2
    u = np.zeros(M + 1, np.float32)
    for j in range(M, 0, -1):
        u[j - 1] = np.sqrt((u[j] ** 2 + f(1)) / max(abar(j - 1) / abar(j), f(C_1)) - f(1))
    return u


U32 = _u_float32()


def _round_ref(sigma):
    s = np.asarray(sigma, np.float64)
    return U32[np.argmin(np.abs(s.astype(np.float32)[..., None] - U32), -1)].astype(np.float64)


def _F(x_in, c_noise, cond=None):
    """Stand-in for iDDPM's network: depends on c_in*x and (strongly) on the integer noise label c_noise."""
    c = c_noise.reshape((-1,) + (1,) * (x_in.ndim - 1))
    return jnp.tanh(x_in * (1 + c / 500.0)) + 0.002 * c - 0.5 * x_in


def _ref_iddpm_net():
    def den(x, sigma):
        j = np.argmin(np.abs(np.float32(sigma) - U32))
        return x - sigma * _f64(_F(jnp.asarray(x / math.sqrt(sigma ** 2 + 1), jnp.float32),
                                   jnp.full((x.shape[0],), 999 - j, jnp.float32)))
    return _Net(den, _round_ref, float(U32[999]), float(U32[0]))


IDDPM = precond.iddpm_precondition(_F)


def test_iddpm_denoiser_declares_its_grid():
    grid = sigma_grid(IDDPM)
    assert grid.shape == (1001,) and grid[-1] == 0.0
    np.testing.assert_allclose(grid, U32, rtol=1e-5)   # float32 recursion (sin may differ by an ulp)
    lo, hi = precond.iddpm_sigma_range()
    assert (lo, hi) == (float(np.float32(grid[999])), float(np.float32(grid[0])))
    s = np.exp(np.linspace(np.log(0.003), np.log(2e4), 257))
    idx = schedules.round_sigma_host(s, grid, return_index=True)
    np.testing.assert_array_equal(idx, np.asarray(schedules.round_sigma_to_grid(s, grid, return_index=True)))
    assert sigma_grid(toy.denoiser(GM)) is None


@pytest.mark.parametrize("churn", [dict(), dict(S_churn=30.0, S_min=0.05, S_max=50.0, S_noise=1.003)])
def test_edm_sampler_rounds_grid_and_t_hat_like_reference(churn):
    ref = _ref_edm(_ref_iddpm_net(), Z, 8, **churn)
    got = _f64(S.edm_sampler(IDDPM, Z, key=KEY, num_steps=8, **churn))
    np.testing.assert_allclose(got, ref, atol=_tolerance(ref))
    if not churn:   # without the grid declaration c_in / c_out see off-grid sigmas: visibly different
        plain = _f64(S.edm_sampler(IDDPM.denoiser, Z, num_steps=8, sigma_min=float(U32[999])))
        assert np.abs(plain - ref).max() > 20 * _tolerance(ref)


@pytest.mark.parametrize("combo", [("euler", "iddpm", "linear", "none"), ("heun", "edm", "vp", "vp")])
def test_ablation_sampler_rounds_to_iddpm_grid_like_reference(combo):
    kw = dict(zip(("ode_solver", "discretization", "schedule", "scaling"), combo))
    churn = dict(S_churn=20.0, S_min=0.05, S_max=50.0)
    ref = _ref_ablation(_ref_iddpm_net(), Z, 8, solver=combo[0], **dict(list(kw.items())[1:]), **churn)
    got = _f64(S.ablation_sampler(IDDPM, Z, key=KEY, num_steps=8, **kw, **churn))
    np.testing.assert_allclose(got, ref, atol=_tolerance(ref))


def test_heun_sampler_rejects_grid_rounding_to_zero():
    with pytest.raises(ValueError, match="rounds to 0"):
        S.heun_sampler(IDDPM, Z, np.array([1.0, 0.001, 0.0]))
