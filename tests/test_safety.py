"""Safety transforms on the 8-mode ring (radius 4, std 0.3) with modes 0 and 1 unsafe (25% of the mass).

The exact mixture denoiser is the oracle: the ideal safe sampler draws from the safe sub-mixture, where each
of the six safe modes has share 1/6.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import schedules, toy
from jaxdiff import transforms as G
from jaxdiff.transforms import densities
from jaxdiff.transforms.safe_denoiser import (_fresh_noise, _state_hash, calibrate_threshold, exact_beta,
                                             exact_safe_denoiser, paper_safe_denoiser, practical_safe_denoiser,
                                         practical_unsafe_mean, sub_mixture)
from jaxdiff.transforms.safe_guidance import safe_classifier_guidance, safe_log_prob
from jaxdiff.transforms.sld import PRESETS, sld
from jaxdiff.transforms.unguidance import negative_classifier_guidance, unguidance
from jaxdiff.solvers import ddim_sampler, edm_sampler
from jaxdiff.solvers._scan import step_noise
from jaxdiff.transforms.trajectory import ddim_mean_coef, next_level, shift_x0

UNSAFE = [0, 1]
# Class 1 marks the unsafe modes: SLD's safety concept and CFG's condition need labels.
GM = toy.ring_mixture(8, 4.0, 0.3, labels=[1, 1, 0, 0, 0, 0, 0, 0], num_classes=2)
D = toy.denoiser(GM)
LATENTS = jax.random.normal(jax.random.key(0), (4000, 2))
GRID = schedules.karras_sigmas(18)
SAFETY_COND = jnp.array([[0.0, 1.0]])
HARM = densities.mixture_density(GM, UNSAFE, smoothing=1.0)
REFS = toy.sample(sub_mixture(GM, UNSAFE), jax.random.key(2), 256)[0]


def _shares(denoiser):
    x = jax.jit(lambda z: edm_sampler(denoiser, z, num_steps=18))(LATENTS)
    return np.asarray(toy.mode_shares(GM, x))


def _assert_safe_and_balanced(shares):
    assert shares[UNSAFE].sum() <= 0.03, shares
    np.testing.assert_allclose(shares[2:], 1 / 6, rtol=0.2)


def test_baseline_has_a_quarter_unsafe():
    assert 0.22 <= _shares(D)[UNSAFE].sum() <= 0.28


# --- densities

def test_classifier_density_is_the_unsafe_softmax_mass():
    logits = jnp.array([[0.0, 1.0, 2.0], [3.0, -1.0, 0.5]])
    p = densities.classifier_density(lambda x: x, [1, 2])(logits)
    np.testing.assert_allclose(p, jax.nn.softmax(logits)[:, 1:].sum(-1), rtol=1e-6)


def test_concept_density_reductions():
    concepts = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    x = jnp.array([[2.0, 1.0], [0.3, 0.9]])
    cos = np.asarray((x / jnp.linalg.norm(x, axis=1, keepdims=True)) @
                     (concepts / jnp.linalg.norm(concepts, axis=1, keepdims=True)).T)
    dens = lambda **kw: np.asarray(densities.concept_density(lambda z: z, concepts, **kw)(x))
    np.testing.assert_allclose(dens(reduce="mean"), cos.mean(1), rtol=1e-6)
    np.testing.assert_allclose(dens(reduce="max"), cos.max(1), rtol=1e-6)
    np.testing.assert_allclose(dens(reduce="topk", k=2), np.sort(cos, 1)[:, 1:].mean(1), rtol=1e-6)
    np.testing.assert_allclose(dens(reduce="topk", k=3), dens(reduce="mean"), rtol=1e-6)
    with pytest.raises(ValueError, match="1 <= k <= M"):
        densities.concept_density(lambda z: z, concepts, reduce="topk", k=4)


def test_mixture_density_is_the_unsafe_posterior_mass():
    p = densities.mixture_density(GM, UNSAFE)(GM.means)
    np.testing.assert_allclose(p, [1, 1, 0, 0, 0, 0, 0, 0], atol=1e-6)


# --- unguidance

def test_unguidance_removes_unsafe_mass_and_keeps_safe_shares():
    # eta above the 0.25 the density takes at the ring's centre: early, undecided samples are not pushed.
    _assert_safe_and_balanced(_shares(unguidance(HARM, gamma=30.0, eta=0.3, gamma_schedule="invlinear")(D)))


def test_unguidance_leaves_samples_below_threshold_bitwise_untouched():
    x = jax.random.normal(jax.random.key(3), (256, 2)) * 4
    sigma = 0.5
    plain, guided = D(x, sigma), unguidance(HARM, gamma=5.0, eta=0.3)(D)(x, sigma)
    below = np.asarray(HARM(plain) < 0.3)
    assert 0 < below.sum() < below.size
    assert np.array_equal(np.asarray(guided)[below], np.asarray(plain)[below])
    assert np.all(np.any(np.asarray(guided)[~below] != np.asarray(plain)[~below], axis=1))


def test_multi_concept_gate_fires_when_any_concept_passes():
    concepts = jnp.array([[1.0, 0.0], [0.0, 1.0]])
    x = jnp.array([[1.0, 0.05]])  # close to concept 0 only: mean ~0.5, max ~1
    mean = densities.concept_density(lambda z: z, concepts, "mean")
    gate = densities.concept_density(lambda z: z, concepts, "max")
    ident = lambda z, s, c=None: z
    assert np.array_equal(unguidance(mean, 1.0, eta=0.8)(ident)(x, 1.0), x)
    assert not np.array_equal(unguidance(mean, 1.0, eta=0.8, gate=gate)(ident)(x, 1.0), x)


def _seed_ddim_step(x_t, eps, x0, corr, abar, abar_prev, eta, z):
    """The seed's update by hand in float64, scaled variables: x_t is VP-scaled; returns the scaled x_{t-1}."""
    s_t = eta * np.sqrt((1 - abar_prev) / (1 - abar)) * np.sqrt(1 - abar / abar_prev)
    return np.sqrt(abar_prev) * (x0 - corr) + np.sqrt(1 - abar_prev - s_t ** 2) * eps + s_t * z


@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_unguidance_ddim_step_is_the_seeds_update(eta):
    # One DDIM step sigma -> sigma' (abar = 1 / (1 + sigma^2)) with a fixed noise draw, against the seed's formula
    # x_{t-1} = sqrt(abar') (x0_hat - gamma grad) + sqrt(1 - abar' - s_t^2) eps_theta(x_t) + s_t z from
    # eps_theta(x_t) and grad_{x0} log p_h(x0_hat) of the model at x_t.
    sig, sig_next, gamma = 2.0, 1.2, 3.0
    latents = jax.random.normal(jax.random.key(7), (64, 2))  # = x_t in scaled units: ddim starts there
    key = jax.random.key(8)
    grid = np.array([sig, sig_next])
    guided = unguidance(HARM, gamma, eta=0.0, grid=grid, ddim_eta=eta)(D)
    got = np.asarray(ddim_sampler(guided, latents, sigmas=grid, eta=eta, key=key), np.float64)
    x = latents * np.sqrt(1 + sig ** 2)  # unscaled x_t
    x0 = D(x, sig)
    grad = jax.grad(lambda z: jnp.sum(jnp.log(HARM(z))))(x0)
    x0, grad = np.asarray(x0, np.float64), np.asarray(grad, np.float64)
    eps = (np.asarray(x, np.float64) - x0) / sig
    abar, abar_prev = 1 / (1 + sig ** 2), 1 / (1 + sig_next ** 2)
    z = np.asarray(step_noise(key, 0, latents), np.float64)
    want = _seed_ddim_step(np.asarray(latents, np.float64), eps, x0, gamma * grad, abar, abar_prev, eta, z)
    np.testing.assert_allclose(got * np.sqrt(abar_prev), want, atol=2e-5)
    # The plain transform (grid=None) moves x' by only (1 - m / sigma) of the correction.
    plain = np.asarray(ddim_sampler(unguidance(HARM, gamma, eta=0.0)(D), latents, sigmas=grid, eta=eta, key=key))
    m = float(ddim_mean_coef(sig, sig_next, eta))
    np.testing.assert_allclose((plain - np.asarray(ddim_sampler(D, latents, sigmas=grid, eta=eta, key=key))),
                               -(1 - m / sig) * gamma * grad, atol=2e-5)
    assert np.abs(got * np.sqrt(abar_prev) - (plain * np.sqrt(abar_prev))).max() > 0.1


def test_next_level_and_shift_x0():
    grid = schedules.karras_sigmas(5)
    sig = jnp.asarray(grid[:-1], jnp.float32)  # float32 copies of the float64 levels map to their own successors
    np.testing.assert_array_equal(next_level(sig, grid), jnp.asarray(grid[1:], jnp.float32))
    assert float(next_level(0.5 * (grid[1] + grid[2]), grid)) == np.float32(grid[2])
    assert float(next_level(grid[-2] / 2, grid)) == 0.0
    # shift_x0 moves the DDIM step's x' by exactly delta; on the last step (sigma' = 0) x0 itself moves.
    x, x0, delta = jnp.ones((3, 2)), jnp.zeros((3, 2)), jnp.full((3, 2), 0.25)
    for eta in (0.0, 1.0):
        m = ddim_mean_coef(2.0, 1.0, eta)
        step = lambda y0: y0 + m * (x - y0) / 2.0
        np.testing.assert_allclose(step(shift_x0(x0, delta, 2.0, 1.0, eta)) - step(x0), delta, atol=1e-6)
    np.testing.assert_allclose(shift_x0(x0, delta, 2.0, 0.0), delta)


def test_negative_classifier_guidance_lowers_unsafe_mass():
    log_harm = lambda z: jnp.log(jnp.maximum(HARM(z), 1e-30))
    assert _shares(negative_classifier_guidance(log_harm, 1.0)(D))[UNSAFE].sum() <= 0.03


# --- safe classifier guidance

LOGITS = lambda x, sigma: toy.posterior_logits(GM, x, sigma)  # the exact noise-conditional component classifier


def test_safe_classifier_guidance_is_the_safe_sub_mixture_denoiser():
    # Bayes' rule with the exact noisy posterior: no precision loss deep in the unsafe modes either.
    k1, k2, k3 = jax.random.split(jax.random.key(6), 3)
    sigma = jnp.exp(jax.random.uniform(k2, (512,), minval=np.log(0.02), maxval=np.log(40.0)))
    x = toy.sample(GM, k1, 512)[0] + sigma[:, None] * jax.random.normal(k3, (512, 2))
    got = safe_classifier_guidance(LOGITS, UNSAFE, 8)(D)(x, sigma)
    np.testing.assert_allclose(got, toy.denoise(sub_mixture(GM, range(2, 8)), x, sigma), atol=1e-4)


def test_safe_classifier_guidance_samples_the_safe_modes():
    _assert_safe_and_balanced(_shares(safe_classifier_guidance(LOGITS, UNSAFE, 8)(D)))


def test_negative_guidance_keeps_pushing_where_bayes_guidance_has_stopped():
    # In a safe mode (opposite the unsafe ones) grad log P(safe) ~ 0 while grad log P(unsafe) stays O(1/sigma):
    # why x_t negative guidance shifts safe samples that the safe sampler leaves in place.
    x, sigma = GM.means[4:5], jnp.float32(1.0)
    safe = jax.grad(lambda z: jnp.sum(safe_log_prob(LOGITS, UNSAFE, 8)(z, sigma)))(x)
    unsafe = jax.grad(lambda z: jnp.sum(safe_log_prob(LOGITS, range(2, 8), 8)(z, sigma)))(x)
    assert float(jnp.linalg.norm(safe)) < 1e-6 < 1.0 < float(jnp.linalg.norm(unsafe))


@pytest.mark.parametrize("classes", [[], [8], list(range(8))])
def test_safe_log_prob_rejects_bad_class_sets(classes):
    with pytest.raises(ValueError, match="proper subset"):
        safe_log_prob(LOGITS, classes, 8)


# --- safe denoiser

def test_exact_safe_denoiser_is_the_safe_sub_mixture_denoiser():
    k1, k2 = jax.random.split(jax.random.key(4))
    x = jax.random.normal(k1, (512, 2)) * 4
    sigma = jnp.exp(jax.random.uniform(k2, (512,), minval=np.log(0.2), maxval=np.log(40.0)))
    got = exact_safe_denoiser(GM, UNSAFE)(x, sigma)
    want = toy.denoise(sub_mixture(GM, range(2, 8)), x, sigma)
    # beta* (E_data - E_unsafe) cancels in float32 where the safe posterior is tiny; compare where it is not.
    ok = np.asarray(exact_beta(GM, UNSAFE, x, sigma) < 100)
    assert ok.mean() > 0.8
    np.testing.assert_allclose(np.asarray(got)[ok], np.asarray(want)[ok], rtol=1e-3, atol=1e-3)


def test_exact_safe_denoiser_samples_the_safe_modes():
    _assert_safe_and_balanced(_shares(exact_safe_denoiser(GM, UNSAFE)))


def test_paper_safe_denoiser_removes_unsafe_mass():
    # A constant beta repels every sample from the unsafe references, so the removed mass lands on the
    # opposite modes rather than evenly: only the unsafe mass and staying near the ring are asserted.
    x = jax.jit(lambda z: edm_sampler(paper_safe_denoiser(REFS, 3.0, 1.0, sigma_lo=5.0)(D), z))(LATENTS)
    assert np.asarray(toy.mode_shares(GM, x))[UNSAFE].sum() <= 0.03
    assert np.median(np.linalg.norm(np.asarray(x), axis=1)) < 5.0


def test_paper_safe_denoiser_window():
    t = paper_safe_denoiser(REFS, beta=1.0, sigma_lo=0.5, sigma_hi=3.0)(D)
    x = jax.random.normal(jax.random.key(5), (8, 2))
    for s in (0.2, 10.0):
        assert np.array_equal(t(x, s), D(x, s))
    assert not np.array_equal(t(x, 1.0), D(x, 1.0))


def _kernel64(x0, refs, s):
    """The official code's unnormalised kernel by hand: (sum_i w_i z_i / mass, mass), mass = sum_i w_i + 1e-8."""
    w = np.exp(-np.linalg.norm(x0[:, None] - refs[None], axis=-1) / (2 * s ** 2))
    mass = w.sum(1) + 1e-8
    return (w @ refs) / mass[:, None], mass


def test_practical_safe_denoiser_is_the_codes_ddpm_step():
    # One 50-step-DDPM-style step sigma -> sigma' by hand in float64, in the scheduler's scaled variables: x0_hat
    # from the model, x0' = x0_hat - s E_u where the kernel mass passes the threshold, add_noise(x0', n, t), and
    # diffusers' DDPM posterior step from the re-noised latent with the OLD eps; elsewhere the plain step.
    sig, sig_next, s, bw = 3.0, 2.0, 0.5, 1.0
    refs = np.asarray(REFS[:16], np.float64)
    latents = jax.random.normal(jax.random.key(9), (32, 2))
    key, noise_key = jax.random.key(10), jax.random.key(11)
    x = latents * np.float32(np.sqrt(1 + sig ** 2))
    x0 = np.asarray(D(x, sig), np.float64)
    e_u, mass = _kernel64(x0, refs, bw)
    thr = float(np.median(mass))
    t = practical_safe_denoiser(REFS[:16], s, bw, thr, grid=np.array([sig, sig_next]), window_steps=1, key=noise_key)
    got = np.asarray(ddim_sampler(t(D), latents, sigmas=[sig, sig_next], eta=1.0, key=key), np.float64)

    abar, abar_prev = 1 / (1 + sig ** 2), 1 / (1 + sig_next ** 2)
    alpha = abar / abar_prev
    x_s = np.asarray(latents, np.float64)
    eps_old = (x_s - np.sqrt(abar) * x0) / np.sqrt(1 - abar)
    n = np.asarray(_fresh_noise(noise_key, _state_hash(x), jnp.full((32,), sig, jnp.float32), x.shape), np.float64)
    renoised = np.sqrt(abar) * (x0 - s * e_u) + np.sqrt(1 - abar) * n  # scheduler.add_noise(x0', n, t)
    start = np.where((mass > thr)[:, None], renoised, x_s)
    pred = (start - np.sqrt(1 - abar) * eps_old) / np.sqrt(abar)
    z = np.asarray(step_noise(key, 0, latents), np.float64)
    want = (np.sqrt(abar_prev) * (1 - alpha) / (1 - abar) * pred + np.sqrt(alpha) * (1 - abar_prev) / (1 - abar) * start
            + np.sqrt((1 - abar_prev) / (1 - abar) * (1 - alpha)) * z)
    assert 0 < (mass > thr).sum() < 32
    np.testing.assert_allclose(got * np.sqrt(abar_prev), want, atol=1e-4)


def test_practical_parts_by_hand():
    x0 = np.array([[3.5, 0.5], [0.0, -4.0], [40.0, 40.0]])
    e_u, mass = practical_unsafe_mean(jnp.asarray(x0, jnp.float32), REFS[:16], 0.8)
    want_e, want_m = _kernel64(x0, np.asarray(REFS[:16], np.float64), 0.8)
    np.testing.assert_allclose(mass, want_m, rtol=1e-5)
    np.testing.assert_allclose(e_u, want_e, rtol=1e-4, atol=1e-6)  # far from every reference E_u -> 0, not z_i
    assert np.abs(np.asarray(e_u[2])).max() < 1e-6
    # The threshold: quantile of the masses of VP-noised references against all references, minus the margin.
    key, sigma = jax.random.key(12), 0.05
    a = 1 / np.sqrt(1 + sigma ** 2)
    refs = np.asarray(REFS[:16], np.float64)
    noised = a * refs + np.sqrt(1 - a * a) * np.asarray(jax.random.normal(key, (16, 2)), np.float64)
    masses = _kernel64(noised, refs, 0.8)[1]
    got = calibrate_threshold(REFS[:16], 0.8, sigma, key, quantile=0.25, margin=1.6)
    np.testing.assert_allclose(got, np.quantile(masses, 0.25) - 1.6, rtol=1e-5)
    assert calibrate_threshold(REFS[:16], 0.8, sigma, key) == pytest.approx(masses.min(), rel=1e-5)


def test_practical_safe_denoiser_window_and_noise():
    grid = np.array([5.0, 3.0, 2.0, 0.0])
    t = practical_safe_denoiser(REFS, 1.0, 1.0, grid=grid, window_steps=1, key=jax.random.key(1))(D)
    x = jax.random.normal(jax.random.key(5), (8, 2)) * 5
    state = t.init(x)
    assert np.array_equal(t.apply(x, 3.0, None, state)[0], D(x, 3.0))
    assert not np.array_equal(t.apply(x, 5.0, None, state)[0], D(x, 5.0))
    # A sample's draws depend on its starting point and the level, not on the batch around it.
    sig = jnp.full((8,), 5.0)
    full = _fresh_noise(jax.random.key(1), _state_hash(x), sig, x.shape)
    np.testing.assert_array_equal(full[:3], _fresh_noise(jax.random.key(1), _state_hash(x[:3]), sig[:3], (3, 2)))
    assert not np.array_equal(full, _fresh_noise(jax.random.key(1), _state_hash(x), sig * 0.5, x.shape))
    with pytest.raises(ValueError, match="window_steps"):
        practical_safe_denoiser(REFS, grid=grid, window_steps=4)


# --- SLD

@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_sld_presets_run(preset):
    shares = _shares(sld(SAFETY_COND, preset, 1.0, sigmas=GRID)(D))
    assert np.isclose(shares.sum(), 1.0)
    if preset == "MAX":
        assert shares[UNSAFE].sum() <= 0.03


def test_sld_momentum_is_threaded_state():
    with_mom = _shares(sld(SAFETY_COND, "MAX", 1.0, sigmas=GRID)(D))
    without = _shares(sld(SAFETY_COND, "MAX", 1.0, sigmas=GRID, momentum_scale=0.0)(D))
    assert not np.array_equal(with_mom, without)
    sd = sld(SAFETY_COND, "MAX", 1.0)(D)
    x = jax.random.normal(jax.random.key(6), (8, 2))
    first, state = sd.apply(x, 1.0, None, sd.init(x))
    second, _ = sd.apply(x, 1.0, None, state)
    assert not np.array_equal(first, second)  # same inputs, new momentum


def test_sld_warmup_needs_the_grid():
    with pytest.raises(ValueError, match="sigma grid"):
        sld(SAFETY_COND, "MEDIUM")


# --- composition

TRANSFORMS = {
    "unguidance": unguidance(HARM, 30.0, 0.3, "invlinear"),
    "negative_classifier_guidance": negative_classifier_guidance(lambda z: jnp.log(HARM(z) + 1e-30), 1.0),
    "paper_safe_denoiser": paper_safe_denoiser(REFS, 3.0, sigma_lo=5.0),
    "practical_safe_denoiser": practical_safe_denoiser(REFS, 0.5, 1.0, grid=GRID, window_steps=6,
                                                       key=jax.random.key(1)),
    "safe_classifier_guidance": safe_classifier_guidance(LOGITS, UNSAFE, 8),
    "sld": sld(SAFETY_COND, "STRONG", 1.0, sigmas=GRID),
}


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_composes_with_cfg_and_jits_once(name):
    cond = jax.nn.one_hot(jnp.zeros(64, jnp.int32), 2)
    z = LATENTS[:64]
    traces = []

    @jax.jit
    def run(z):
        traces.append(1)
        guided = G.chain(G.cfg(1.0), TRANSFORMS[name])(D)
        return edm_sampler(guided, z, cond=cond, num_steps=18)

    out = run(z)
    run(z + 1.0)
    assert len(traces) == 1 and np.all(np.isfinite(out))
    # CFG with w = 1 is the conditional model, so the chain equals the transform alone.
    alone = edm_sampler(TRANSFORMS[name](D), z, cond=cond, num_steps=18)
    np.testing.assert_allclose(out, alone, atol=1e-4)
    assert np.all(np.isfinite(ddim_sampler(G.chain(G.cfg(2.0), TRANSFORMS[name])(D), z, cond=cond, num_steps=10)))
