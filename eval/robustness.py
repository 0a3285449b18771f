"""Adversarial robustness of a classifier run: clean, PGD-40 and AutoAttack accuracy, optionally behind DiffPure,
and certified accuracy of denoised smoothing.

    python -m eval.robustness --workdir RUN [--data digits:heldout | fashion_mnist:test | FILE.npz | SAMPLE_DIR]
        [--eps 0.1] [--norm Linf] [--num 500] [--attacks pgd40,autoattack] [--aa_iters 100] [--square_queries 5000]
        [--diffpure DIFFUSION_RUN --t_star 0.1 --eot 4 --diffpure_steps 10]
        [--smoothing DIFFUSION_RUN --sigma 0.25 --n0 100 --n 1000 --alpha 0.001 --radii 0,0.25,0.5,0.75,1.0]
        [--batch_size 250] [--seed 0] [--json PATH]

RUN is a ``task='adversarial'`` run of train.py (:mod:`jaxdiff.robust.trainer`): the EMA weights and BatchNorm
statistics of ``RUN/best`` (the checkpoint with the best held-out PGD accuracy), or of the newest checkpoint when
the run has no best/ (``--checkpoint latest`` forces that). The classifier runs in inference mode on images in
[0, 1]. --data: ``digits[:train|ref|heldout|all]`` (the splits of
:func:`jaxdiff.metrics.feature_classifier.dataset_split`; default ``digits:heldout``, which no library classifier
trains on), ``fashion_mnist[:train|test|ref|heldout]``, an .npz with ``images`` uint8 and ``labels``, or a
sample.py folder of class-conditional samples; the first --num examples are used. Images must have the
classifier's shape, except that the data-pipeline rule (integer upsampling, centre padding) is applied when the
classifier was trained at a larger side.

Attacks (--attacks, comma list; eps in [0, 1] pixel units, --norm Linf or L2):

- ``pgdN`` (default pgd40): PGD on the cross-entropy, N steps of size eps/4 (--pgd_step), one uniform random start
  in the ball, last iterate (:func:`jaxdiff.robust.pgd.pgd`).
- ``autoattack``: AutoAttack's standard sequence APGD-CE -> APGD-T (9 targets) -> FAB-T (9 targets) -> Square,
  each stage on the points still robust (:mod:`jaxdiff.robust.autoattack`); the robust accuracy after each stage
  is reported. Standard budget: 100 iterations per APGD/FAB run and 5000 Square queries; --aa_iters and
  --square_queries lower it for CPU runs (the JSON's ``autoattack.budget`` says which was used and
  ``standard: false`` marks a reduced one). ``worst_case_acc`` counts the points robust to every attack run.

DiffPure (--diffpure DIFFUSION_RUN, :mod:`jaxdiff.robust.diffpure`): every prediction goes through the purifier
(diffuse to VP time --t_star, --diffpure_steps ancestral reverse-SDE steps, unconditional denoiser) and is the mean
of --eot purified logits; attacks differentiate through the whole purifier (full backprop) of that EOT average with
the randomness fixed per batch. The accuracies the attacks report are judged by that same fixed-randomness
classifier; ``*_acc_fresh`` re-classify the final adversarial examples with independent randomness.

Denoised smoothing (--smoothing DIFFUSION_RUN, :mod:`jaxdiff.robust.smoothing`): base classifier = the classifier
on the one-shot denoised x + N(0, sigma^2) (Carlini et al. 2023); Cohen et al.'s CERTIFY with --n0 selection and
--n estimation draws at level --alpha; certified accuracy (correct and certified radius >= r, abstentions wrong)
for each L2 radius r of --radii in [0, 1] pixel units (also given as multiples of sigma). With n draws the largest
certifiable radius is sigma * Phi^-1(alpha^(1/n)) (2.46 sigma for n = 1000, alpha = 0.001).

Output: a table on stderr, progress lines on stderr for long phases, and as the last stdout line one JSON object
(also written to --json). Errors end with one ``eval.robustness: error:`` line on stderr and exit code 1 (2 for
command-line errors).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import re
import sys
import time
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxdiff.cli import argument_parser, fail, json_line, text_table

PROG = 'eval.robustness'
DATASETS = ('digits', 'fashion_mnist')
DEFAULT_RADII = (0.0, 0.25, 0.5, 0.75, 1.0)
AA_STANDARD = dict(n_iter=100, n_queries=5000)


# ----------------------------------------------------------------------------------------------- loading

class Classifier:
    """A trained adversarial-training run: ``apply(variables, x (B, H, W, C) in [0, 1]) -> logits (B, K)``."""

    def __init__(self, workdir: str, checkpoint: str = 'auto'):
        from jaxdiff.data.sources import DatasetInfo
        from jaxdiff.robust import adv_step, trainer
        from jaxdiff.train import checkpoint as ckpt
        if not os.path.isdir(workdir):
            raise FileNotFoundError(f'run directory not found: {workdir!r}; pass the --workdir of an adversarial '
                                    'training run (python train.py --config configs/robust_digits.py --workdir RUN)')
        config = ml_collections.ConfigDict(ckpt.read_config(workdir))
        if config.get('task') != 'adversarial':
            raise ValueError(f'{workdir} is a {config.get("task", "denoiser")!r} run, not a classifier: --workdir '
                             'takes a task=adversarial run (configs/robust_*.py)')
        info_path = os.path.join(workdir, ckpt.INFO_FILE)
        if not os.path.isfile(info_path):
            raise FileNotFoundError(f'{workdir} has no {ckpt.INFO_FILE}; the run never started training')
        with open(info_path) as f:
            self.info = DatasetInfo(**json.load(f))
        best_dir = os.path.join(workdir, trainer.BEST_DIR)
        use_best = checkpoint == 'best' or (checkpoint == 'auto' and os.path.isdir(os.path.join(best_dir,
                                                                                                'checkpoints')))
        if checkpoint == 'best' and not os.path.isdir(os.path.join(best_dir, 'checkpoints')):
            raise FileNotFoundError(f'{workdir} has no best/ checkpoint (evaluation never ran); use '
                                    '--checkpoint latest')
        if not use_best and not os.path.isdir(os.path.join(workdir, 'checkpoints')):
            raise ckpt.CheckpointError(f'{workdir} has no checkpoints/ folder; train first or pass another --workdir')
        state = ckpt.load_arrays(best_dir if use_best else workdir)
        self.workdir, self.config = workdir, config
        self.source = 'best' if use_best else 'latest'
        self.step = int(state['step'])
        self.best = trainer.read_best(workdir) if use_best else None
        self.net = adv_step.build_net(config, self.info)
        self.variables = {'params': state['ema'], 'batch_stats': state['buffers']}
        self.shape = (self.info.resolution, self.info.resolution, self.info.channels)

    def apply(self, variables, x):
        return self.net.apply(variables, x, train=False)

    def describe(self) -> dict:
        m = self.config.model
        return dict(path=os.path.abspath(self.workdir), checkpoint=self.source, step=self.step,
                    arch=f'{m.arch}-{m.depth}-{m.width}' if m.arch == 'wrn' else m.arch,
                    method=self.config.method, train_eps=float(self.config.eps), train_norm=self.config.norm,
                    generated_fraction=float(self.config.generated_fraction),
                    generated=self.config.data.generated or None, image_shape=list(self.shape),
                    num_classes=int(self.info.num_classes), best=self.best)


def load_data(spec: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, H, W, C), labels int32 (N,)) of a --data spec (module docstring); one-line errors."""
    from jaxdiff.data.arrays import as_nhwc
    from jaxdiff.data.sources import load_digits, load_fashion_mnist
    name, _, split = spec.partition(':')
    if name in DATASETS and not os.path.exists(spec):
        from jaxdiff.metrics.feature_classifier import SPLITS, dataset_split
        if name == 'digits' and split == 'all':
            return load_digits()
        if name == 'fashion_mnist' and split == 'test':
            from jaxdiff.metrics.feature_classifier import FASHION_MNIST_DIR
            return load_fashion_mnist(FASHION_MNIST_DIR, 'test')
        split = split or ('heldout' if name == 'digits' else 'test')
        if split not in SPLITS:
            extra = 'all' if name == 'digits' else 'test'
            raise ValueError(f'--data {spec}: unknown split {split!r}; use one of {", ".join(SPLITS + (extra,))}')
        return dataset_split(f'{name}_classifier', split)
    if os.path.isdir(spec):
        from jaxdiff.sampling import shards
        if not any(n.startswith('shard-') and n.endswith('.npz') for n in os.listdir(spec)):
            raise ValueError(f'--data {spec}: the folder holds no sample shards (shard-XXXXX.npz); give a sample.py '
                             'folder, an .npz with images and labels, or a dataset split such as digits:heldout')
        data = shards.load_samples(spec)
        if (data['labels'] < 0).any():
            raise ValueError(f'--data {spec}: unconditional samples have no labels to attack')
        return data['images'], data['labels'].astype(np.int32)
    if spec.endswith('.npz') and os.path.isfile(spec):
        with np.load(spec, allow_pickle=False) as npz:
            if 'images' not in npz or 'labels' not in npz:
                raise ValueError(f'--data {spec}: an .npz needs "images" and "labels" arrays (found '
                                 f'{sorted(npz.files)})')
            images, labels = as_nhwc(npz['images'], spec), npz['labels'].astype(np.int32)
        if labels.shape != images.shape[:1]:
            raise ValueError(f'--data {spec}: labels have shape {labels.shape}, expected ({len(images)},)')
        return images, labels
    raise FileNotFoundError(f'--data {spec!r} not found: give digits[:train|ref|heldout|all], '
                            'fashion_mnist[:train|test|ref|heldout], an .npz with images and labels, or a sample.py '
                            'folder')


def fit_data(images: np.ndarray, labels: np.ndarray, shape: tuple, num_classes: int, spec: str) -> np.ndarray:
    """images brought to the classifier's ``shape`` by the data pipeline's rule, or a one-line ValueError."""
    from jaxdiff.data.sources import fit_resolution
    h, w, c = images.shape[1:]
    side, channels = shape[0], shape[2]
    if c != channels or h != w or side < h:
        raise ValueError(f'--data {spec} holds {h}x{w}x{c} images but the classifier takes '
                         f'{side}x{side}x{channels}; evaluate on data of the training set\'s shape')
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f'--data {spec} has labels in {labels.min()}..{labels.max()} but the classifier has '
                         f'{num_classes} classes')
    if side != h:
        images = np.stack([fit_resolution(im, side) for im in images])
    return images


def load_denoiser(path: str, shape: tuple, flag: str):
    """(unconditional denoiser fn(variables) -> D, variables, description) of a diffusion run for --diffpure /
    --smoothing, checked against the classifier's image shape."""
    from jaxdiff.sampling.model import load_model
    from jaxdiff.train import checkpoint as ckpt
    if not os.path.isdir(path):
        raise FileNotFoundError(f'{flag} {path!r}: no such directory; pass a train.py diffusion run')
    if os.path.isfile(os.path.join(path, ckpt.CONFIG_FILE)):
        task = ckpt.read_config(path).get('task', 'denoiser')
        if task != 'denoiser':
            raise ValueError(f'{flag} {path} is a {task!r} run, not a diffusion model run')
    model = load_model(path)
    if (model.resolution, model.resolution, model.channels) != tuple(shape):
        raise ValueError(f'{flag} {path} generates {model.resolution}x{model.resolution}x{model.channels} images '
                         f'but the classifier takes {"x".join(map(str, shape))}')
    return model.denoiser, model.variables, model.description


# ----------------------------------------------------------------------------------------------- progress

class Progress:
    """'<phase>: done/total (..%) | elapsed | ETA' lines on stderr, at most every ``every`` seconds and at the end."""

    def __init__(self, phase: str, total: int, log: Callable[[str], None], every: float = 10.0):
        self.phase, self.total, self.log, self.every = phase, total, log, every
        self.t0 = self.last = time.perf_counter()

    def update(self, done: int) -> None:
        now = time.perf_counter()
        if now - self.last < self.every and done < self.total:
            return
        self.last = now
        rate = done / max(now - self.t0, 1e-9)
        eta = (self.total - done) / rate if rate > 0 else float('nan')
        self.log(f'{self.phase}: {done}/{self.total} ({100 * done / self.total:.0f}%) | {now - self.t0:.0f}s | '
                 f'ETA {eta:.0f}s')


def _batches(n: int, batch: int):
    """(start, stop) of the batches covering n examples."""
    return [(lo, min(lo + batch, n)) for lo in range(0, n, batch)]


def _pad(a: np.ndarray, size: int) -> np.ndarray:
    """a padded to ``size`` rows by repeating its first row (the padding is masked out of every count)."""
    return a if len(a) == size else np.concatenate([a, np.repeat(a[:1], size - len(a), 0)])


# ----------------------------------------------------------------------------------------------- attacks

def parse_attacks(text: str) -> list[tuple[str, int]]:
    """'pgd40,autoattack' -> [('pgd', 40), ('autoattack', 0)]; 'none' or '' -> []."""
    out = []
    for part in [p.strip().lower() for p in text.split(',') if p.strip()]:
        if part == 'none':
            continue
        match = re.fullmatch(r'pgd(\d*)', part)
        if match:
            steps = int(match.group(1) or 40)
            if steps < 1:
                raise ValueError(f'--attacks {part}: PGD needs at least one step')
            out.append(('pgd', steps))
        elif part in ('autoattack', 'aa'):
            out.append(('autoattack', 0))
        else:
            raise ValueError(f'--attacks: unknown attack {part!r}; use pgdN (e.g. pgd40), autoattack or none')
    return out


def _safe(attack):
    """An AutoAttack stage whose non-finite outputs fall back to the clean input (never counted as fooled)."""
    def run(logits_fn, x, y, key, active):
        out = attack(logits_fn, x, y, key, active)
        return jnp.where(jnp.isfinite(out), out, x)
    return run


_PROGRAMS: dict = {}   # evaluate_attacks' jitted programs by (cache_key, settings)


def _programs(apply, *, norm: str, num_classes: int, aa_iters: int, square_queries: int,
              pgd_step: Optional[float], purifier):
    """(clean_fn, pgd_fn_of(steps), aa_fn, stage names): the jitted batch programs of :func:`evaluate_attacks`.
    eps is an argument of every program, so one compilation serves every eps."""
    from jaxdiff.robust.autoattack import run_stage, standard_attacks
    from jaxdiff.robust.pgd import pgd

    stage_names = [name for name, _ in standard_attacks(1.0, norm, num_classes, n_iter=1, n_queries=1)]

    def stages_of(eps):
        return [(name, _safe(fn)) for name, fn in standard_attacks(eps, norm, num_classes, n_iter=aa_iters,
                                                                   n_queries=square_queries)]

    def logits_of(variables, key):
        if purifier is None:
            return lambda x: apply(variables, x)
        return purifier[0](variables, key)

    def fresh(variables, key, x, y):  # DiffPure: re-classified with independent purifier noise
        return jnp.argmax(purifier[1](variables, key)(x), -1) == y

    @jax.jit
    def clean_fn(variables, x, y, key, eps):
        ok = jnp.argmax(logits_of(variables, key)(x), -1) == y
        return (ok,) if purifier is None else (ok, fresh(variables, key, x, y))

    @functools.lru_cache(maxsize=None)
    def pgd_fn_of(steps: int):
        @jax.jit
        def pgd_fn(variables, x, y, key, eps):
            logits_fn = logits_of(variables, key)
            x_adv = pgd(logits_fn, x, y, eps, key=jax.random.fold_in(key, 11), norm=norm, n_steps=steps,
                        step_size=eps / 4 if pgd_step is None else pgd_step, loss='ce', random_start=True)
            robust = jnp.argmax(logits_fn(x_adv), -1) == y
            return (robust,) if purifier is None else (robust, fresh(variables, key, x_adv, y))
        return pgd_fn

    @jax.jit
    def aa_start(variables, x, y, valid, key, eps):
        return (jnp.argmax(logits_of(variables, key)(x), -1) == y) & valid  # padding rows start non-robust

    @functools.lru_cache(maxsize=None)
    def aa_stage(i: int):
        @jax.jit
        def stage_fn(variables, x, y, key, eps, x_adv, robust):
            stage = stages_of(eps)[i][1]
            return run_stage(stage, logits_of(variables, key), x, y, eps, norm, jax.random.fold_in(key, 100 + i),
                             x_adv, robust)
        return stage_fn

    fresh_fn = jax.jit(fresh) if purifier is not None else None

    def aa_fn(variables, x, y, valid, key, eps, report=None):
        """autoattack.autoattack's loop, one jitted program per stage, keeping every stage's per-point mask."""
        robust = aa_start(variables, x, y, valid, key, eps)
        x_adv, masks = x, [robust]
        for i, name in enumerate(stage_names):
            t = time.perf_counter()
            x_adv, robust = aa_stage(i)(variables, x, y, key, eps, x_adv, robust)
            masks.append(robust)
            if report is not None:
                report(f'{name} {int(jnp.sum(robust))}/{int(jnp.sum(valid))} robust ({time.perf_counter() - t:.0f}s)')
        masks = jnp.stack(masks)
        return (masks,) if purifier is None else (masks, fresh_fn(variables, key, x_adv, y))

    return clean_fn, pgd_fn_of, aa_fn, stage_names


def evaluate_attacks(apply, variables, images: np.ndarray, labels: np.ndarray, *, eps: float, norm: str,
                     attacks: list, batch_size: int, key, aa_iters: int, square_queries: int,
                     pgd_step: Optional[float], num_classes: int, purifier=None, cache_key=None,
                     log: Callable[[str], None] = print) -> dict:
    """Clean accuracy and every attack of ``attacks`` ([('pgd', steps) | ('autoattack', 0)]) on (images uint8,
    labels int32), in batches of ``batch_size`` (the last one padded and masked).

    apply(variables, x in [0, 1]) -> logits. purifier: None or (make(variables, key) -> logits_fn the attacks
    see, fresh(variables, key) -> logits_fn with independent randomness), for DiffPure. cache_key: a hashable that
    determines ``apply`` and ``purifier`` (e.g. the flax module): the jitted programs are then kept for later
    calls with that key and the same settings (eps and the weights are arguments and may differ).
    Returns {n, clean_acc, pgd<N>: {...}, autoattack: {...}, worst_case_acc, ...} (main's JSON).
    """
    settings = (cache_key, norm, num_classes, aa_iters, square_queries, pgd_step)
    if cache_key is not None and settings in _PROGRAMS:
        clean_fn, pgd_fn_of, aa_fn, stage_names = _PROGRAMS[settings]
    else:
        clean_fn, pgd_fn_of, aa_fn, stage_names = _programs(apply, norm=norm, num_classes=num_classes,
                                                            aa_iters=aa_iters, square_queries=square_queries,
                                                            pgd_step=pgd_step, purifier=purifier)
        if cache_key is not None:
            _PROGRAMS[settings] = clean_fn, pgd_fn_of, aa_fn, stage_names
    n = len(images)
    step_size = float(pgd_step) if pgd_step is not None else eps / 4
    batches = _batches(n, batch_size)
    size = min(batch_size, n)
    keys = [jax.random.fold_in(key, b) for b in range(len(batches))]
    eps_arg = jnp.float32(eps)
    result = dict(n=n)

    def run_phase(phase: str, fn, with_valid: bool = False, done: Optional[list] = None) -> list:
        progress = Progress(phase, n, log)
        outs = [] if done is None else done
        for (lo, hi), k in zip(batches, keys):
            x = jnp.asarray(_pad(images[lo:hi], size), jnp.float32) / 255.0
            y = jnp.asarray(_pad(labels[lo:hi], size))
            args = (variables, x, y) + ((jnp.arange(size) < hi - lo,) if with_valid else ()) + (k, eps_arg)
            out = jax.device_get(fn(*args))
            outs.append(jax.tree.map(lambda a, m=hi - lo: np.asarray(a)[..., :m] if np.ndim(a) else a, out))
            progress.update(hi)
        return outs

    t = time.perf_counter()
    clean = run_phase('clean', clean_fn)
    clean_ok = np.concatenate([c[0] for c in clean])
    if purifier is not None:
        result['clean_acc_fresh'] = float(np.concatenate([c[1] for c in clean]).mean())
    result['clean_acc'] = float(clean_ok.mean())
    result['clean_seconds'] = round(time.perf_counter() - t, 1)
    robust_all = clean_ok.copy()
    for name, steps in attacks:
        t = time.perf_counter()
        outs_done: list = []
        if name == 'pgd':
            outs = run_phase(f'PGD-{steps}', pgd_fn_of(steps))
            robust = np.concatenate([o[0] for o in outs])
            entry = dict(acc=float(robust.mean()), steps=steps, step_size=step_size, loss='ce',
                         random_start=True, restarts=1)
            if purifier is not None:
                entry['acc_fresh'] = float(np.concatenate([o[1] for o in outs]).mean())
            result[f'pgd{steps}'] = entry
        else:
            outs = run_phase('AutoAttack', functools.partial(
                aa_fn, report=lambda m: log(f'AutoAttack batch {len(outs_done) + 1}/{len(batches)}: {m}')),
                with_valid=True, done=outs_done)
            masks = np.concatenate([o[0] for o in outs], axis=1)    # (1 + stages, n)
            robust = masks[-1]
            per_stage = {'clean': float(masks[0].mean())}
            per_stage.update({stage_name: float(m.mean()) for stage_name, m in zip(stage_names, masks[1:])})
            n_targets = min(9, num_classes - 1)
            entry = dict(acc=float(robust.mean()), stages=per_stage, order=stage_names,
                         budget=dict(apgd_ce=f'{aa_iters} iterations, 1 restart',
                                     apgd_t=f'{n_targets} targets x {aa_iters} iterations',
                                     fab_t=f'{n_targets} targets x {aa_iters} iterations',
                                     square=f'{square_queries} queries, p_init 0.8',
                                     n_iter=aa_iters, square_queries=square_queries,
                                     standard=aa_iters >= AA_STANDARD['n_iter']
                                     and square_queries >= AA_STANDARD['n_queries']))
            if purifier is not None:
                entry['acc_fresh'] = float(np.concatenate([o[1] for o in outs]).mean())
            result['autoattack'] = entry
        key_name = f'pgd{steps}' if name == 'pgd' else 'autoattack'
        result[key_name]['seconds'] = round(time.perf_counter() - t, 1)
        robust_all &= robust
    if attacks:
        result['worst_case_acc'] = float(robust_all.mean())
    return result


# ----------------------------------------------------------------------------------------------- smoothing

def evaluate_smoothing(apply, variables, denoiser_of, dvars, images: np.ndarray, labels: np.ndarray, *,
                       sigma: float, n0: int, n: int, alpha: float, radii: Sequence[float], batch: int, key,
                       log: Callable[[str], None] = print) -> dict:
    """Denoised smoothing (Carlini et al. 2023) certified accuracy by L2 radius; CERTIFY per image."""
    from jaxdiff.robust import smoothing
    denoiser = denoiser_of(dvars)
    base = smoothing.denoised_classifier(denoiser, lambda x: apply(variables, x), sigma)
    progress = Progress('certify', len(images), log)
    classes, rads = [], []
    t = time.perf_counter()
    for i in range(len(images)):
        x = jnp.asarray(images[i], jnp.float32) / 255.0
        c, r = smoothing.certify(base, x, jax.random.fold_in(key, i), sigma=sigma, n0=n0, n=n, alpha=alpha,
                                 batch=batch)
        classes.append(c)
        rads.append(r)
        progress.update(i + 1)
    classes, rads = np.asarray(classes), np.asarray(rads, np.float64)
    correct = classes == labels
    acc = smoothing.certified_accuracy(rads, correct, radii)
    rows = [dict(radius=float(r), radius_sigma=float(r / sigma), certified_acc=float(a)) for r, a in zip(radii, acc)]
    from scipy import stats
    max_radius = sigma * float(stats.norm.ppf(alpha ** (1.0 / n)))
    return dict(sigma=sigma, n0=n0, n=n, alpha=alpha, num=int(len(images)), rows=rows,
                abstain_rate=float(np.mean(classes == smoothing.ABSTAIN)),
                mean_radius_correct=float(np.mean(np.where(correct, rads, 0.0))),
                max_certifiable_radius=max_radius, seconds=round(time.perf_counter() - t, 1))


# ----------------------------------------------------------------------------------------------- CLI

def table_rows(result: dict) -> list[dict]:
    """Rows (metric, accuracy, settings) for the stderr table."""
    rows = [dict(metric='clean', accuracy=result['clean_acc'], settings=result['defense'])]
    for name, entry in result.items():
        if name.startswith('pgd') and isinstance(entry, dict):
            rows.append(dict(metric=f'PGD-{entry["steps"]}', accuracy=entry['acc'],
                             settings=f'CE, step {entry["step_size"]:.4g}, random start, eps {result["eps"]:.4g} '
                                      f'{result["norm"]}'))
    if 'autoattack' in result:
        aa = result['autoattack']
        b = aa['budget']
        for stage in aa['order']:
            rows.append(dict(metric=f'  after {stage}', accuracy=aa['stages'][stage], settings=b[stage.replace(
                '-', '_')]))
        rows.append(dict(metric='AutoAttack', accuracy=aa['acc'],
                         settings='standard budget' if b['standard'] else 'REDUCED budget (--aa_iters / '
                                                                          '--square_queries)'))
    if 'worst_case_acc' in result:
        rows.append(dict(metric='worst case', accuracy=result['worst_case_acc'], settings='robust to every attack'))
    for name in ('clean_acc_fresh',):
        if name in result:
            rows.append(dict(metric='clean (fresh)', accuracy=result[name], settings='independent purifier noise'))
    for name, entry in result.items():
        if isinstance(entry, dict) and 'acc_fresh' in entry:
            rows.append(dict(metric=f'{name} (fresh)', accuracy=entry['acc_fresh'],
                             settings='adversarial examples re-classified with independent purifier noise'))
    sm = result.get('smoothing')
    if sm:
        for r in sm['rows']:
            rows.append(dict(metric=f'certified r={r["radius"]:.3g}', accuracy=r['certified_acc'],
                             settings=f'L2, {r["radius_sigma"]:.2f} sigma; sigma {sm["sigma"]}, n0 {sm["n0"]}, '
                                      f'n {sm["n"]}, alpha {sm["alpha"]}'))
    return rows


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argument_parser(PROG, __doc__.splitlines()[0])
    p.add_argument('--workdir', help='adversarial-training run (task=adversarial) to evaluate')
    p.add_argument('--checkpoint', default='auto', choices=('auto', 'best', 'latest'),
                   help='auto: best/ when present, else the newest checkpoint')
    p.add_argument('--data', default='digits:heldout', help='digits[:split], fashion_mnist[:split], .npz, sample dir')
    p.add_argument('--num', type=int, default=500, help='evaluate the first NUM examples (0 = all)')
    p.add_argument('--eps', type=float, default=None, help='attack radius in [0, 1] pixel units (default: the '
                                                            "run's training eps)")
    p.add_argument('--norm', default=None, choices=('Linf', 'L2'), help="threat model (default: the run's)")
    p.add_argument('--attacks', default='pgd40,autoattack', help='comma list: pgdN, autoattack, none')
    p.add_argument('--pgd_step', type=float, default=None, help='PGD step size (default eps/4)')
    p.add_argument('--aa_iters', type=int, default=AA_STANDARD['n_iter'],
                   help='iterations per APGD-CE / APGD-T / FAB-T run (standard 100)')
    p.add_argument('--square_queries', type=int, default=AA_STANDARD['n_queries'],
                   help='Square attack queries (standard 5000)')
    p.add_argument('--batch_size', type=int, default=250, help='examples per attack batch')
    p.add_argument('--diffpure', help='diffusion run: attack the classifier behind DiffPure')
    p.add_argument('--t_star', type=float, default=0.1, help='DiffPure VP diffusion time')
    p.add_argument('--eot', type=int, default=4, help='DiffPure EOT draws averaged per prediction')
    p.add_argument('--diffpure_steps', type=int, default=10, help='DiffPure reverse-SDE steps')
    p.add_argument('--smoothing', help='diffusion run: certify denoised smoothing')
    p.add_argument('--sigma', type=float, default=0.25, help='smoothing noise std in [0, 1] pixel units')
    p.add_argument('--n0', type=int, default=100, help='smoothing selection draws')
    p.add_argument('--n', type=int, default=1000, help='smoothing estimation draws (Cohen et al.: 100,000)')
    p.add_argument('--alpha', type=float, default=0.001, help='smoothing failure probability')
    p.add_argument('--radii', default=','.join(map(str, DEFAULT_RADII)), help='L2 radii for certified accuracy')
    p.add_argument('--smoothing_batch', type=int, default=500, help='noise draws per smoothing batch')
    p.add_argument('--seed', type=int, default=0, help='attack / purifier / smoothing randomness')
    p.add_argument('--json', help='also write the JSON here')
    args = p.parse_args(argv)
    if not args.workdir:
        p.error('--workdir RUN is required (an adversarial-training run)')
    try:
        args.attack_list = parse_attacks(args.attacks)
    except ValueError as e:
        p.error(str(e))
    if not args.attack_list and not args.smoothing:
        p.error('nothing to evaluate: --attacks none needs --smoothing')
    if args.eps is not None and args.eps < 0:
        p.error(f'--eps must be >= 0, got {args.eps}')
    if args.num < 0 or args.batch_size < 1 or args.aa_iters < 1 or args.square_queries < 1:
        p.error('--num must be >= 0 and --batch_size, --aa_iters, --square_queries >= 1')
    if args.diffpure and (args.eot < 1 or args.diffpure_steps < 1 or not 0 < args.t_star <= 1):
        p.error('--eot and --diffpure_steps must be >= 1 and --t_star in (0, 1]')
    if args.smoothing:
        if args.sigma <= 0 or args.n0 < 1 or args.n < 1 or not 0 < args.alpha < 1 or args.smoothing_batch < 1:
            p.error('--smoothing needs --sigma > 0, --n0, --n, --smoothing_batch >= 1 and --alpha in (0, 1)')
        try:
            args.radii = sorted(float(r) for r in args.radii.split(','))
        except ValueError:
            p.error(f'--radii must be a comma list of numbers, got {args.radii!r}')
        if args.radii[0] < 0:
            p.error('--radii must be >= 0')
    return args


def run(args: argparse.Namespace, log: Callable[[str], None]) -> dict:
    """The evaluation of parsed arguments -> the JSON dict."""
    clf = Classifier(args.workdir, args.checkpoint)
    eps = float(clf.config.eps) if args.eps is None else args.eps
    norm = args.norm or clf.config.norm
    images, labels = load_data(args.data)
    if args.num:
        images, labels = images[:args.num], labels[:args.num]
    images = fit_data(images, labels, clf.shape, clf.info.num_classes, args.data)
    key = jax.random.key(args.seed)
    log(f'{PROG}: {clf.describe()["arch"]} {clf.source} step {clf.step} of {args.workdir}; {len(images)} examples '
        f'of {args.data}; eps {eps:.4g} {norm}; attacks {args.attacks}')
    result = dict(workdir=os.path.abspath(args.workdir), model=clf.describe(), data=args.data, n=int(len(images)),
                  eps=eps, norm=norm, seed=args.seed, defense='none')
    smoothing_model = load_denoiser(args.smoothing, clf.shape, '--smoothing') if args.smoothing else None
    purifier = None
    variables = clf.variables
    if args.diffpure:
        from jaxdiff.robust.diffpure import eot_logits_fn, purified_classifier, vp_time_to_sigma
        denoiser_of, dvars, desc = load_denoiser(args.diffpure, clf.shape, '--diffpure')
        variables = dict(clf=clf.variables, den=dvars)

        def classifier_of(v):
            return purified_classifier(denoiser_of(v['den']), lambda x: clf.apply(v['clf'], x), args.t_star,
                                       args.diffpure_steps, solver='sde')

        purifier = (lambda v, k: eot_logits_fn(classifier_of(v), jax.random.fold_in(k, 1), args.eot),
                    lambda v, k: eot_logits_fn(classifier_of(v), jax.random.fold_in(k, 2), args.eot))
        result['defense'] = f'DiffPure t*={args.t_star}, {args.diffpure_steps} SDE steps, EOT {args.eot}'
        result['diffpure'] = dict(run=desc, t_star=args.t_star, sigma_star=vp_time_to_sigma(args.t_star),
                                  num_steps=args.diffpure_steps, solver='sde', eot=args.eot,
                                  gradient='full backprop through the purifier (EOT mean of logits)')
    if args.attack_list:
        net = clf.net
        result.update(evaluate_attacks(lambda v, x: net.apply(v, x, train=False), variables, images, labels,
                                       eps=eps, norm=norm, attacks=args.attack_list, batch_size=args.batch_size,
                                       key=jax.random.fold_in(key, 0), aa_iters=args.aa_iters,
                                       square_queries=args.square_queries, pgd_step=args.pgd_step,
                                       num_classes=clf.info.num_classes, purifier=purifier,
                                       cache_key=('plain', net) if purifier is None else None, log=log))
    if args.smoothing:
        denoiser_of, dvars, desc = smoothing_model
        sm = evaluate_smoothing(clf.apply, clf.variables, denoiser_of, dvars, images, labels, sigma=args.sigma,
                                n0=args.n0, n=args.n, alpha=args.alpha, radii=args.radii,
                                batch=args.smoothing_batch, key=jax.random.fold_in(key, 1), log=log)
        sm['run'] = desc
        result['smoothing'] = sm
        if 'clean_acc' not in result:
            result['clean_acc'] = float(np.mean(np.argmax(np.concatenate([
                np.asarray(jax.jit(clf.apply)(clf.variables, jnp.asarray(images[lo:hi], jnp.float32) / 255.0))
                for lo, hi in _batches(len(images), args.batch_size)]), -1) == labels))
    return result


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """CLI entry point (see the module docstring)."""
    from jaxdiff.cli import quiet_checkpoint_echoes
    from jaxdiff.train.checkpoint import CheckpointError
    args = parse_args(argv)
    quiet_checkpoint_echoes()
    log = lambda m: print(m, file=sys.stderr, flush=True)
    try:
        begin = time.time()
        result = run(args, log)
        result['seconds'] = round(time.time() - begin, 1)
        line = json_line(result, args.json)
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError, KeyError, CheckpointError) as e:
        fail(PROG, str(e), 1)
    log(text_table(table_rows(result), ('metric', 'accuracy', 'settings'), 4))
    print(line, flush=True)
    return result


if __name__ == '__main__':
    main()
