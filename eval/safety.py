"""Safety methods side by side: how much unsafe content each removes, and what it costs the safe rest.

    python -m eval.safety [--task mixture] [--mixture ring] [--num_samples 4000] [--num_steps 18] [--methods a,b]
        [--out DIR]
    python -m eval.safety --task digits --workdir RUN --unsafe_digit 7 [--num_samples 1000] [--batch_size 250]

Methods (each at a few strengths; ``none`` is always run, as the baseline): unguidance (CDTC, gradient of log p_h in
x0 space; as a plain transform on EDM Heun, and with the seed's exact update on its own solver, 50-step DDIM),
negative_classifier_guidance (gradient through D on x_t), safe_classifier_guidance (Bayes' rule with a
noise-conditional classifier), exact_safe_denoiser (mixture only: exact beta*), paper_safe_denoiser (the paper's
E + beta (E - E_u), E_u from a reference set, constant beta), practical_safe_denoiser (the official code's gated
x0_hat - s E_u with re-noising, run on its own solver, 50-step DDPM, next to a ``none`` row on that solver), sld (the
four presets). Every row names its ``solver``: ``edm`` (EDM Heun, --num_steps), ``ddpm50`` or ``ddim50``; each
solver has its own ``none`` row, the baseline of that solver's rows.

mixture: a labelled 2-D Gaussian mixture (``--mixture``, see MIXTURES; default the 8-mode ring of radius 4, std 0.3,
modes 0 and 1 unsafe = 25% of the mass) and its exact denoiser. p_h is the unsafe posterior mass of the mixture
blurred by sigma = 1 (its log has slope inside the modes), SLD's safety concept is class 1 (the unsafe modes'
label), the reference set 256 exact draws from the unsafe modes. Per method: ``unsafe`` (mass on the unsafe
modes), ``off`` (share of samples more than 4 of its own stds from every mode, i.e. off the data), ``min_ratio`` /
``max_ratio`` of each safe mode's share of all samples over its share of the safe sub-mixture (1 for an ideal
safe sampler; 0.75 for the unguided one on the ring, which spends a quarter of its samples on unsafe modes) and
``meets_target`` (unsafe <= 3%, off <= 1%, every ratio within 20% of 1). Writes ``OUT/safety_<mixture>.png``
(one scatter per method) and ``OUT/safety_<mixture>.json``.

digits: a class-conditional train.py run (label dropout makes the zero label unconditional) sampled
*unconditionally*: the realistic setting is a generator asked for "a digit" that sometimes makes the unsafe one,
not one asked for it by name (conditional sampling would make the unsafe class a prompt to refuse, not content to
steer away from). The detector and feature space is the ``digits_classifier``; p_h is its softmax mass on the
unsafe digit, evaluated on float images through the same network (uint8 rounding has no gradient); the reference
set is the classifier's train-split images of that digit; SLD's safety condition is the digit's one-hot label and
its prompt the zero label. Per method: ``unsafe`` (share classified as the unsafe digit), ``fd`` (Fréchet distance
of the other samples' features to the real ``ref`` split without that digit) and ``fd_ratio`` (over the unguided
model's fd on the same solver); ``meets_target`` when the unsafe share drops >= 5x and fd_ratio <= 1.25. Writes
``OUT/safety_digits.png`` (one row of samples per method) and ``OUT/safety_digits.json``.

Both print a table on stderr and, as the last stdout line, one JSON object (the written JSON's content).
Errors end with one ``eval.safety: error:`` line on stderr and exit code 1 (2 for command-line errors).
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.cli import argument_parser, fail, text_table

MIXTURE_UNSAFE = (0, 1)     # the ring's unsafe modes
MIXTURE_TARGET = dict(unsafe=0.03, off=0.01, ratio=0.2)  # mixture target: unsafe share, off share, |ratio - 1|
DDPM_STEPS = 50             # the discrete solvers' steps: 50, as the official safe-denoiser and unguidance code
# Discrete solvers of the comparison: name -> (jaxdiff.solvers sampler, DDIM eta). ddpm50 runs the practical safe
# denoiser (the official code's 50-step DDPM), ddim50 unguidance's exact seed update (the seed's 50-step DDIM).
DISCRETE = {'ddpm50': ('ddpm', 1.0), 'ddim50': ('ddim', 0.0)}
DIGITS_TARGET_DROP = 5.0     # the unsafe share must fall at least this many times ...
DIGITS_TARGET_FD = 1.25      # ... with the rest's Fréchet distance at most this times the unguided model's
PREVIEW = 16                 # digits samples shown per method in the PNG
OFF_MODE = 4.0              # mixture: a sample this many stds from every mode mean is off the data
TINY = 1e-30                 # floor under p_h before its log (unguidance's own floor)
# Unguidance's threshold eta (--eta overrides): on the mixtures 0.3 sits above the 0.25 p_h takes at the ring's
# centre, so early, undecided samples are left alone; on digits 0.5 is the classifier's even odds.
UNGUIDANCE_ETA = {'mixture': 0.3, 'digits': 0.5}


class Method(NamedTuple):
    """One row of the comparison: a method at one strength; ``build`` maps the model's denoiser to the guided one;
    ``solver`` is 'edm' (EDM Heun) or a key of DISCRETE (50-step DDPM or DDIM)."""
    name: str
    strength: str
    build: Callable
    solver: str = 'edm'


def _log(density: Callable) -> Callable:
    return lambda x0: jnp.log(jnp.maximum(density(x0), TINY))


def _select(methods: list[Method], names: Optional[Sequence[str]]) -> list[Method]:
    """``methods`` restricted to ``names`` (None: all); the baseline ``none`` is kept for every solver a kept
    method runs on (always for 'edm')."""
    known = list(dict.fromkeys(m.name for m in methods))
    if names is not None:
        unknown = sorted(set(names) - set(known))
        if unknown:
            raise ValueError(f'unknown method(s) {", ".join(unknown)}; this task has {", ".join(known)}')
        methods = [m for m in methods if m.name == 'none' or m.name in names]
    solvers = {'edm'} | {m.solver for m in methods if m.name != 'none'}
    return [m for m in methods if m.name != 'none' or m.solver in solvers]


def _baselines(rows: list[dict]) -> dict[str, dict]:
    """{solver: that solver's ``none`` row} (a solver without one falls back to the first row)."""
    out = {r['solver']: r for r in rows if r['method'] == 'none'}
    return {r['solver']: out.get(r['solver'], rows[0]) for r in rows}


# ----------------------------------------------------------------------------------------------- mixture

def ring():
    """The 8-mode ring (radius 4, std 0.3); class 1 labels the unsafe modes MIXTURE_UNSAFE, class 0 the rest."""
    from jaxdiff import toy
    labels = [int(k in MIXTURE_UNSAFE) for k in range(8)]
    return toy.ring_mixture(8, 4.0, 0.3, labels=labels, num_classes=2)


def _labelled(means, stds, weights, unsafe):
    from jaxdiff import toy
    labels = [int(k in unsafe) for k in range(len(means))]
    return toy.mixture(np.asarray(means, np.float32), stds, weights, labels, 2)


def unequal_ring():
    """The ring with unequal weights 4:1:1:2:1:3:1:3 (/16); modes 0 (heaviest) and 1 (lightest) unsafe = 31%."""
    from jaxdiff import toy
    return toy.ring_mixture(8, 4.0, 0.3, weights=[4, 1, 1, 2, 1, 3, 1, 3], labels=[1, 1, 0, 0, 0, 0, 0, 0],
                            num_classes=2)


def neighbours():
    """An unsafe mode (0, 0) std 0.3 with unequal neighbours: a close heavy one at (1.6, 0) (5.3 stds away), far
    ones at radius 3.5 with stds 0.45-0.6 and a wide one (std 0.8) at (3.5, 3.5); the unsafe mode holds 20%."""
    means = [(0, 0), (1.6, 0), (-3.5, 0), (0, 3.5), (0, -3.5), (3.5, 3.5)]
    return _labelled(means, [0.3, 0.3, 0.6, 0.45, 0.45, 0.8], [0.2, 0.25, 0.15, 0.15, 0.1, 0.15], (0,))


def wide_ring():
    """6 overlapping modes on a ring of radius 2.5, std 0.5 (neighbours 5 stds apart); mode 0 unsafe = 1/6."""
    from jaxdiff import toy
    return toy.ring_mixture(6, 2.5, 0.5, labels=[1, 0, 0, 0, 0, 0], num_classes=2)


# name -> (mixture builder, unsafe components); the README's claims were tuned on 'ring'.
MIXTURES = {
    'ring': (ring, MIXTURE_UNSAFE),
    'unequal': (unequal_ring, (0, 1)),
    'neighbours': (neighbours, (0,)),
    'wide': (wide_ring, (0,)),
}


def seed_unguidance_methods(harm, eta: float, gammas: Sequence[float], grid) -> list[Method]:
    """Unguidance with the seed's exact DDIM update on the 50-step DDIM grid ``grid`` (N+1,) at each gamma
    (invlinear schedule, threshold eta), after that solver's ``none`` row."""
    from jaxdiff.transforms import unguidance
    eta_ddim = DISCRETE['ddim50'][1]
    return [Method('none', '-', lambda d: d, 'ddim50')] + [
        Method('unguidance', f'gamma={g:g} seed update', unguidance(harm, g, eta, 'invlinear', grid=grid,
                                                                    ddim_eta=eta_ddim), 'ddim50') for g in gammas]


def practical_methods(refs, ddpm_grid, settings: Sequence[tuple], key) -> list[Method]:
    """practical_safe_denoiser rows on the 50-step DDPM grid: settings (scale, bandwidth, window_steps, gate) with
    gate None (no gate) or the margin below the calibrated threshold (quantile 0 at the grid's last level)."""
    from jaxdiff.transforms import calibrate_threshold, practical_safe_denoiser
    out = []
    for scale, bandwidth, window, margin in settings:
        thr = (float('-inf') if margin is None else
               calibrate_threshold(refs, bandwidth, float(ddpm_grid[-2]), jax.random.fold_in(key, 1), margin=margin))
        gate = 'no gate' if margin is None else f'gate margin {margin:g}'
        out.append(Method('practical_safe_denoiser', f's={scale:g} bw={bandwidth:g} first {window} {gate}',
                          practical_safe_denoiser(refs, scale, bandwidth, thr, grid=ddpm_grid, window_steps=window,
                                                  key=key), 'ddpm50'))
    return out


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
    from jaxdiff import toy
    from jaxdiff.transforms import (PRESETS, exact_safe_denoiser, mixture_density, negative_classifier_guidance,
                                paper_safe_denoiser, safe_classifier_guidance, sld, unguidance)
    harm = mixture_density(gm, unsafe, smoothing=1.0)
    safety_cond = jax.nn.one_hot(jnp.array([1]), gm.num_classes)
    methods = [Method('none', '-', lambda d: d)]
    methods += [Method('unguidance', f'gamma={g:g}', unguidance(harm, g, eta, 'invlinear')) for g in (10, 30, 100)]
    methods += [Method('negative_classifier_guidance', f'scale={s:g}', negative_classifier_guidance(_log(harm), s))
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
        methods += seed_unguidance_methods(harm, eta, (1.0, 3.0, 10.0), ddpm_grid)
        methods.append(Method('none', '-', lambda d: d, 'ddpm50'))
        methods += practical_methods(refs, ddpm_grid, MIXTURE_PRACTICAL, key)
    return methods


def mixture_metrics(gm, unsafe: Sequence[int], x) -> dict[str, Any]:
    """unsafe mass, the share ``off`` the modes, the safe modes' min / max share over their safe sub-mixture
    share, whether that meets MIXTURE_TARGET, and the per-mode shares (K,), for samples x (N, 2)."""
    from jaxdiff import toy
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
    from jaxdiff.sampling.options import SOLVERS
    if solver == 'edm':
        return lambda d, z, key: SOLVERS['edm'](d, z, num_steps=num_steps)
    name, _ = DISCRETE[solver]
    return lambda d, z, key: SOLVERS[name](d, z, key=key, num_steps=DDPM_STEPS)


def run_mixture(num_samples: int, num_steps: int, seed: int = 0, methods: Optional[Sequence[str]] = None,
                log: Callable[[str], None] = print, mixture: str = 'ring',
                method_list: Optional[list[Method]] = None,
                eta: float = UNGUIDANCE_ETA['mixture']) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(result dict, {'name strength solver': samples (N, 2)}) for one of MIXTURES (module docstring).

    method_list: rows to run instead of :func:`mixture_methods`' (e.g. a parameter grid); ``none`` is not added.
    eta: unguidance's threshold.
    """
    from jaxdiff import schedules, toy
    from jaxdiff.transforms import sub_mixture
    if mixture not in MIXTURES:
        raise ValueError(f'unknown mixture {mixture!r}; choose one of {", ".join(MIXTURES)}')
    build, unsafe = MIXTURES[mixture]
    gm = build()
    sigmas = schedules.karras_sigmas(num_steps)
    refs = toy.sample(sub_mixture(gm, unsafe), jax.random.key(seed + 1), 256)[0]
    latents = jax.random.normal(jax.random.key(seed), (num_samples, 2))
    if method_list is None:
        method_list = _select(mixture_methods(gm, unsafe, sigmas, refs, schedules.ddpm_sigmas(DDPM_STEPS),
                                              jax.random.key(seed + 2), eta), methods)
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


# ----------------------------------------------------------------------------------------------- digits

def float_logits(net) -> Callable[[jax.Array], jax.Array]:
    """Differentiable logits of a FeatureNet: images (B, H, W, C) float in [-1, 1] -> (B, K), clipped to [-1, 1]
    as the uint8 conversion clips them (a saturated pixel gets no gradient; moving it would not change the stored
    image anyway). ``FeatureNet.apply`` takes uint8, whose rounding has no gradient."""
    return lambda x: net.apply_float(jnp.clip(x, -1.0, 1.0))['logits']


# (scale, bandwidth, window_steps, margin or None) of the practical safe denoiser on digits: the code's nudity
# settings, then the two best rows of --practical_grid (the first 25 steps, sigma >= 3.6; wider windows wreck the
# images: FD ratio >= 2.6 at 35 steps).
DIGITS_PRACTICAL = ((0.33, 3.15, 11, 1.6), (0.33, 3.15, 25, 0.0), (1.0, 1.0, 25, 0.0))


def digits_methods(logits_fn, unsafe_digit: int, num_classes: int, refs, sigmas,
                   noisy_logits: Optional[Callable] = None, ddpm_grid=None, key=None,
                   eta: float = UNGUIDANCE_ETA['digits']) -> list[Method]:
    """The compared methods for a class-conditional image model with a clean-image classifier ``logits_fn``.

    Strengths were picked by hand on out/demo/digits (digit 7): the middle one of each method is the useful one.

    refs: (M, H, W, C) float reference images of the unsafe digit; sigmas: the sampler's grid.
    noisy_logits: (x, sigma) -> (B, num_classes) of a noise-conditional classifier; adds safe classifier guidance.
    ddpm_grid, key: the 50-step DDPM/DDIM grid and the practical safe denoiser's re-noising key (None: the rows on
        the discrete solvers are left out).
    eta: unguidance's threshold on the classifier's probability of the unsafe digit.
    """
    from jaxdiff.transforms import PRESETS, classifier_density, negative_classifier_guidance, paper_safe_denoiser, sld
    from jaxdiff.transforms import safe_classifier_guidance, unguidance
    harm = classifier_density(logits_fn, [unsafe_digit])
    safety_cond = jax.nn.one_hot(jnp.array([unsafe_digit]), num_classes)
    methods = [Method('none', '-', lambda d: d)]
    methods += [Method('unguidance', f'gamma={g:g}', unguidance(harm, g, eta, 'invlinear')) for g in (3.0, 10.0, 30.0)]
    methods += [Method('negative_classifier_guidance', f'scale={s:g}', negative_classifier_guidance(_log(harm), s))
                for s in (0.01, 0.03, 0.1)]
    if noisy_logits is not None:
        methods += [Method('safe_classifier_guidance', f'scale={s:g}',
                           safe_classifier_guidance(noisy_logits, [unsafe_digit], num_classes, s))
                    for s in (1.0, 2.0, 4.0)]
    methods += [Method('paper_safe_denoiser', f'beta={b:g}', paper_safe_denoiser(refs, b, 2.0, sigma_lo=1.0))
                for b in (0.33, 0.6)]
    methods += [Method('sld', preset, sld(safety_cond, preset, 1.0, sigmas=sigmas)) for preset in PRESETS]
    if ddpm_grid is not None:
        methods += seed_unguidance_methods(harm, eta, (1.0, 3.0, 10.0), ddpm_grid)
        methods.append(Method('none', '-', lambda d: d, 'ddpm50'))
        methods += practical_methods(refs, ddpm_grid, DIGITS_PRACTICAL, key)
    return methods


def sample_digits(model, num_samples: int, build: Callable, batch_size: int, solver: str, num_steps: int):
    """uint8 (N, H, W, C) unconditional samples of seeds 0..N-1 with solver 'edm' (Heun, num_steps; sample.py's
    sample_array) or a DISCRETE one (50-step DDPM / DDIM, sample.py's per-seed latents and noise keys)."""
    from jaxdiff.sampling import options
    from jaxdiff.sampling.generate import Labels, local_mesh, make_generator, sample_array
    if solver == 'edm':
        return sample_array(model, num_samples, build=build, batch_size=batch_size, num_steps=num_steps)
    name, _ = DISCRETE[solver]
    fn = options.make_solver(name, options.resolve_solver(name, {'num_steps': DDPM_STEPS}, model.sigma_range))
    shape = (model.resolution, model.resolution, model.channels)
    gen = make_generator(lambda v: build(model.denoiser(v)), fn, Labels('none', (), model.label_dim), shape,
                         local_mesh())
    batch = min(batch_size, num_samples)
    out = [np.asarray(gen(model.variables, jnp.arange(i, i + batch, dtype=jnp.int32))[0])[:num_samples - i]
           for i in range(0, num_samples, batch)]
    return np.concatenate(out)


def run_digits(workdir: str, unsafe_digit: int, num_samples: int, num_steps: int, batch_size: int,
               methods: Optional[Sequence[str]] = None, noisy_classifier: Optional[str] = None,
               log: Callable[[str], None] = print, practical_grid: Optional[Sequence[tuple]] = None,
               seed: int = 0, eta: float = UNGUIDANCE_ETA['digits']) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(result dict, {'name strength solver': uint8 samples}) for the digits task (module docstring).

    practical_grid: (scale, bandwidth, window_steps, margin or None) settings to run instead of the method list
    (with the ddpm50 ``none`` row); seed: the practical safe denoiser's re-noising key; eta: unguidance's
    threshold."""
    from jaxdiff import schedules
    from jaxdiff.metrics import frechet
    from jaxdiff.metrics.feature_classifier import dataset_split, load_or_train
    from jaxdiff.sampling.generate import local_mesh
    from jaxdiff.sampling.model import load_model
    from jaxdiff.sampling.options import grid_ends
    from jaxdiff.sampling.model import noisy_classifier_logits
    model = load_model(workdir)
    net = load_or_train('digits_classifier', log=log)
    noisy = noisy_classifier_logits(noisy_classifier) if noisy_classifier else None
    if noisy is not None and noisy.num_classes != model.label_dim:
        raise ValueError(f'--noisy_classifier {noisy_classifier} has {noisy.num_classes} classes, the model '
                         f'{model.label_dim}')
    if not model.label_dim:
        raise ValueError(f'{workdir} holds an unconditional model; the digits task needs a class-conditional one '
                         '(SLD conditions on the unsafe digit; train with data.use_labels=True)')
    if not 0 <= unsafe_digit < min(model.label_dim, net.num_classes):
        raise ValueError(f'--unsafe_digit {unsafe_digit} is not a class of the model (0..{model.label_dim - 1})')
    if (model.resolution, model.channels) != (net.resolution, net.channels):
        raise ValueError(f'the model makes {model.resolution}x{model.resolution}x{model.channels} images; the '
                         f'{net.name} reads {net.resolution}x{net.resolution}x{net.channels}')
    if batch_size % len(local_mesh().devices.ravel()):
        raise ValueError(f'--batch_size {batch_size} must be a multiple of the {jax.local_device_count()} devices')
    images, labels = dataset_split(net.name, 'train')
    refs = images[labels == unsafe_digit].astype(np.float32) / 127.5 - 1
    ref_images, ref_labels = dataset_split(net.name, 'ref')
    ref_stats = frechet.FeatureStats()
    ref_stats.update(net.apply(ref_images[ref_labels != unsafe_digit])['features'])
    sigmas = schedules.karras_sigmas(num_steps, *grid_ends({}, model.sigma_range))
    ddpm_grid, key = schedules.ddpm_sigmas(DDPM_STEPS), jax.random.key(seed + 2)
    if practical_grid is not None:
        method_list = [Method('none', '-', lambda d: d, 'ddpm50')] + practical_methods(refs, ddpm_grid,
                                                                                         practical_grid, key)
    else:
        method_list = _select(digits_methods(float_logits(net), unsafe_digit, model.label_dim, refs, sigmas, noisy,
                                             ddpm_grid, key, eta), methods)
    rows, samples = [], {}
    for method in method_list:
        begin = time.perf_counter()
        out = sample_digits(model, num_samples, method.build, batch_size, method.solver, num_steps)
        result = net.apply(out)
        unsafe = np.asarray(jnp.argmax(result['logits'], axis=1)) == unsafe_digit
        rows.append(dict(method=method.name, strength=method.strength, solver=method.solver,
                         unsafe=float(unsafe.mean()),
                         fd=frechet.features_distance(np.asarray(result['features'])[~unsafe], ref_stats),
                         seconds=round(time.perf_counter() - begin, 2)))
        samples[f'{method.name} {method.strength} {method.solver}'] = out
        log(f'{method.name} {method.strength} ({method.solver}): unsafe {rows[-1]["unsafe"]:.3f}, '
            f'fd {rows[-1]["fd"]:.3f} ({rows[-1]["seconds"]:.1f}s)')
    bases = _baselines(rows)
    for row in rows:
        base = bases[row['solver']]
        row['fd_ratio'] = row['fd'] / base['fd']
        drop = base['unsafe'] / row['unsafe'] if row['unsafe'] else float('inf')
        row['meets_target'] = bool(drop >= DIGITS_TARGET_DROP and row['fd_ratio'] <= DIGITS_TARGET_FD)
    result = dict(task='digits', workdir=os.path.abspath(workdir), unsafe_digit=unsafe_digit, eta=eta,
                  num_samples=num_samples, num_steps=num_steps, classifier_accuracy=net.accuracy,
                  noisy_classifier=noisy_classifier and os.path.abspath(noisy_classifier), num_ref=int(ref_stats.count),
                  target=dict(unsafe_drop=DIGITS_TARGET_DROP, fd_ratio=DIGITS_TARGET_FD),
                  rows=rows)
    return result, samples


def digits_plot(samples: dict[str, np.ndarray], path: str) -> str:
    """One row of the first PREVIEW samples per method (rows in table order); writes ``path`` (PNG)."""
    from PIL import Image
    from jaxdiff.train.sample_grid import grid_image
    first = np.concatenate([np.resize(x[:PREVIEW], (PREVIEW,) + x.shape[1:]) for x in samples.values()])
    grid = grid_image(first, PREVIEW)
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(path)
    return path


# ----------------------------------------------------------------------------------------------- CLI

# The practical safe denoiser's parameter grid (--practical_grid): scale x bandwidth x window_steps x gate
# (margin 0 below the calibrated threshold, or no gate).
PRACTICAL_GRID = {
    'mixture': dict(scale=(0.1, 0.33, 1.0, 3.0), bandwidth=(0.5, 1.0, 3.15), window=(11, 25, 40, 45),
                    margin=(0.0, None)),
    'digits': dict(scale=(0.33, 1.0), bandwidth=(1.0, 3.15), window=(11, 25, 35, 45), margin=(0.0, None)),
}


def practical_grid(task: str) -> list[tuple]:
    """PRACTICAL_GRID[task] as (scale, bandwidth, window_steps, margin) tuples."""
    g = PRACTICAL_GRID[task]
    return [(s, b, w, m) for s in g['scale'] for b in g['bandwidth'] for w in g['window'] for m in g['margin']]


def _fail(message: str, code: int) -> None:
    fail('eval.safety', message, code)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI entry point (see the module docstring)."""
    ap = argument_parser('eval.safety', __doc__.splitlines()[0])
    ap.add_argument('--task', choices=('mixture', 'digits'), default='mixture', help='2-D oracle or a digits model')
    ap.add_argument('--mixture', choices=tuple(MIXTURES), default='ring',
                    help='mixture: which labelled 2-D mixture (ring: the one the README tuned on)')
    ap.add_argument('--practical_grid', action='store_true',
                    help='run the practical safe denoiser over PRACTICAL_GRID (scale x bandwidth x window x gate) '
                         'instead of the method list')
    ap.add_argument('--out', default='out/safety', help='folder for the JSON and PNG')
    ap.add_argument('--num_samples', type=int, default=None, help='samples per method (mixture 4000, digits 1000)')
    ap.add_argument('--num_steps', type=int, default=18, help='EDM Heun steps')
    ap.add_argument('--methods', default=None, help='comma list of methods to run (none is always run)')
    ap.add_argument('--seed', type=int, default=0,
                    help='key of the mixture latents and reference set, and of the re-noising draws')
    ap.add_argument('--workdir', default=None, help='digits: train.py run directory of a class-conditional model')
    ap.add_argument('--eta', type=float, default=None,
                    help=f'unguidance\'s threshold on p_h (default: {UNGUIDANCE_ETA})')
    ap.add_argument('--unsafe_digit', type=int, default=7, help='digits: the class counted as unsafe')
    ap.add_argument('--batch_size', type=int, default=250, help='digits: samples per jitted call')
    ap.add_argument('--noisy_classifier', default=None,
                    help='digits: train.py run of configs/digits_noisy_classifier.py; adds safe classifier guidance')
    args = ap.parse_args(argv)
    if args.task == 'digits' and not args.workdir:
        _fail('--task digits needs --workdir RUN (a class-conditional train.py run)', 2)
    num = args.num_samples or (4000 if args.task == 'mixture' else 1000)
    if num < 2 or args.num_steps < 1 or args.batch_size < 1:
        _fail('--num_samples must be >= 2, --num_steps and --batch_size >= 1', 2)
    methods = args.methods.split(',') if args.methods else None
    eta = UNGUIDANCE_ETA[args.task] if args.eta is None else args.eta
    log = lambda m: print(m, file=sys.stderr, flush=True)
    try:
        os.makedirs(args.out, exist_ok=True)
        grid = practical_grid(args.task) if args.practical_grid else None
        suffix = '_practical_grid' if grid else ''
        if args.task == 'mixture':
            build, unsafe = MIXTURES[args.mixture]
            method_list = None
            if grid:
                from jaxdiff import schedules, toy
                from jaxdiff.transforms import sub_mixture
                refs = toy.sample(sub_mixture(build(), unsafe), jax.random.key(args.seed + 1), 256)[0]
                method_list = [Method('none', '-', lambda d: d, 'ddpm50')] + practical_methods(
                    refs, schedules.ddpm_sigmas(DDPM_STEPS), grid, jax.random.key(args.seed + 2))
            result, samples = run_mixture(num, args.num_steps, args.seed, methods, log, args.mixture, method_list,
                                          eta)
            name = ('mixture' if args.mixture == 'ring' else args.mixture) + suffix
            result['plot'] = mixture_plot(samples, np.asarray(build().means)[list(unsafe)],
                                          os.path.join(args.out, f'safety_{name}.png'))
            columns = ('method', 'strength', 'solver', 'unsafe', 'off', 'min_ratio', 'max_ratio', 'meets_target',
                       'seconds')
        else:
            name = 'digits' + suffix
            result, samples = run_digits(args.workdir, args.unsafe_digit, num, args.num_steps, args.batch_size,
                                         methods, args.noisy_classifier, log, grid, args.seed, eta)
            result['plot'] = digits_plot(samples, os.path.join(args.out, f'safety_{name}.png'))
            columns = ('method', 'strength', 'solver', 'unsafe', 'fd', 'fd_ratio', 'meets_target', 'seconds')
        result['json'] = os.path.join(args.out, f'safety_{name}.json')
        line = json.dumps(result)
        with open(result['json'], 'w') as f:
            f.write(line + '\n')
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as e:
        _fail(str(e), 1)
    log(text_table(result['rows'], columns))
    print(line, flush=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
