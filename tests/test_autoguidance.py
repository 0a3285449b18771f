"""Autoguidance, the guidance interval and batched CFG (issue 16) against independent truth: float64 numpy
transcriptions of the exact mixture denoiser and of the interval reference's Heun loop, and a counting denoiser."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import schedules, toy
from jaxdiff import transforms as T
from jaxdiff.sampling import options
from jaxdiff.solvers import edm_sampler
from jaxdiff.solvers.plan import evaluation_plan

GM = toy.ring_mixture(num_modes=6, radius=3.0, std=0.25, labels=[0, 1] * 3, num_classes=2)
WORSE = toy.ring_mixture(num_modes=6, radius=3.0, std=0.8, labels=[0, 1] * 3, num_classes=2)  # inflated stds
X = jax.random.normal(jax.random.key(0), (6, 2)) * 3
C = jax.nn.one_hot(jnp.array([0, 1, 0, 1, 1, 0]), 2)


def exact64(gm: toy.GaussianMixture, x, sigma, cond):
    """E[x0 | x, cond] of a 2-D isotropic mixture in float64 numpy (written from the formula, not from toy.py)."""
    x, cond = np.asarray(x, np.float64), None if cond is None else np.asarray(cond, np.float64)
    mu, s = np.asarray(gm.means, np.float64), np.asarray(gm.stds, np.float64)[:, 0]
    w = np.asarray(gm.weights, np.float64)[None].repeat(len(x), 0)
    if cond is not None:
        w = w * cond[:, np.asarray(gm.labels)]
    sigma = np.broadcast_to(np.asarray(sigma, np.float64), (len(x),))
    var = s[None] ** 2 + sigma[:, None] ** 2                                    # (B, K)
    d2 = ((x[:, None] - mu[None]) ** 2).sum(-1)
    logp = np.log(np.maximum(w, 1e-300)) - d2 / (2 * var) - np.log(2 * np.pi * var)
    post = np.exp(logp - logp.max(1, keepdims=True))
    post /= post.sum(1, keepdims=True)
    means = mu[None] + (s[None] ** 2 / var)[..., None] * (x[:, None] - mu[None])
    return (post[..., None] * means).sum(1)


def test_autoguidance_with_the_main_model_as_guide_is_the_identity():
    D = toy.denoiser(GM)
    for w in (0.5, 2.0, 4.0):
        np.testing.assert_array_equal(T.autoguidance(D, w)(D)(X, 1.1, C), D(X, 1.1, C))


def test_autoguidance_is_the_closed_form_on_the_exact_mixture():
    """D_guide + w (D_main - D_guide) with the exact denoisers of the mixture and of its inflated version."""
    for sigma in (0.05, 0.7, 5.0):
        for w in (1.5, 3.0):
            got = T.autoguidance(toy.denoiser(WORSE), w)(toy.denoiser(GM))(X, sigma, C)
            main, guide = exact64(GM, X, sigma, C), exact64(WORSE, X, sigma, C)
            np.testing.assert_allclose(np.asarray(got), guide + w * (main - guide), rtol=2e-4, atol=2e-4)


def counting(denoiser, calls: list):
    """denoiser that records the rows of every evaluation that runs (a host callback: counts under jit)."""
    def counted(x, sigma, cond=None):
        jax.debug.callback(lambda: calls.append(x.shape[0]), ordered=True)
        return denoiser(x, sigma, cond)
    return counted


def reference_interval_heun(main, ref, x, cond, sigmas, w, lo, hi):
    """The guidance interval's reference loop (kynkaat/guidance-interval, EDM Heun without churn) in float64:
    step i uses ref + w (main - ref) for both of its evaluations when lo < sigma_i <= hi, else main alone."""
    x = np.asarray(x, np.float64) * sigmas[0]
    for i, (t, t_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        def d(z, s):
            m = main(z, s, cond)
            return ref(z, s, cond) + w * (m - ref(z, s, cond)) if lo < t <= hi else m
        drift = (x - d(x, t)) / t
        x_next = x + (t_next - t) * drift
        if t_next > 0:
            x_next = x + (t_next - t) * (0.5 * drift + 0.5 * (x_next - d(x_next, t_next)) / t_next)
        x = x_next
    return x


@pytest.mark.parametrize('method', ['cfg', 'autoguidance'])
def test_interval_decides_per_step_skips_the_extra_evaluation_and_matches_the_reference_loop(method):
    num_steps, w = 12, 2.5
    sigmas = schedules.karras_sigmas(num_steps)
    lo, hi = 0.3, 1.01 * float(sigmas[4])  # step 4 is inside, step 3 outside, and step 3's Heun correction is
    # evaluated at sigma_4: inside by its own sigma, outside by its step (the reference's rule)
    sampler = functools.partial(edm_sampler, num_steps=num_steps)
    plan = evaluation_plan(lambda d, z, k, c: sampler(d, z, cond=c))
    interval = T.GuidanceInterval(lo, hi, plan.step_sigmas)
    calls = []
    main = counting(toy.denoiser(GM), calls)
    if method == 'cfg':
        transform, ref64 = T.cfg(w, interval=interval), (lambda z, s, c: exact64(GM, z, s, None))
    else:
        transform, ref64 = T.autoguidance(counting(toy.denoiser(WORSE), calls), w, interval=interval), \
            (lambda z, s, c: exact64(WORSE, z, s, c))
    z = jax.random.normal(jax.random.key(1), (4, 2))
    cond = C[:4]
    got = jax.jit(lambda z: sampler(transform(main), z, cond=cond))(z)
    jax.effects_barrier()
    want = reference_interval_heun(lambda a, s, c: exact64(GM, a, s, c), ref64, z, cond, sigmas, w, lo, hi)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)
    on = (plan.step_sigmas > lo) & (plan.step_sigmas <= hi)
    assert 0 < on.sum() < len(on) and len(plan.sigmas) == 2 * num_steps - 1
    rows = 4 * (len(on) + on.sum())  # one extra batch of evaluations inside the interval, none outside
    assert sum(calls) == rows
    assert len(calls) == (len(on) if method == 'cfg' else len(on) + on.sum())  # cfg: one stacked call
    # The paper's per-evaluation form guides that correction too, and so differs from the reference loop.
    paper = {'cfg': T.cfg(w, interval=T.GuidanceInterval(lo, hi)),
             'autoguidance': T.autoguidance(toy.denoiser(WORSE), w, interval=T.GuidanceInterval(lo, hi))}[method]
    assert np.abs(np.asarray(sampler(paper(toy.denoiser(GM)), z, cond=cond)) - want).max() > 1e-3


def test_interval_everywhere_is_cfg_and_nowhere_is_the_conditional_model():
    num_steps = 8
    sampler = functools.partial(edm_sampler, num_steps=num_steps)
    plan = evaluation_plan(lambda d, z, k, c: sampler(d, z, cond=c))
    D = toy.denoiser(GM)
    z = jax.random.normal(jax.random.key(2), (6, 2))
    run = lambda t: np.asarray(sampler(t(D), z, cond=C))  # noqa: E731
    everywhere = T.GuidanceInterval(0.0, 1e3, plan.step_sigmas)
    nowhere = T.GuidanceInterval(100.0, 200.0, plan.step_sigmas)
    np.testing.assert_allclose(run(T.cfg(3.0, interval=everywhere)), run(T.cfg(3.0)), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(run(T.cfg(3.0, interval=nowhere)), run(lambda d: d), rtol=1e-6, atol=1e-6)
    # The paper's form judges each evaluation by its own sigma.
    paper = T.cfg(3.0, interval=T.GuidanceInterval(0.5, 2.0))
    for sigma, inside in ((1.0, True), (2.0, True), (0.5, False), (3.0, False)):
        want = T.cfg(3.0)(D)(X, sigma, C) if inside else D(X, sigma, C)
        np.testing.assert_allclose(paper(D)(X, sigma, C), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('schedule', sorted(T.WEIGHT_SCHEDULES))
def test_batched_cfg_equals_separate_calls(schedule):
    D = toy.denoiser(GM)
    neg = jax.nn.one_hot(jnp.array([1]), 2)
    for kw in (dict(), dict(negative=neg, negative_weight=0.7), dict(negative=neg, negative_mode='replace')):
        for sigma in (0.1, 1.3, jnp.linspace(0.2, 9.0, 6)):
            one, two = (T.cfg(2.5, schedule=schedule, batched=b, **kw)(D)(X, sigma, C) for b in (True, False))
            np.testing.assert_allclose(np.asarray(one), np.asarray(two), rtol=1e-6, atol=1e-6)


def test_batched_cfg_on_a_network_stacks_zero_labels_as_unconditional():
    """A class-conditional SongUNet: the stacked call's unconditional rows (zero labels) equal a call with None."""
    from jaxdiff import precond
    from jaxdiff.nets import SongUNet
    net = SongUNet(img_resolution=8, in_channels=1, out_channels=1, label_dim=3, model_channels=8,
                   channel_mult=(1,), num_blocks=1, attn_resolutions=())
    x = jax.random.normal(jax.random.key(3), (2, 8, 8, 1))
    labels = jax.nn.one_hot(jnp.array([0, 2]), 3)
    variables = jax.jit(net.init)(jax.random.key(4), x, jnp.ones(2), labels)
    sigma = jnp.array([0.5, 2.0])
    one, two = (jax.jit(lambda v, b=b: T.cfg(2.0, batched=b)(precond.edm(net, v, label_dim=3))(x, sigma, labels))(
        variables) for b in (True, False))
    np.testing.assert_allclose(np.asarray(one), np.asarray(two), rtol=1e-5, atol=1e-5)


def test_evaluation_plan_of_heun_and_euler():
    """Heun: steps 0..N-2 evaluate twice (sigma_i, then sigma_{i+1}), the last once; Euler once per step."""
    sig = schedules.karras_sigmas(5)
    heun = evaluation_plan(options.make_solver('edm', options.resolve_solver('edm', {'num_steps': 5}, (0.002, 80))))
    np.testing.assert_allclose(heun.sigmas, np.r_[np.stack([sig[:4], sig[1:5]], 1).ravel(), sig[4]], rtol=1e-6)
    assert heun.steps.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4]
    np.testing.assert_allclose(heun.step_sigmas, sig[heun.steps], rtol=1e-6)
    euler = evaluation_plan(options.make_solver('euler', options.resolve_solver('euler', {'num_steps': 5},
                                                                                    (0.002, 80))))
    assert euler.steps.tolist() == [0, 1, 2, 3, 4]
    np.testing.assert_allclose(euler.grid(), sig, rtol=1e-6)
