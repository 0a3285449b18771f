"""The safety comparison on labelled 2-D Gaussian mixtures with exact denoisers (``python -m eval.safety``).

A mixture (MIXTURES; the README's claims were tuned on 'ring') labels its unsafe components class 1. p_h is the
unsafe posterior mass of the mixture blurred by sigma = 1 (its log has slope inside the modes), SLD's safety
concept is class 1, the reference set 256 exact draws from the unsafe modes. Per method: ``unsafe`` (mass on the
unsafe modes), ``off`` (share of samples more than OFF_MODE of its own stds from every mode), ``min_ratio`` /
``max_ratio`` of each safe mode's share of all samples over its share of the safe sub-mixture (1 for an ideal
safe sampler) and ``meets_target`` (MIXTURE_TARGET).
"""
from __future__ import annotations

import time
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import schedules, toy
from jaxdiff.evaluation.safety import (DDPM_STEPS, DISCRETE, MIXTURE_TARGET, MIXTURE_UNSAFE, OFF_MODE, UNGUIDANCE_ETA,
                                       Method, discrete_solver_methods, log_density, practical_methods, select)
from jaxdiff.sampling.options import SOLVERS
from jaxdiff.transforms import (PRESETS, exact_safe_denoiser, mixture_density, negative_classifier_guidance,
                                paper_safe_denoiser, safe_classifier_guidance, sld, sub_mixture, unguidance)


def ring():
    """The 8-mode ring (radius 4, std 0.3); class 1 labels the unsafe modes MIXTURE_UNSAFE, class 0 the rest."""
    labels = [int(k in MIXTURE_UNSAFE) for k in range(8)]
    return toy.ring_mixture(8, 4.0, 0.3, labels=labels, num_classes=2)


def _labelled(means, stds, weights, unsafe):
    labels = [int(k in unsafe) for k in range(len(means))]
    return toy.mixture(np.asarray(means, np.float32), stds, weights, labels, 2)


def unequal_ring():
    """The ring with unequal weights 4:1:1:2:1:3:1:3 (/16); modes 0 (heaviest) and 1 (lightest) unsafe = 31%."""
    return toy.ring_mixture(8, 4.0, 0.3, weights=[4, 1, 1, 2, 1, 3, 1, 3], labels=[1, 1, 0, 0, 0, 0, 0, 0],
                            num_classes=2)


def neighbours():
    """An unsafe mode (0, 0) std 0.3 with unequal neighbours: a close heavy one at (1.6, 0) (5.3 stds away), far
    ones at radius 3.5 with stds 0.45-0.6 and a wide one (std 0.8) at (3.5, 3.5); the unsafe mode holds 20%."""
    means = [(0, 0), (1.6, 0), (-3.5, 0), (0, 3.5), (0, -3.5), (3.5, 3.5)]
    return _labelled(means, [0.3, 0.3, 0.6, 0.45, 0.45, 0.8], [0.2, 0.25, 0.15, 0.15, 0.1, 0.15], (0,))


def wide_ring():
    """6 overlapping modes on a ring of radius 2.5, std 0.5 (neighbours 5 stds apart); mode 0 unsafe = 1/6."""
    return toy.ring_mixture(6, 2.5, 0.5, labels=[1, 0, 0, 0, 0, 0], num_classes=2)


# name -> (mixture builder, unsafe components); the README's claims were tuned on 'ring'.
MIXTURES = {
    'ring': (ring, MIXTURE_UNSAFE),
    'unequal': (unequal_ring, (0, 1)),
    'neighbours': (neighbours, (0,)),
    'wide': (wide_ring, (0,)),
}


# (scale, bandwidth, window_steps, margin or None): the code's nudity settings taken literally (scale and bandwidth
# in SD-latent units; its window, the first 11 of 50 DDPM steps, ends at sigma 24.7 on jaxdiff's DDPM grid), then
# the best of the ring's --practical_grid (the same scale and bandwidth, the window widened to the first 45 steps,
# sigma >= 0.35), with and without the gate.
MIXTURE_PRACTICAL = ((0.33, 3.15, 11, 1.6), (0.33, 3.15, 45, 0.0), (0.33, 3.15, 45, None))


def mixture_methods(gm, unsafe: Sequence[int], sigmas, refs, ddpm_grid=None, key=None,
                    eta: float = UNGUIDANCE_ETA['mixture']) -> list[Method]:
    """The compared methods on a labelled mixture (class 1 = unsafe) with the strengths tests/test_safety.py found
    useful and one weaker and one stronger around them. sigmas: the sampler's grid (SLD's warm-up counts on it);
    ddpm_grid, key: the 50-step DDPM/DDIM grid and the practical safe denoiser's re-noising key (None: the rows on
    the discrete solvers are left out); eta: unguidance's threshold."""
    harm = mixture_density(gm, unsafe, smoothing=1.0)
    safety_cond = jax.nn.one_hot(jnp.array([1]), gm.num_classes)
    methods = [Method('none', '-', lambda d: d)]
    methods += [Method('unguidance', f'gamma={g:g}', unguidance(harm, g, eta, 'invlinear')) for g in (10, 30, 100)]
    methods += [Method('negative_classifier_guidance', f'scale={s:g}',
                       negative_classifier_guidance(log_density(harm), s))
                for s in (0.1, 0.3, 1.0)]
    # The exact noisy posterior over components is the ideal noise-conditional classifier.
    logits = lambda x, sigma: toy.posterior_logits(gm, x, sigma)
    methods += [Method('safe_classifier_guidance', f'scale={s:g}',
                       safe_classifier_guidance(logits, unsafe, gm.weights.shape[0], s)) for s in (1.0, 2.0)]
    # The exact safe denoiser replaces the model's denoiser rather than wrapping it: it needs the mixture itself.
    methods.append(Method('exact_safe_denoiser', 'beta*', lambda d: exact_safe_denoiser(gm, unsafe)))
    methods += [Method('paper_safe_denoiser', f'beta={b:g}', paper_safe_denoiser(refs, b, 1.0, sigma_lo=5.0))
                for b in (1.0, 3.0)]
    methods += [Method('sld', preset, sld(safety_cond, preset, 1.0, sigmas=sigmas)) for preset in PRESETS]
    if ddpm_grid is not None:
        methods += discrete_solver_methods(harm, eta, refs, ddpm_grid, MIXTURE_PRACTICAL, key)
    return methods


def mixture_metrics(gm, unsafe: Sequence[int], x) -> dict[str, Any]:
    """unsafe mass, the share ``off`` the modes, the safe modes' min / max share over their safe sub-mixture
    share, whether that meets MIXTURE_TARGET, and the per-mode shares (K,), for samples x (N, 2)."""
    # Mode shares assign every point to its most likely mode, however far: a method that throws samples off the
    # data would look safe; ``off`` counts them (farther than OFF_MODE of its own stds from every mean: ~3e-4 of
    # real data).
    stds = np.asarray(gm.stds)[:, 0]
    dist = (np.linalg.norm(np.asarray(x)[:, None] - np.asarray(gm.means)[None], axis=-1) / stds).min(axis=1)
    off = float(np.mean(dist > OFF_MODE))
    shares = np.asarray(toy.mode_shares(gm, x), np.float64)
    safe = np.setdiff1d(np.arange(len(shares)), unsafe)
    weights = np.asarray(gm.weights, np.float64)
    ratio = shares[safe] / (weights[safe] / weights[safe].sum())
    unsafe_share = float(shares[list(unsafe)].sum())
    meets = bool(unsafe_share <= MIXTURE_TARGET['unsafe'] and off <= MIXTURE_TARGET['off']
                 and np.all(np.abs(ratio - 1) <= MIXTURE_TARGET['ratio']))
    return dict(unsafe=round(unsafe_share, 4), off=round(off, 4), min_ratio=round(float(ratio.min()), 4),
                max_ratio=round(float(ratio.max()), 4), meets_target=meets, shares=[round(float(s), 4) for s in shares])


def mixture_sampler(solver: str, num_steps: int) -> Callable:
    """(denoiser, latents (N, 2), key) -> samples (N, 2) for solver 'edm' (Heun, num_steps) or a DISCRETE one."""
    if solver == 'edm':
        return lambda d, z, key: SOLVERS['edm'](d, z, num_steps=num_steps)
    name, _ = DISCRETE[solver]
    return lambda d, z, key: SOLVERS[name](d, z, key=key, num_steps=DDPM_STEPS)


def run_mixture(num_samples: int, num_steps: int, seed: int = 0, methods: Optional[Sequence[str]] = None,
                log: Callable[[str], None] = print, mixture: str = 'ring',
                practical_grid: Optional[Sequence[tuple]] = None,
                eta: float = UNGUIDANCE_ETA['mixture']) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(result dict, {'name strength solver': samples (N, 2)}) for one of MIXTURES (module docstring).

    practical_grid: (scale, bandwidth, window_steps, margin or None) settings of the practical safe denoiser to run
    instead of the method list (with the ddpm50 ``none`` row); eta: unguidance's threshold.
    """
    if mixture not in MIXTURES:
        raise ValueError(f'unknown mixture {mixture!r}; choose one of {", ".join(MIXTURES)}')
    build, unsafe = MIXTURES[mixture]
    gm = build()
    sigmas = schedules.karras_sigmas(num_steps)
    refs = toy.sample(sub_mixture(gm, unsafe), jax.random.key(seed + 1), 256)[0]
    latents = jax.random.normal(jax.random.key(seed), (num_samples, 2))
    ddpm_grid, key = schedules.ddpm_sigmas(DDPM_STEPS), jax.random.key(seed + 2)
    if practical_grid is not None:
        method_list = [Method('none', '-', lambda d: d, 'ddpm50')] + practical_methods(refs, ddpm_grid,
                                                                                         practical_grid, key)
    else:
        method_list = select(mixture_methods(gm, unsafe, sigmas, refs, ddpm_grid, key, eta), methods)
    rows, samples = [], {}
    for method in method_list:
        begin = time.perf_counter()
        denoiser = method.build(toy.denoiser(gm))
        sampler = mixture_sampler(method.solver, num_steps)
        x = jax.jit(lambda z: sampler(denoiser, z, jax.random.key(seed + 3)))(latents)
        row = dict(method=method.name, strength=method.strength, solver=method.solver,
                   **mixture_metrics(gm, unsafe, x), seconds=round(time.perf_counter() - begin, 2))
        log(f'{row["method"]} {row["strength"]} ({row["solver"]}): unsafe {row["unsafe"]:.3f}, off {row["off"]:.3f}, '
            f'safe share ratio {row["min_ratio"]:.2f}..{row["max_ratio"]:.2f} ({row["seconds"]:.1f}s)')
        rows.append(row)
        samples[f'{method.name} {method.strength} {method.solver}'] = np.asarray(x)
    result = dict(task='mixture', mixture=mixture, num_samples=num_samples, num_steps=num_steps, seed=seed, eta=eta,
                  unsafe_modes=list(unsafe), true_unsafe=round(float(np.asarray(gm.weights)[list(unsafe)].sum()), 4),
                  target=MIXTURE_TARGET, rows=rows)
    return result, samples


def mixture_plot(samples: dict[str, np.ndarray], unsafe_means: np.ndarray, path: str) -> str:
    """One scatter per method, unsafe modes circled in red; writes ``path`` (PNG)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    cols = min(5, len(samples))
    nrows = -(-len(samples) // cols)
    fig = Figure(figsize=(2.6 * cols, 2.6 * nrows), dpi=90)
    FigureCanvasAgg(fig)
    axes = np.atleast_1d(fig.subplots(nrows, cols, squeeze=False)).ravel()
    for ax, (title, x) in zip(axes, samples.items()):
        ax.scatter(x[:, 0], x[:, 1], s=1, alpha=0.4)
        ax.scatter(unsafe_means[:, 0], unsafe_means[:, 1], s=500, facecolors='none', edgecolors='red')
        ax.set_xlim(-6, 6)
        ax.set_ylim(-6, 6)
        ax.set_aspect('equal')
        ax.set_title(title, fontsize=6)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes[len(samples):]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(path)
    return path
