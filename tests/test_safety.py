"""Safety transforms on the 8-mode ring (radius 4, std 0.3) with modes 0 and 1 unsafe (25% of the mass).

The exact mixture denoiser is the oracle: the ideal safe sampler draws from the safe sub-mixture, where each
of the six safe modes has share 1/6.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import guidance as G
from jaxdiff import schedules, toy
from jaxdiff.safety import densities
from jaxdiff.safety.safe_denoiser import exact_beta, exact_safe_denoiser, reference_safe_denoiser, sub_mixture
from jaxdiff.safety.safe_guidance import safe_classifier_guidance, safe_log_prob
from jaxdiff.safety.sld import PRESETS, sld
from jaxdiff.safety.unguidance import negative_classifier_guidance, unguidance
from jaxdiff.solvers import ddim_sampler, edm_sampler

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


def test_reference_safe_denoiser_removes_unsafe_mass():
    # A constant beta repels every sample from the unsafe references, so the removed mass lands on the
    # opposite modes rather than evenly: only the unsafe mass and staying near the ring are asserted.
    x = jax.jit(lambda z: edm_sampler(reference_safe_denoiser(REFS, 3.0, 1.0, sigma_lo=5.0)(D), z))(LATENTS)
    assert np.asarray(toy.mode_shares(GM, x))[UNSAFE].sum() <= 0.03
    assert np.median(np.linalg.norm(np.asarray(x), axis=1)) < 5.0


def test_reference_safe_denoiser_window():
    t = reference_safe_denoiser(REFS, beta=1.0, sigma_lo=0.5, sigma_hi=3.0)(D)
    x = jax.random.normal(jax.random.key(5), (8, 2))
    for s in (0.2, 10.0):
        assert np.array_equal(t(x, s), D(x, s))
    assert not np.array_equal(t(x, 1.0), D(x, 1.0))


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
    "reference_safe_denoiser": reference_safe_denoiser(REFS, 3.0, sigma_lo=5.0),
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
