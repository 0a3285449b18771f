"""Fair sampling by attribute switching, evaluated: attribute rate and BER without and with switching, on 2-D
mixtures with exact denoisers or a digits model (``python -m eval.fairness`` parses the flags and prints).

A :class:`Task` is what the evaluation needs (denoiser, attribute -> cond, the shown attribute, the grid);
:func:`evaluate` runs the base sampling, tau_search under both criteria and the optional calibration scan, and
returns the JSON-able result; :func:`plot` and :func:`table` show it.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import schedules, toy
from jaxdiff.sampling.generate import to_uint8
from jaxdiff.solvers import heun_sampler
from jaxdiff.transforms import attribute_switching as F

FAIR = 0.5
# The run that switches at each tau_search criterion's tau (attribute_switching.switch_curve): batch is the
# reference's.
SEARCH_RUNS = {'batch': 'switch_search', 'sample': 'switch_search_sample'}


class Task(NamedTuple):
    """What the evaluation needs of a task.

    denoiser: D(x, sigma, cond); cond_rows: attribute (B,) int {0, 1} -> cond (B, K);
    shown: samples (B, ...) -> (attribute shown (B,) bool, valid (B,) bool: the verdict is one of the two);
    sample_shape: one sample's shape; sigmas: (N+1,) the sampling grid; description: JSON-able.
    """
    denoiser: Callable
    cond_rows: Callable
    shown: Callable
    sample_shape: tuple
    sigmas: np.ndarray
    description: dict


# The 2-D tasks: name -> (what it varies, builder(prior) -> AttributeMixture). Each region shows attribute 1 or
# 0; the condition s moves weight between the attributes (p_match), and the data bias is p(s = 1) = prior.
MIXTURES = {
    'mixture': ('mirror pair: A (+2, 0) and B (-2, 0), std 0.5, p(A | s=1) = p(B | s=0) = 0.95',
                lambda prior: F.attribute_mixture([[2.0, 0.0], [-2.0, 0.0]], 0.5, [1, 0], p_s1=prior)),
    'mixture_spread': ('unequal spreads: A (+2, 0) std 0.25, B (-2, 0) std 0.75',
                       lambda prior: F.attribute_mixture([[2.0, 0.0], [-2.0, 0.0]], [0.25, 0.75], [1, 0],
                                                         p_s1=prior)),
    'mixture_weak': ('unequal conditioning: mirror pair with p(A | s=1) = 0.95 but p(B | s=0) = 0.7',
                     lambda prior: F.attribute_mixture([[2.0, 0.0], [-2.0, 0.0]], 0.5, [1, 0], p_s1=prior,
                                                       p_match=(0.95, 0.7))),
    'mixture_ring': ('three modes per attribute, interleaved: 6 modes on a radius-3 ring (std 0.3), A at '
                     '0/120/240 degrees, B at 60/180/300',
                     lambda prior: F.attribute_mixture(
                         3.0 * np.stack([np.cos(np.arange(6) * np.pi / 3), np.sin(np.arange(6) * np.pi / 3)], 1),
                         0.3, [1, 0, 1, 0, 1, 0], p_s1=prior)),
    'mixture_close': ('overlapping pair: A (+1, 0) and B (-1, 0), std 0.5',
                      lambda prior: F.attribute_mixture([[1.0, 0.0], [-1.0, 0.0]], 0.5, [1, 0], p_s1=prior)),
}


def mixture_task(steps: int, prior: float, name: str = 'mixture') -> Task:
    """The 2-D mixture task ``name`` (a key of :data:`MIXTURES`) with the data bias p(s = 1) = prior; the shown
    attribute is that of the sample's most likely region
    (:meth:`jaxdiff.transforms.attribute_switching.AttributeMixture.shown`)."""
    what, build = MIXTURES[name]
    am = build(prior)
    return Task(toy.denoiser(am.gm), lambda a: jax.nn.one_hot(a, 2),
                lambda x: (am.shown(x), jnp.ones(x.shape[:1], bool)), (2,),
                schedules.karras_sigmas(steps),
                dict(kind=name, mixture=what, attribute='most likely region shows attribute 1', data_bias=prior))


def digits_task(model, classifier, classes: tuple[int, int], steps: int) -> Task:
    """A class-conditional model with attribute a -> class classes[a]; ``classifier`` as feature_classifier's
    ``apply(uint8 (B,H,W,C)) -> {'logits': (B, 10)}``."""
    lo, hi = model.sigma_range
    table = jnp.asarray(classes, jnp.int32)

    def shown(x):
        verdict = jnp.argmax(classifier(to_uint8(x))['logits'], axis=1)
        return verdict == table[1], (verdict == table[0]) | (verdict == table[1])

    return Task(model.denoiser(model.variables), lambda a: jax.nn.one_hot(table[a], model.label_dim), shown,
                (model.resolution, model.resolution, model.channels),
                schedules.karras_sigmas(steps, sigma_min=max(0.002, lo), sigma_max=min(80.0, hi)),
                dict(kind='digits', attribute=f'classified {classes[1]} (vs {classes[0]})', classes=list(classes),
                     model=model.description))


def _sampler(task: Task, batch_size: int):
    """(latents (B, ...), start (B,) int, tau ()) -> (shown (B,) bool, valid (B,) bool), batched; tau = 0 never
    switches (plain conditional sampling), and start None samples attribute-blind (zero cond)."""

    @jax.jit
    def run(z, start, tau):
        s0 = task.cond_rows(start)
        x = heun_sampler(F.attribute_switch(s0, task.cond_rows(1 - start), tau)(task.denoiser), z, task.sigmas,
                         cond=s0)
        return task.shown(x)

    @jax.jit
    def blind(z):
        x = heun_sampler(task.denoiser, z, task.sigmas, cond=jnp.zeros_like(task.cond_rows(jnp.zeros(len(z), int))))
        return task.shown(x)

    def sample(z, start, tau=0.0):
        out = [blind(z[i:i + batch_size]) if start is None else
               run(z[i:i + batch_size], start[i:i + batch_size], jnp.float32(tau))
               for i in range(0, len(z), batch_size)]
        return tuple(np.concatenate([np.asarray(o[k]) for o in out]) for k in (0, 1))

    return sample


def measure(shown: np.ndarray, valid: np.ndarray, start: Optional[np.ndarray]) -> dict:
    """Rate of attribute 1 and BER of predicting ``start`` from it, over the valid samples ((N,) arrays); None
    where undefined (no valid sample; no start, or one value of it without valid samples)."""
    n = int(valid.sum())
    rate = float(F.attribute_rate(shown[valid])) if n else None
    # BER is undefined (None) when one initial attribute has no valid sample.
    ber = float(F.balanced_error_rate(shown[valid], start[valid])) if start is not None and n else float('nan')
    return dict(rate=rate, ber=None if np.isnan(ber) else ber, valid=n / len(valid))


def evaluate(task: Task, *, num_samples: int, prior: float, search_samples: int, scan_samples: int,
             batch_size: int, seed: int = 0, blind: bool = False, scan_window: Optional[int] = None,
             log=print) -> dict:
    """Everything the CLI reports (see the module docstring), as a JSON-able dict. ``scan_window`` W limits the
    scan to the grid indices within W of either tau_search index (None: the whole grid); the others' scan
    entries are None."""
    keys = [jax.random.fold_in(jax.random.key(seed), i) for i in range(6)]
    shape = task.sample_shape
    sample = _sampler(task, batch_size)
    search_start = np.asarray(jax.random.bernoulli(keys[0], prior, (search_samples,)), np.int32)
    search_z = jax.random.normal(keys[1], (search_samples, *shape))
    # Both criteria score the same two chains (same latents and conditions).
    searches = {norm: F.tau_search(task.denoiser, search_z, task.sigmas, task.cond_rows(search_start),
                                   task.cond_rows(1 - search_start), norm=norm) for norm in F.NORMS}
    n_grid = len(task.sigmas)
    taus = [float(F.switch_sigma(task.sigmas, i)) for i in range(n_grid)]
    for norm, search in searches.items():
        log(f'tau_search ({norm} norm): index {int(search.index)} of {n_grid - 1}, '
            f'tau_sigma {float(search.sigma):.4g}')

    scan = None
    if scan_samples:
        zc = jax.random.normal(keys[2], (scan_samples, *shape))
        sc = np.asarray(jax.random.bernoulli(keys[5], prior, (scan_samples,)), np.int32)
        near = lambda i: scan_window is None or min(abs(i - int(s.index)) for s in searches.values()) <= scan_window
        rows = [measure(*sample(zc, sc, tau), sc) if near(i) else dict(rate=None, ber=None)
                for i, tau in enumerate(taus)]
        scan = dict(rate=[r['rate'] for r in rows], ber=[r['ber'] for r in rows])

    z = jax.random.normal(keys[3], (num_samples, *shape))
    start = np.asarray(jax.random.bernoulli(keys[4], prior, (num_samples,)), np.int32)
    runs = {}
    if blind:
        runs['base'] = dict(measure(*sample(z, None), None), tau_index=None, tau_sigma=None)
    # switch_sigma(grid, N) = 0 lies below every level the sampler evaluates: no step is conditioned on s1.
    picks = [('conditional', n_grid - 1)] + [(SEARCH_RUNS[norm], int(s.index)) for norm, s in searches.items()]
    if scan is not None:
        gaps = [np.inf if b is None else abs(b - FAIR) for b in scan['ber']]
        if np.isfinite(min(gaps)):
            picks.append(('switch_best', int(np.argmin(gaps))))
    for name, index in picks:
        runs[name] = dict(measure(*sample(z, start, taus[index]), start), tau_index=index,
                          tau_sigma=taus[index] if np.isfinite(taus[index]) else None)
    found = {f'tau_search{"" if norm == "batch" else "_" + norm}':
             dict(index=int(s.index), sigma=float(s.sigma), norm=norm, curve=[float(c) for c in np.asarray(s.curve)])
             for norm, s in searches.items()}
    return dict(task=task.description, prior=prior, num_samples=num_samples, steps=n_grid - 1,
                search_samples=search_samples, scan_samples=scan_samples, scan_window=scan_window, seed=seed,
                **found, tau_sigmas=[t if np.isfinite(t) else None for t in taus], scan=scan, runs=runs)


def plot(result: dict, path: str) -> None:
    """D(tau) over the grid index, and (with a scan) the measured rate and BER, marking the chosen taus."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    scan = result['scan']
    fig, axes = plt.subplots(2 if scan else 1, 1, figsize=(7, 6 if scan else 3.5), sharex=True, squeeze=False)
    index = np.arange(len(result['tau_search']['curve']))
    ax = axes[0, 0]
    for key, color in (('tau_search', 'C0'), ('tau_search_sample', 'C1')):
        curve = np.asarray(result[key]['curve'])
        ax.plot(index, curve / curve.max(), color=color, label=f"{result[key]['norm']} norm")
    ax.set_ylabel('D(tau) / max')
    ax.set_title(f"attribute switching: {result['task']['kind']}")
    for a in axes[:, 0]:
        for name, style in (('switch_search', ':'), ('switch_search_sample', '-.'), ('switch_best', '--')):
            if name in result['runs']:
                a.axvline(result['runs'][name]['tau_index'], color='k', linestyle=style, label=name)
    ax.legend(fontsize=8)
    if scan:
        ax = axes[1, 0]
        ax.plot(index, [np.nan if r is None else r for r in scan['rate']], label='rate of attribute 1')
        ax.plot(index, [np.nan if b is None else b for b in scan['ber']], label='BER(shown, s0)')
        ax.axhline(FAIR, color='gray', linewidth=0.8)
        ax.set_ylabel('measured')
        ax.legend(fontsize=8)
    axes[-1, 0].set_xlabel('switch index (steps >= index use s1; 0 = s1 throughout)')
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def table(result: dict) -> str:
    """The runs as aligned text rows."""
    lines = [f"{'run':<21}{'tau_sigma':>10}{'rate':>8}{'BER':>8}{'valid':>8}"]
    for name, r in result['runs'].items():
        tau = '-' if r['tau_sigma'] is None else f"{r['tau_sigma']:.4g}"
        ber = '-' if r['ber'] is None else f"{r['ber']:.3f}"
        rate = '-' if r['rate'] is None else f"{r['rate']:.3f}"
        lines.append(f"{name:<21}{tau:>10}{rate:>8}{ber:>8}{r['valid']:>8.3f}")
    return '\n'.join(lines)
