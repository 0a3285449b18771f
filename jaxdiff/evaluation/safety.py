"""What the safety comparison's tasks share: a method row, the baseline rows per solver, the targets, the
discrete solvers and the rows of unguidance's seed update and of the practical safe denoiser.

The tasks: :mod:`jaxdiff.evaluation.safety_mixture` (2-D mixtures with exact denoisers) and
:mod:`jaxdiff.evaluation.safety_digits` (a digits model); the CLI ``python -m eval.safety`` runs either.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp

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


def log_density(density: Callable) -> Callable:
    """log p_h, floored: x0 (B, ...) -> (B,) log max(density(x0), TINY)."""
    return lambda x0: jnp.log(jnp.maximum(density(x0), TINY))


def select(methods: list[Method], names: Optional[Sequence[str]]) -> list[Method]:
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


def baselines(rows: list[dict]) -> dict[str, dict]:
    """{solver: that solver's ``none`` row} (a solver without one falls back to the first row)."""
    out = {r['solver']: r for r in rows if r['method'] == 'none'}
    return {r['solver']: out.get(r['solver'], rows[0]) for r in rows}


def seed_unguidance_methods(harm, eta: float, gammas: Sequence[float], grid) -> list[Method]:
    """Unguidance with the seed's exact DDIM update on the 50-step DDIM grid ``grid`` (N+1,) at each gamma
    (invlinear schedule, threshold eta), after that solver's ``none`` row."""
    from jaxdiff.transforms import unguidance
    eta_ddim = DISCRETE['ddim50'][1]
    return [Method('none', '-', lambda d: d, 'ddim50')] + [
        Method('unguidance', f'gamma={g:g} seed update', unguidance(harm, g, eta, 'invlinear', grid=grid,
                                                                    ddim_eta=eta_ddim), 'ddim50') for g in gammas]


def discrete_solver_methods(harm, eta: float, refs, grid, practical_settings: Sequence[tuple], key) -> list[Method]:
    """The rows on the 50-step discrete solvers: unguidance's seed update at gamma 1, 3, 10 on DDIM, then the
    practical safe denoiser at ``practical_settings`` on DDPM, each after its solver's ``none`` row."""
    return (seed_unguidance_methods(harm, eta, (1.0, 3.0, 10.0), grid) + [Method('none', '-', lambda d: d, 'ddpm50')]
            + practical_methods(refs, grid, practical_settings, key))


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
