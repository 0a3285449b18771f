"""A guidance sweep on a class-conditional model: unguided, CFG, CFG in a guidance interval and autoguidance by a
guide run at several of its checkpoints, each at several weights, scored by Fréchet distance and precision/recall.

Every setting samples the same seeds (class-balanced labels) through :func:`jaxdiff.sampling.run.sample` into
``OUT/samples/<setting>/`` (resumable shards, as sample.py writes them), and is scored by
:func:`jaxdiff.evaluation.fid.evaluate` against a reference image set in a feature space (default: digits with the
digits classifier). The unguided model also runs with twice the steps, the NFE the guided settings spend. NFE per
image counts network evaluations from the solver's evaluation plan: 1 per evaluation, 2 where guidance ran (the
CFG pair runs as one call on a doubled batch, which counts 2).
"""
from __future__ import annotations

import functools
import os
from typing import Any, Callable, NamedTuple, Optional, Sequence


CFG_WEIGHTS = (1.5, 2.0, 3.0, 4.0)
AUTOGUIDANCE_WEIGHTS = (1.5, 2.0, 2.5, 3.0)
INTERVALS = ((0.28, 2.9),)  # EDM2-S img512's interval (METHODS.md §8)


class GuidanceSetting(NamedTuple):
    name: str                                     # the folder name under OUT/samples
    method: str                                   # none | cfg | cfg+interval | autoguidance
    weight: float
    spec: Optional[str]                           # the sample.py --guidance spec (None: unguided)
    num_steps: int
    detail: str = ''                              # what tells rows of one method apart (interval, guide step)
    interval: Optional[tuple[float, float]] = None


def sweep_settings(guide: Optional[str], guide_steps: Sequence[Optional[int]], num_steps: int,
                   cfg_weights: Sequence[float] = CFG_WEIGHTS,
                   autoguidance_weights: Sequence[float] = AUTOGUIDANCE_WEIGHTS,
                   intervals: Sequence[tuple[float, float]] = INTERVALS) -> list[GuidanceSetting]:
    """The settings of one sweep, unguided first (at num_steps and at twice that)."""
    out = [GuidanceSetting('none', 'none', 1.0, None, num_steps),
           GuidanceSetting(f'none_{2 * num_steps}steps', 'none', 1.0, None, 2 * num_steps, f'{2 * num_steps} steps')]
    out += [GuidanceSetting(f'cfg_w{w:g}', 'cfg', w, f'cfg:weight={w}', num_steps) for w in cfg_weights]
    for lo, hi in intervals:
        out += [GuidanceSetting(f'cfg_w{w:g}_interval{lo:g}-{hi:g}', 'cfg+interval', w,
                                f'cfg:weight={w},interval={lo}:{hi}', num_steps, f'({lo:g}, {hi:g}]', (lo, hi))
                for w in cfg_weights]
    if guide:
        for step in guide_steps or [None]:  # None: the guide's newest checkpoint
            at = '' if step is None else f'_step{step}'
            out += [GuidanceSetting(f'auto_w{w:g}{at}', 'autoguidance', w,
                                    f'autoguidance:guide="{guide}",weight={w}' + ('' if step is None else
                                                                                  f',step={step}'),
                                    num_steps, 'guide newest step' if step is None else f'guide step {step}')
                    for w in autoguidance_weights]
    return out


@functools.cache
def _edm_plan(num_steps: int, sigma_range: tuple[float, float]):
    from jaxdiff.sampling import options
    from jaxdiff.solvers.plan import evaluation_plan
    return evaluation_plan(options.make_solver('edm', options.resolve_solver('edm', {'num_steps': num_steps},
                                                                             sigma_range)))


def nfe_per_image(setting: GuidanceSetting, sigma_range: tuple[float, float] = (0.002, 80.0)) -> float:
    """Network evaluations per image of EDM Heun: the plan's evaluations, plus one more where guidance runs."""
    from jaxdiff.transforms.guided import evaluations_per_image
    plan = _edm_plan(setting.num_steps, tuple(sigma_range))
    return evaluations_per_image(plan.step_sigmas, setting.method != 'none', setting.interval)


def run_sweep(workdir: str, out: str, *, guide: Optional[str] = None, guide_steps: Sequence[int] = (),
              num_samples: int = 2000, num_steps: int = 18, batch_size: int = 250, ref: str = 'digits',
              features: str = 'digits_classifier', settings: Optional[Sequence[GuidanceSetting]] = None,
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """Sample and score every setting (module docstring); returns {'rows': [...], 'best': {...}, ...}.

    workdir: the main model's train.py run (class-conditional); guide: the guide's run (None: no autoguidance rows)
    at ``guide_steps`` (its checkpoints); ref, features: the Fréchet reference and feature extractor
    (:mod:`jaxdiff.evaluation.fid`). Sample folders already complete are reused.
    """
    from jaxdiff.evaluation.fid import evaluate
    from jaxdiff.sampling import generate, run
    from jaxdiff.sampling.model import load_model
    model = load_model(workdir)
    if not model.label_dim:
        raise ValueError(f'{workdir} is an unconditional model; guidance needs a class-conditional one')
    settings = list(settings or sweep_settings(guide, guide_steps, num_steps))
    labels = generate.make_labels(model.label_dim, class_balanced=True)
    rows = []
    for k, setting in enumerate(settings):
        folder = os.path.join(out, 'samples', setting.name)
        log(f'[{k + 1}/{len(settings)}] {setting.name}: sampling {num_samples:,} images')
        run.sample(model, folder, first=0, end=num_samples, batch_size=batch_size, shard_size=num_samples,
                   solver_options={'num_steps': setting.num_steps}, labels=labels,
                   transforms=[setting.spec] if setting.spec else [], log=lambda _: None)
        scores = evaluate(folder, ref, features, log=lambda _: None)
        rows.append(dict(setting=setting.name, method=setting.method, weight=setting.weight, detail=setting.detail,
                         nfe=nfe_per_image(setting, model.sigma_range), fd=round(float(scores['fd']), 4),
                         precision=round(float(scores['precision']), 4), recall=round(float(scores['recall']), 4)))
        log(f'  fd {rows[-1]["fd"]:.3f}, precision {rows[-1]["precision"]:.3f}, recall {rows[-1]["recall"]:.3f}, '
            f'NFE {rows[-1]["nfe"]:g}')
    best = {}
    for row in rows:
        if row['method'] not in best or row['fd'] < best[row['method']]['fd']:
            best[row['method']] = row
    return dict(task='digits', workdir=workdir, guide=guide, num_samples=num_samples, num_steps=num_steps, ref=ref,
                features=features, rows=rows, best=best)


def sweep_plot(result: dict, path: str) -> str:
    """FD against the guidance weight, one line per method (and per guide step / interval); writes ``path``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(6.0, 4.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    lines: dict[str, list] = {}
    for row in result['rows']:
        if row['method'] != 'none':
            lines.setdefault(f'{row["method"]} {row["detail"]}'.strip(), []).append((row['weight'], row['fd']))
    for name, points in lines.items():
        w, fd = zip(*sorted(points))
        ax.plot(w, fd, marker='o', label=name)
    for row in result['rows']:
        if row['method'] == 'none':
            ax.axhline(row['fd'], linestyle='--', color='gray' if row['detail'] else 'black', linewidth=1)
    ax.set_xlabel('guidance weight w (dashed: unguided; grey: at twice the steps)')
    ax.set_ylabel(f'FD ({result["features"]} features)')
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    return path
