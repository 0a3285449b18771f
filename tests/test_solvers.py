"""Samplers against independent truth: exact Gaussian-mixture denoisers, closed-form ODE solutions, and
hand-written reference loops (EDM Algorithm 2, scaled-space DDPM, k-diffusion's DPM-Solver++(2M))."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import solvers as S
from jaxdiff import toy
from jaxdiff.denoiser import StatefulDenoiser
from jaxdiff.metrics import sliced_wasserstein
from jaxdiff.schedules import ddpm_alpha_bar, ddpm_sigmas

RING = toy.ring_mixture(8, 4.0, 0.3)
IMAGE = toy.mixture(jax.random.normal(jax.random.key(9), (3, 4, 4, 1)), 0.3)   # 3 components, (4, 4, 1)
PROJ_KEY = jax.random.key(3)

# name -> (sampler, shared kwargs, coarse kwargs, fine kwargs, NFE(kwargs)).
SOLVERS = {
    "edm": (S.edm_sampler, {}, dict(num_steps=5), dict(num_steps=18), lambda k: 2 * k["num_steps"] - 1),
    "edm_churn": (S.edm_sampler, dict(S_churn=10.0), dict(num_steps=5), dict(num_steps=32),
                  lambda k: 2 * k["num_steps"] - 1),
    "euler": (S.euler_sampler, {}, dict(num_steps=5), dict(num_steps=64), lambda k: k["num_steps"]),
    "ddim": (S.ddim_sampler, {}, dict(num_steps=3), dict(num_steps=100), lambda k: k["num_steps"]),
    "ddpm": (S.ddpm_sampler, {}, dict(num_steps=3), dict(num_steps=1000), lambda k: k["num_steps"]),
    "dpm_2m": (S.dpm_solver_pp_2m_sampler, {}, dict(num_steps=5), dict(num_steps=20), lambda k: k["num_steps"]),
    "em_vp": (S.euler_maruyama_sampler, dict(sde="vp"), dict(num_steps=5), dict(num_steps=1000),
              lambda k: k["num_steps"]),
    "em_ve": (S.euler_maruyama_sampler, dict(sde="ve"), dict(num_steps=10), dict(num_steps=1000),
              lambda k: k["num_steps"]),
    "pf_vp": (S.probability_flow_sampler, dict(sde="vp"), dict(num_steps=3), dict(num_steps=50),
              lambda k: 2 * k["num_steps"] - 1),
    "pf_ve": (S.probability_flow_sampler, dict(sde="ve"), dict(num_steps=5), dict(num_steps=50),
              lambda k: 2 * k["num_steps"] - 1),
    "pc_vp": (S.pc_sampler, dict(sde="vp"), dict(num_steps=5), dict(num_steps=1000), lambda k: 2 * k["num_steps"]),
    "pc_ve": (S.pc_sampler, dict(sde="ve"), dict(num_steps=5), dict(num_steps=1000), lambda k: 2 * k["num_steps"]),
    "langevin": (S.annealed_langevin_sampler, dict(step_lr=5e-5), dict(num_levels=10, n_steps_each=1),
                 dict(num_levels=100, n_steps_each=5), lambda k: k["num_levels"] * k["n_steps_each"] + 1),
}
STOCHASTIC = {"edm_churn", "ddpm", "em_vp", "em_ve", "pc_vp", "pc_ve", "langevin"}


def _sw(a, b):
    return float(sliced_wasserstein(a, b, PROJ_KEY))


def _f64(a):
    return np.asarray(a, np.float64)


# ----------------------------------------------------------------------------------------------------------
# Every sampler lands on the mixture, and more steps are better.

@pytest.mark.parametrize("mix", ["ring", "image"])
@pytest.mark.parametrize("name", list(SOLVERS))
def test_lands_on_mixture_and_improves_with_steps(name, mix):
    gm, n = (RING, 4000) if mix == "ring" else (IMAGE, 2000)
    fn, shared, coarse, fine, _ = SOLVERS[name]
    shared = dict(shared)
    true, _ = toy.sample(gm, jax.random.key(1), n)
    baseline = np.mean([_sw(toy.sample(gm, jax.random.key(10 + j), n)[0], true) for j in range(3)])
    z = jax.random.normal(jax.random.key(4), (n,) + gm.event_shape)
    run = lambda kw: fn(toy.denoiser(gm), z, key=jax.random.key(5), **shared, **kw)
    sw_fine, sw_coarse = _sw(run(fine), true), _sw(run(coarse), true)
    print(f"{name} {mix}: baseline {baseline:.4f} coarse {coarse} {sw_coarse:.4f} fine {fine} {sw_fine:.4f}")
    assert sw_fine < 1.5 * baseline
    assert sw_coarse > 3 * sw_fine


def test_edm_deterministic_matches_true_sample_distance():
    n = 4000
    true, _ = toy.sample(RING, jax.random.key(1), n)
    baseline = np.mean([_sw(toy.sample(RING, jax.random.key(10 + j), n)[0], true) for j in range(3)])
    x = S.edm_sampler(toy.denoiser(RING), jax.random.normal(jax.random.key(4), (n, 2)))
    assert _sw(x, true) < 1.3 * baseline
    shares = np.asarray(toy.mode_shares(RING, x))
    np.testing.assert_allclose(shares, 1 / 8, atol=0.02)


def test_conditional_sampling_respects_cond():
    gm = toy.ring_mixture(8, 4.0, 0.3, labels=np.arange(8) % 2)
    cond = jnp.tile(jnp.array([[0.0, 1.0]]), (256, 1))
    x = S.edm_sampler(toy.denoiser(gm), jax.random.normal(jax.random.key(0), (256, 2)), cond=cond)
    post = np.asarray(toy.posterior(gm, x, 0.0))
    assert np.all(post.argmax(1) % 2 == 1)


# ----------------------------------------------------------------------------------------------------------
# Exactness against hand-written references.

def _karras(n, smin=0.002, smax=80.0, rho=7.0):
    """EDM eq. 5 in float64, with the trailing 0."""
    i = np.arange(n, dtype=np.float64)
    return np.append((smax ** (1 / rho) + i / (n - 1) * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho, 0.0)


class _CallLog:
    """A StatefulDenoiser (exact mixture denoiser) whose state counts its calls and records each sigma.

    The state never leaves the sampler, so every apply also reports it to the host with
    jax.debug.callback; the report with the largest count is the state after the last evaluation. If the
    state were not threaded through every evaluation (scan carry, Heun's cond branch, corrector loop), the
    counts would repeat and the maximum would fall short of the number of evaluations.
    """

    def __init__(self, gm, max_calls=4096):
        base = toy.denoiser(gm)
        self.reports = []

        def apply(x, sigma, cond, state):
            count, log = state
            state = (count + 1, log.at[jnp.minimum(count, max_calls - 1)].set(sigma[0]))
            jax.debug.callback(lambda c, l: self.reports.append((int(c), np.asarray(l))), *state)
            return base(x, sigma, cond), state

        self.denoiser = StatefulDenoiser(
            init=lambda x: (jnp.zeros((), jnp.int32), jnp.zeros((max_calls,), jnp.float32)), apply=apply)

    def final(self):
        return max(self.reports, key=lambda r: r[0])


def test_edm_grid_is_karras_formula_and_state_counts_35_calls():
    log = _CallLog(RING, 64)
    S.edm_sampler(log.denoiser, jax.random.normal(jax.random.key(0), (8, 2)))
    count, sigmas = log.final()
    i = np.arange(18, dtype=np.float64)
    t = (80.0 ** (1 / 7) + i / 17 * (0.002 ** (1 / 7) - 80.0 ** (1 / 7))) ** 7   # EDM eq. 5, float64
    expected = np.concatenate([[t[0]], np.repeat(t[1:], 2)])   # Euler at t_i, Heun at t_{i+1}; none at 0
    assert count == 35 and len(log.reports) == 35
    np.testing.assert_allclose(sigmas[:35], expected, rtol=1e-6)


@pytest.mark.parametrize("name", list(SOLVERS))
def test_state_threads_through_every_evaluation(name):
    fn, shared, coarse, _, nfe = SOLVERS[name]
    log = _CallLog(RING)
    fn(log.denoiser, jax.random.normal(jax.random.key(0), (4, 2)), key=jax.random.key(1), **shared, **coarse)
    assert log.final()[0] == nfe(coarse) == len(log.reports)


def _edm_reference(D, z, key, n, S_churn, S_min, S_max, S_noise):
    """EDM Algorithm 2 as a float64 Python loop (the reference's structure), same noise convention."""
    t = _karras(n)
    x = _f64(z) * t[0]
    den = lambda x, s: _f64(D(jnp.asarray(x, jnp.float32), jnp.full((x.shape[0],), s, jnp.float32), None))
    for k in range(n):
        gamma = min(S_churn / n, math.sqrt(2) - 1) if S_min <= t[k] <= S_max else 0.0
        t_hat = t[k] + gamma * t[k]
        eps = _f64(jax.random.normal(jax.random.fold_in(key, k), z.shape))
        x_hat = x + math.sqrt(t_hat ** 2 - t[k] ** 2) * S_noise * eps
        d = (x_hat - den(x_hat, t_hat)) / t_hat
        x = x_hat + (t[k + 1] - t_hat) * d
        if k < n - 1:
            x = x_hat + (t[k + 1] - t_hat) * (0.5 * d + 0.5 * (x - den(x, t[k + 1])) / t[k + 1])
    return x


@pytest.mark.parametrize("churn", [dict(S_churn=0.0, S_min=0.0, S_max=float("inf"), S_noise=1.0),
                                   dict(S_churn=40.0, S_min=0.05, S_max=50.0, S_noise=1.003)])
def test_edm_matches_reference_loop(churn):
    D, z, key = toy.denoiser(RING), jax.random.normal(jax.random.key(0), (16, 2)), jax.random.key(7)
    ref = _edm_reference(D, z, key, 12, **churn)
    x = S.edm_sampler(D, z, key=key, num_steps=12, **churn)
    np.testing.assert_allclose(_f64(x), ref, atol=2e-4)


def test_dpm_solver_pp_2m_matches_k_diffusion_loop():
    D, z = toy.denoiser(IMAGE), jax.random.normal(jax.random.key(0), (8, 4, 4, 1))
    sig = _karras(10)
    x, old = _f64(z) * sig[0], None
    for i in range(10):   # k-diffusion sample_dpmpp_2m, lambda = -log sigma
        den = _f64(D(jnp.asarray(x, jnp.float32), jnp.full((8,), sig[i], jnp.float32), None))
        if sig[i + 1] == 0:
            x = den
        else:
            h = math.log(sig[i] / sig[i + 1])
            if old is not None:
                r = math.log(sig[i - 1] / sig[i]) / h
                den_d = (1 + 1 / (2 * r)) * den - 1 / (2 * r) * old
            else:
                den_d = den
            x = sig[i + 1] / sig[i] * x - math.expm1(-h) * den_d
        old = den
    np.testing.assert_allclose(_f64(S.dpm_solver_pp_2m_sampler(D, z, num_steps=10)), x, atol=2e-4)


@pytest.mark.parametrize("variance,num_steps", [("beta_tilde", 1000), ("beta", 100)])
def test_ddpm_equals_scaled_space_recursion(variance, num_steps):
    """Ho et al. Algorithm 2 in scaled units: x_{t-1} = (x_t - beta_t/sqrt(1-abar_t) eps)/sqrt(alpha_t) + sigma_t z."""
    D, key = toy.denoiser(RING), jax.random.key(11)
    z = jax.random.normal(jax.random.key(0), (16, 2))
    abar_all = ddpm_alpha_bar()
    ts = np.round(np.linspace(999, 0, num_steps)).astype(int)
    abar = np.append(abar_all[ts], 1.0)                          # abar of each visited step, then t = 0
    den = jax.jit(lambda x, s: D(x, s, None))
    x = _f64(z)                                                  # x_T ~ N(0, I) in scaled units
    for i in range(num_steps):
        a_t, a_prev = abar[i], abar[i + 1]
        alpha, sig = a_t / a_prev, math.sqrt((1 - a_t) / a_t)
        beta = 1 - alpha
        xu = x / math.sqrt(a_t)                                   # the denoiser works on unscaled x
        eps = (xu - _f64(den(jnp.asarray(xu, jnp.float32), jnp.full((16,), sig, jnp.float32)))) / sig
        var = beta if variance == "beta" else (1 - a_prev) / (1 - a_t) * beta
        noise = _f64(jax.random.normal(jax.random.fold_in(key, i), z.shape)) if i < num_steps - 1 else 0.0
        x = (x - beta / math.sqrt(1 - a_t) * eps) / math.sqrt(alpha) + math.sqrt(var) * noise
    out = S.ddpm_sampler(D, z, key=key, num_steps=num_steps, variance=variance)
    np.testing.assert_allclose(_f64(out), x, atol=2e-3)
    if variance == "beta_tilde":   # DDPM with beta-tilde *is* DDIM with eta = 1
        np.testing.assert_array_equal(np.asarray(out),
                                      np.asarray(S.ddim_sampler(D, z, key=key, num_steps=num_steps, eta=1.0)))


def test_ddim_eta0_is_euler_on_the_same_grid():
    D, z = toy.denoiser(RING), jax.random.normal(jax.random.key(0), (32, 2))
    sig = ddpm_sigmas(20)
    x_ddim = S.ddim_sampler(D, z, sigmas=sig)
    # DDIM starts at sqrt(1 + sigma_0^2) latents (DDPM's prior); give Euler the same start.
    x_euler = S.euler_sampler(D, z * math.sqrt(1 + sig[0] ** 2) / sig[0], sigmas=sig)
    np.testing.assert_allclose(np.asarray(x_ddim), np.asarray(x_euler), atol=1e-4)


# ----------------------------------------------------------------------------------------------------------
# Convergence order against the closed-form PF-ODE of a single Gaussian N(m, s^2):
# x(sigma) = m + (x(sigma_0) - m) sqrt(s^2 + sigma^2) / sqrt(s^2 + sigma_0^2).

M, S_STD = np.array([1.0, -0.5]), 0.5
GAUSS = toy.mixture(M[None], S_STD)


def _ode_exact(x_start, s0, s1=0.0):
    return M + (_f64(x_start) - M) * math.sqrt(S_STD ** 2 + s1 ** 2) / math.sqrt(S_STD ** 2 + s0 ** 2)


def _errors(run, steps):
    return np.array([run(n) for n in steps])


def test_heun_is_second_order_and_euler_first_order():
    z = jax.random.normal(jax.random.key(0), (64, 2))
    D = toy.denoiser(GAUSS)
    err = lambda f: lambda n: np.abs(_f64(f(D, z, num_steps=n)) - _ode_exact(_f64(z) * 80.0, 80.0)).max()
    heun, euler = _errors(err(S.edm_sampler), (16, 32, 64)), _errors(err(S.euler_sampler), (16, 32, 64))
    print("heun errors", heun, "ratios", heun[:-1] / heun[1:], "euler", euler, euler[:-1] / euler[1:])
    assert np.all(heun[:-1] / heun[1:] > 3.6) and np.all(heun[:-1] / heun[1:] < 5.0)
    assert np.all(euler[:-1] / euler[1:] > 1.8) and np.all(euler[:-1] / euler[1:] < 2.2)


def test_ddim_eta0_converges_to_exact_ode_solution():
    z = jax.random.normal(jax.random.key(0), (64, 2))
    D = toy.denoiser(GAUSS)
    s0 = ddpm_sigmas(10)[0]
    start = _f64(z) * math.sqrt(1 + s0 ** 2)
    err = _errors(lambda n: np.abs(_f64(S.ddim_sampler(D, z, num_steps=n)) - _ode_exact(start, s0)).max(),
                  (10, 20, 40, 80))
    print("ddim errors", err, err[:-1] / err[1:])
    assert np.all(np.diff(err) < 0) and err[-1] < 0.05
    assert np.all(err[:-1] / err[1:] > 1.8)


@pytest.mark.parametrize("sde", ["vp", "ve"])
def test_probability_flow_heun_converges_to_exact_solution(sde):
    """The VP run works on the scaled variable; matching the unscaled closed form checks the conversion."""
    z = jax.random.normal(jax.random.key(0), (64, 2))
    if sde == "vp":
        s0, se = math.sqrt(math.expm1(0.5 * 19.9 + 0.1)), math.sqrt(math.expm1(0.5 * 19.9 * 1e-6 + 0.1 * 1e-3))
        start = _f64(z) * math.sqrt(1 + s0 ** 2)      # x_s(1) = latents, unscaled x = x_s / s(1)
    else:
        s0, se = 50.0, 0.01 * 5000.0 ** 1e-5
        start = _f64(z) * 50.0
    x_eps = _ode_exact(start, s0, se)
    exact = M + S_STD ** 2 / (S_STD ** 2 + se ** 2) * (x_eps - M)   # the final Tweedie denoise at eps_t
    run = lambda n: np.abs(_f64(S.probability_flow_sampler(toy.denoiser(GAUSS), z, sde=sde, num_steps=n))
                           - exact).max()
    err = _errors(run, (20, 40, 80))
    print(sde, "pf errors", err, err[:-1] / err[1:])
    assert np.all(err[:-1] / err[1:] > 3.5)


@pytest.mark.parametrize("name", ["ddpm", "em_vp", "em_ve", "pc_vp", "pc_ve", "langevin"])
def test_stochastic_samplers_match_gaussian_moments(name):
    fn, shared, _, fine, _ = SOLVERS[name]
    z = jax.random.normal(jax.random.key(0), (8000, 2))
    x = _f64(fn(toy.denoiser(GAUSS), z, key=jax.random.key(1), **shared, **fine))
    np.testing.assert_allclose(x.mean(0), M, atol=0.03)
    np.testing.assert_allclose(x.std(0), S_STD, rtol=0.05)


@pytest.mark.parametrize("sde", ["vp", "ve"])
def test_pc_snr_norm_modes_on_16d_gaussian(sde):
    """Without corrector PC is exact on a Gaussian; score_sde's batch norms and the per-level 'expected'
    step keep it so (a per-sample-norm step, not offered, widens it by ~12% at snr 0.16)."""
    z = jax.random.normal(jax.random.key(4), (4000, 16))
    D = toy.denoiser(toy.mixture(np.zeros((1, 16)), 0.3))
    std = lambda **kw: float(np.std(_f64(S.pc_sampler(D, z, key=jax.random.key(5), sde=sde, num_steps=300,
                                                       **kw))))
    assert abs(std(n_steps=0) / 0.3 - 1) < 0.02
    assert abs(std(snr_norm="batch") / 0.3 - 1) < 0.02
    assert abs(std(snr_norm="expected") / 0.3 - 1) < 0.02


# ----------------------------------------------------------------------------------------------------------
# Randomness, jit, dtypes, errors.

@pytest.mark.parametrize("name", sorted(STOCHASTIC | {"ddim_eta"}))
def test_per_sample_keys_are_batch_independent(name):
    if name == "ddim_eta":
        fn, shared, kw = S.ddim_sampler, dict(eta=0.7), dict(num_steps=20)
    else:
        fn, shared, _, kw, _ = SOLVERS[name]
        kw = {k: min(v, 40) for k, v in kw.items()}   # the fine setting, capped for speed
        if name.startswith("pc"):
            shared = dict(shared, snr_norm="expected")   # 'batch' (the reference) couples a batch by design
    D = toy.denoiser(IMAGE)
    keys = jax.random.split(jax.random.key(42), 6)
    z = jax.random.normal(jax.random.key(0), (6,) + IMAGE.event_shape)
    full = np.asarray(fn(D, z, key=keys, **shared, **kw))
    perm = np.array([4, 1, 5])
    part = np.asarray(fn(D, z[perm], key=keys[perm], **shared, **kw))
    np.testing.assert_allclose(part, full[perm], atol=1e-5)
    assert not np.allclose(full[0], full[1])
    # One key for the whole batch is a different, equally valid stream; raw uint32 keys work too.
    raw = np.asarray(fn(D, z, key=jax.random.PRNGKey(42), **shared, **kw))
    assert raw.shape == full.shape and np.all(np.isfinite(raw))


@pytest.mark.parametrize("name", list(SOLVERS))
def test_jit_traces_once_per_shape(name):
    fn, shared, coarse, _, _ = SOLVERS[name]
    calls = [0]

    def D(x, sigma, cond):
        calls[0] += 1            # runs only while tracing
        return toy.denoise(RING, x, sigma, cond)

    f = jax.jit(lambda z, k: fn(D, z, key=k, **shared, **coarse))
    f(jnp.zeros((4, 2)), jax.random.key(0))
    traced = calls[0]
    f(jnp.ones((4, 2)), jax.random.key(1))
    assert calls[0] == traced > 0
    f(jnp.ones((6, 2)), jax.random.key(1))
    assert calls[0] == 2 * traced


@pytest.mark.parametrize("name", list(SOLVERS))
def test_dtype_and_shape_preserved(name):
    fn, shared, coarse, _, _ = SOLVERS[name]
    z = jax.random.normal(jax.random.key(0), (3,) + IMAGE.event_shape).astype(jnp.bfloat16)
    x = fn(toy.denoiser(IMAGE), z, key=jax.random.key(1), **shared, **coarse)
    assert x.shape == z.shape and x.dtype == jnp.bfloat16


@pytest.mark.parametrize("call", [
    lambda D, z: S.edm_sampler(D, z, S_churn=10.0),
    lambda D, z: S.euler_sampler(D, z, S_churn=10.0),
    lambda D, z: S.ddim_sampler(D, z, eta=0.5),
    lambda D, z: S.ddpm_sampler(D, z, num_steps=10),
    lambda D, z: S.euler_maruyama_sampler(D, z, num_steps=10),
    lambda D, z: S.pc_sampler(D, z, num_steps=10),
    lambda D, z: S.annealed_langevin_sampler(D, z, num_levels=5),
])
def test_stochastic_settings_need_a_key(call):
    with pytest.raises(ValueError, match="key"):
        call(toy.denoiser(RING), jnp.zeros((2, 2)))


def test_deterministic_settings_accept_no_key_and_bad_inputs_are_rejected():
    D, z = toy.denoiser(RING), jnp.zeros((2, 2))
    for f in (S.edm_sampler, S.euler_sampler, S.ddim_sampler, S.dpm_solver_pp_2m_sampler,
              S.probability_flow_sampler):
        assert np.all(np.isfinite(np.asarray(f(D, z, num_steps=4))))
    with pytest.raises(ValueError, match="decreasing"):
        S.heun_sampler(D, z, np.array([1.0, 2.0, 0.0]))
    with pytest.raises(ValueError, match="per-sample keys"):
        S.ddpm_sampler(D, z, key=jax.random.split(jax.random.key(0), 3), num_steps=5)
    with pytest.raises(ValueError, match="sde"):
        S.euler_maruyama_sampler(D, z, key=jax.random.key(0), sde="subvp")
    with pytest.raises(ValueError, match="predictor"):
        S.pc_sampler(D, z, key=jax.random.key(0), predictor="ancestral")
