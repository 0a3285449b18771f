"""The toy experiment of the autoguidance paper (Karras et al. 2024, Fig. 1) on an exact oracle: a 2-class 2-D
mixture of many narrow components along branching trees whose branches interleave, sampled with CFG and with
autoguidance at several weights, scored by what a person sees in the paper's figure.

Data: each class is four binary trees (a trunk and 4 levels of splits at +-24 degrees, each level 0.72 times as
long), rooted on a circle at alternating angles, so every tree of one class lies between two of the other.
Components sit along every segment 1.5 stds apart; the std narrows and the mass halves at each split, so the outer
branches are thin and of low density, where a sampler that concentrates loses them. Guide: the exact denoiser of
the same mixture with every std inflated 3x (a "worse" model that, like a smaller or shorter-trained network, blurs
the same structure); CFG's unconditional model is the exact mixture of both classes. Main denoiser, two cases: the
exact one (``main=exact``), which makes no outliers to remove, and the one of the mixture with stds inflated 1.5x
(``main=blurred``: a good model with errors of the guide's kind, the paper's setting, where outliers appear).

Metrics per setting, over N samples (half of each class):
- ``outliers``: share of samples more than 4 stds (its own) from every component of its class;
- ``branches_lost``: share of the outer branches (the subtrees from the second split on, 16 per class) that
  receive fewer than a quarter of the samples they would get from the true class distribution (branches that
  vanish); each sample counted at its most likely component of its class;
- ``branch_tv``: total-variation distance between the samples' and the true distribution over those branches;
- ``swd``: sliced Wasserstein-2 distance to as many exact draws of the same classes (0 for a perfect sampler up to
  sampling noise, which the ``exact`` row shows).
"""
from __future__ import annotations

import math
import time
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import toy, transforms
from jaxdiff.metrics.sliced_wasserstein import sliced_wasserstein
from jaxdiff.solvers import edm_sampler
from jaxdiff.transforms.guided import evaluations_per_image

GUIDE_STD_FACTOR = 3.0      # the guide's component stds over the data's
BLURRED_MAIN_FACTOR = 1.5   # the imperfect main model's (main=blurred)
OFF_DATA_STDS = 4.0         # a sample this many stds from every component of its class is an outlier
BRANCH_LEVEL = 2            # outer branches: the subtrees rooted at this split level
LOST_SHARE = 0.25           # a branch with less than this share of its expected samples is lost
CFG_WEIGHTS = (2.0, 3.0, 4.0)
AUTOGUIDANCE_WEIGHTS = (2.0, 3.0, 4.0)
INTERVAL = (0.28, 2.9)      # EDM2-S img512's interval (MET §8), for CFG at each weight as well


class BranchingMixture(NamedTuple):
    """The data mixture and the outer branch of each component (K,) (-1: nearer the root than BRANCH_LEVEL)."""
    gm: toy.GaussianMixture
    branch: np.ndarray


def branching_mixture(depth: int = 4, trees_per_class: int = 4, root_radius: float = 0.6, trunk: float = 1.4,
                      shrink: float = 0.72, angle_deg: float = 24.0, std0: float = 0.07) -> BranchingMixture:
    """The two-class branching mixture of the module docstring (about 1,000 components per class)."""
    means, stds, weights, labels, branch = [], [], [], [], []
    branches = [0]

    def grow(start, direction, length, level, mass, std, label, owner):
        if level == BRANCH_LEVEL:
            owner, branches[0] = branches[0], branches[0] + 1
        end = start + length * np.array([math.cos(direction), math.sin(direction)])
        count = max(2, int(round(length / (1.5 * std))))
        for t in (np.arange(count) + 0.5) / count:
            means.append(start + t * (end - start))
            stds.append(std)
            weights.append(mass / count)
            labels.append(label)
            branch.append(owner)
        if level < depth:
            for turn in (-1, 1):
                grow(end, direction + turn * math.radians(angle_deg), length * shrink, level + 1, mass / 2,
                     std * 0.85, label, owner)

    for k in range(2 * trees_per_class):
        angle = 2 * math.pi * k / (2 * trees_per_class)
        root = root_radius * np.array([math.cos(angle), math.sin(angle)])
        grow(root, angle, trunk, 0, 1.0, std0, k % 2, -1)
    gm = toy.mixture(np.asarray(means), np.asarray(stds), np.asarray(weights), np.asarray(labels), 2)
    return BranchingMixture(gm, np.asarray(branch))


def inflated(gm: toy.GaussianMixture, factor: float = GUIDE_STD_FACTOR) -> toy.GaussianMixture:
    """The same mixture with every std multiplied by ``factor`` (the guide)."""
    return gm._replace(stds=gm.stds * factor)


def toy_metrics(data: BranchingMixture, x: np.ndarray, labels: np.ndarray, exact: np.ndarray, key) -> dict:
    """The module docstring's metrics of samples x (N, 2) of classes labels (N,); exact (N, 2): true draws of the
    same classes in the same order."""
    gm = data.gm
    mu, s = np.asarray(gm.means, np.float64), np.asarray(gm.stds, np.float64)[:, 0]
    comp_labels, w = np.asarray(gm.labels), np.asarray(gm.weights, np.float64)
    dist = np.sqrt(((x[:, None, :] - mu[None]) ** 2).sum(-1)) / s[None]              # (N, K) in stds
    own = comp_labels[None] == labels[:, None]
    outliers = float(np.mean(np.where(own, dist, np.inf).min(1) > OFF_DATA_STDS))
    loglik = -0.5 * dist ** 2 - 2 * np.log(s[None]) + np.log(w[None])
    where = data.branch[np.argmax(np.where(own, loglik, -np.inf), 1)]                  # each sample's branch
    lost, tv = [], []
    for c in (0, 1):
        ids = np.unique(data.branch[(comp_labels == c) & (data.branch >= 0)])
        true = np.array([w[data.branch == g].sum() for g in ids]) / w[comp_labels == c].sum()
        got = np.array([np.sum(where[labels == c] == g) for g in ids]) / max(int(np.sum(labels == c)), 1)
        lost.append(np.mean(got < LOST_SHARE * true))
        tv.append(0.5 * np.abs(got / max(got.sum(), 1e-12) - true / true.sum()).sum())
    swd = float(sliced_wasserstein(jnp.asarray(x), jnp.asarray(exact), key))
    return dict(outliers=round(outliers, 4), branches_lost=round(float(np.mean(lost)), 4),
                branch_tv=round(float(np.mean(tv)), 4), swd=round(swd, 4))


class Setting(NamedTuple):
    main: str                      # 'exact' or 'blurred'
    method: str
    weight: float
    transform: Optional[Callable]  # None: the exact draws themselves


def settings(data: BranchingMixture, step_sigmas: np.ndarray) -> list[Setting]:
    """The exact draws, then for each main model: no guidance, CFG and CFG in the interval at CFG_WEIGHTS,
    autoguidance at AUTOGUIDANCE_WEIGHTS."""
    guide = toy.denoiser(inflated(data.gm, GUIDE_STD_FACTOR))
    interval = transforms.GuidanceInterval(*INTERVAL, step_sigmas)
    out = [Setting('exact', 'exact draws', 1.0, None)]
    for main in ('exact', 'blurred'):
        out.append(Setting(main, 'none', 1.0, lambda d: d))
        out += [Setting(main, 'cfg', w, transforms.cfg(w)) for w in CFG_WEIGHTS]
        out += [Setting(main, 'cfg+interval', w, transforms.cfg(w, interval=interval)) for w in CFG_WEIGHTS]
        out += [Setting(main, 'autoguidance', w, transforms.autoguidance(guide, w)) for w in AUTOGUIDANCE_WEIGHTS]
    return out


def title(row: dict) -> str:
    """'main=blurred cfg w=4' (the key of a row's samples)."""
    return f'main={row["main"]} {row["method"]} w={row["weight"]:g}'


def class_draws(gm: toy.GaussianMixture, labels: np.ndarray, key) -> np.ndarray:
    """Exact draws (N, 2) of the classes ``labels`` (N,), in that order."""
    out = np.zeros((len(labels), 2), np.float32)
    for c in np.unique(labels):
        sub = gm._replace(weights=jnp.where(gm.labels == c, gm.weights, 0.0))
        sub = sub._replace(weights=sub.weights / sub.weights.sum())
        out[labels == c] = np.asarray(toy.sample(sub, jax.random.fold_in(key, int(c)), int(np.sum(labels == c)))[0])
    return out


def run_toy(num_samples: int = 4000, num_steps: int = 32, seed: int = 0, log: Callable[[str], None] = print
            ) -> tuple[dict[str, Any], dict[str, np.ndarray], np.ndarray]:
    """(result dict with one row per setting, {title: samples (N, 2)}, labels (N,)) on the branching mixture, EDM Heun;
    NFE per sample counted from the solver's evaluation plan (2 per guided evaluation)."""
    from jaxdiff.solvers.plan import evaluation_plan
    data = branching_mixture()
    mains = {'exact': data.gm, 'blurred': inflated(data.gm, BLURRED_MAIN_FACTOR)}
    labels = np.arange(num_samples) % 2
    cond = jax.nn.one_hot(labels, 2)
    latents = jax.random.normal(jax.random.key(seed), (num_samples, 2))
    exact = class_draws(data.gm, labels, jax.random.key(seed + 1))
    plan = evaluation_plan(lambda d, z, k, c: edm_sampler(d, z, cond=c, num_steps=num_steps))
    rows, samples = [], {}
    for setting in settings(data, plan.step_sigmas):
        begin = time.perf_counter()
        if setting.transform is None:
            x = exact
        else:
            gm = mains[setting.main]
            # the mixture's arrays and cond are arguments, not constants: XLA would spend minutes folding them
            run = jax.jit(lambda arrays, z, c, t=setting.transform: edm_sampler(
                t(toy.denoiser(gm._replace(**arrays))), z, cond=c, num_steps=num_steps))
            x = np.asarray(run(dict(means=gm.means, stds=gm.stds, weights=gm.weights), latents, cond))
        row = dict(main=setting.main, method=setting.method, weight=setting.weight,
                   nfe=0.0 if setting.transform is None else evaluations_per_image(
                       plan.step_sigmas, setting.method != 'none', INTERVAL if 'interval' in setting.method else None),
                   **toy_metrics(data, x, labels, exact, jax.random.key(seed + 9)),
                   seconds=round(time.perf_counter() - begin, 2))
        log(f'{title(row)}: outliers {row["outliers"]:.3f}, branches lost {row["branches_lost"]:.3f}, branch TV '
            f'{row["branch_tv"]:.3f}, SWD {row["swd"]:.3f}, NFE {row["nfe"]:g} ({row["seconds"]:.1f}s)')
        rows.append(row)
        samples[title(row)] = x
    result = dict(task='toy', num_samples=num_samples, num_steps=num_steps, seed=seed,
                  components=int(data.gm.means.shape[0]), branches=int(data.branch.max() + 1),
                  guide_std_factor=GUIDE_STD_FACTOR, blurred_main_factor=BLURRED_MAIN_FACTOR,
                  interval=list(INTERVAL), rows=rows)
    return result, samples, labels


def toy_plot(samples: dict[str, np.ndarray], labels: np.ndarray, path: str,
             titles: Sequence[str] = ('main=exact exact draws w=1', 'main=blurred none w=1', 'main=blurred cfg w=4',
                                      'main=blurred autoguidance w=3')) -> str:
    """Scatter plots of the chosen settings side by side (class 0 blue, class 1 orange); writes ``path`` (PNG)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    titles = [t for t in titles if t in samples]
    fig = Figure(figsize=(3.0 * len(titles), 3.1), dpi=100)
    FigureCanvasAgg(fig)
    axes = np.atleast_1d(fig.subplots(1, len(titles), squeeze=False)).ravel()
    for ax, title in zip(axes, titles):
        x = samples[title]
        for c, color in ((0, 'tab:blue'), (1, 'tab:orange')):
            ax.scatter(x[labels == c, 0], x[labels == c, 1], s=0.6, alpha=0.5, color=color)
        ax.set_xlim(-5.5, 5.5)
        ax.set_ylim(-5.5, 5.5)
        ax.set_aspect('equal')
        ax.set_title(title, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path)
    return path
