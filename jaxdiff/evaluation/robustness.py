"""Robustness evaluation as functions: clean, PGD and AutoAttack accuracy of a classifier (optionally behind
DiffPure) and certified accuracy of denoised smoothing, in fixed batches with progress lines
(``python -m eval.robustness`` parses the flags, loads with :mod:`jaxdiff.evaluation.robustness_data` and prints).
"""
from __future__ import annotations

import functools
import os
import re
import time
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.progress import Progress

DEFAULT_RADII = (0.0, 0.25, 0.5, 0.75, 1.0)
AA_STANDARD = dict(n_iter=100, n_queries=5000)


def batch_ranges(n: int, batch: int):
    """(start, stop) of the batches covering n examples."""
    return [(lo, min(lo + batch, n)) for lo in range(0, n, batch)]


def _pad(a: np.ndarray, size: int) -> np.ndarray:
    """a padded to ``size`` rows by repeating its first row (the padding is masked out of every count)."""
    return a if len(a) == size else np.concatenate([a, np.repeat(a[:1], size - len(a), 0)])


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
    batches = batch_ranges(n, batch_size)
    size = min(batch_size, n)
    keys = [jax.random.fold_in(key, b) for b in range(len(batches))]
    eps_arg = jnp.float32(eps)
    result = dict(n=n)

    def run_phase(phase: str, fn, with_valid: bool = False, done: Optional[list] = None) -> list:
        progress = Progress(f'{phase}:', n, log)
        outs = [] if done is None else done
        for (lo, hi), k in zip(batches, keys):
            x = jnp.asarray(_pad(images[lo:hi], size), jnp.float32) / 255.0
            y = jnp.asarray(_pad(labels[lo:hi], size))
            args = (variables, x, y) + ((jnp.arange(size) < hi - lo,) if with_valid else ()) + (k, eps_arg)
            out = jax.device_get(fn(*args))
            outs.append(jax.tree.map(lambda a, m=hi - lo: np.asarray(a)[..., :m] if np.ndim(a) else a, out))
            progress.add(hi - lo)
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


def evaluate_smoothing(apply, variables, denoiser_of, dvars, images: np.ndarray, labels: np.ndarray, *,
                       sigma: float, n0: int, n: int, alpha: float, radii: Sequence[float], batch: int, key,
                       log: Callable[[str], None] = print) -> dict:
    """Denoised smoothing (Carlini et al. 2023) certified accuracy by L2 radius; CERTIFY per image."""
    from jaxdiff.robust import smoothing
    denoiser = denoiser_of(dvars)
    base = smoothing.denoised_classifier(denoiser, lambda x: apply(variables, x), sigma)
    progress = Progress('certify:', len(images), log)
    classes, rads = [], []
    t = time.perf_counter()
    for i in range(len(images)):
        x = jnp.asarray(images[i], jnp.float32) / 255.0
        c, r = smoothing.certify(base, x, jax.random.fold_in(key, i), sigma=sigma, n0=n0, n=n, alpha=alpha,
                                 batch=batch)
        classes.append(c)
        rads.append(r)
        progress.add(1)
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


def selection(clf) -> dict:
    """The run's keep-best numbers recomputed for ``clf`` (a :class:`~jaxdiff.evaluation.robustness_data.Classifier`):
    {'clean_acc', 'pgd_acc', 'eval_size', 'attack', 'recorded' (best.json of the run's best/, or None)}."""
    from jaxdiff.robust import mixed_data
    from jaxdiff.tasks import adversarial
    config = clf.config
    data = mixed_data.load(config)
    if not len(data.eval_labels):
        raise ValueError(f'{clf.workdir} holds out no examples (eval.size=0): there is no keep-best number to '
                         'recompute; drop --selection')
    clean, robust = adversarial.selection_accuracy(config, clf.net, clf.variables, data)
    return dict(clean_acc=clean, pgd_acc=robust, eval_size=int(len(data.eval_labels)),
                attack=f'PGD-{config.eval.attack_steps} ({config.eval.attack_loss}) eps {config.eps:.6g} '
                       f'{config.norm}', recorded=clf.best)


def diffpure_defense(clf, diffusion_run: str, *, t_star: float, num_steps: int, eot: int):
    """The classifier ``clf`` behind DiffPure (:mod:`jaxdiff.robust.diffpure`) with the denoiser of the diffusion run
    ``diffusion_run``: (variables {'clf', 'den'}, purifier (attack logits, fresh logits): each ``(variables, key) ->
    logits_fn``, the mean of ``eot`` purified logits with the randomness fixed by the key, JSON description)."""
    from jaxdiff.evaluation.robustness_data import load_denoiser
    from jaxdiff.robust.diffpure import eot_logits_fn, purified_classifier, vp_time_to_sigma
    denoiser_of, dvars, desc = load_denoiser(diffusion_run, clf.shape, '--diffpure')

    def classifier_of(v):
        return purified_classifier(denoiser_of(v['den']), lambda x: clf.apply(v['clf'], x), t_star, num_steps,
                                   solver='sde')

    purifier = (lambda v, k: eot_logits_fn(classifier_of(v), jax.random.fold_in(k, 1), eot),
                lambda v, k: eot_logits_fn(classifier_of(v), jax.random.fold_in(k, 2), eot))
    info = dict(run=desc, t_star=t_star, sigma_star=vp_time_to_sigma(t_star), num_steps=num_steps, solver='sde',
                eot=eot, gradient='full backprop through the purifier (EOT mean of logits)')
    return dict(clf=clf.variables, den=dvars), purifier, info


def evaluate_run(workdir: str, *, checkpoint: str = 'auto', data: str = 'digits:heldout', num: int = 500,
                 eps: Optional[float] = None, norm: Optional[str] = None,
                 attacks: Sequence[tuple[str, int]] = (('pgd', 40), ('autoattack', 0)),
                 pgd_step: Optional[float] = None, aa_iters: int = AA_STANDARD['n_iter'],
                 square_queries: int = AA_STANDARD['n_queries'], batch_size: int = 250,
                 diffpure: Optional[str] = None, t_star: float = 0.1, eot: int = 4, diffpure_steps: int = 10,
                 smoothing: Optional[str] = None, sigma: float = 0.25, n0: int = 100, n: int = 1000,
                 alpha: float = 0.001, radii: Sequence[float] = DEFAULT_RADII, smoothing_batch: int = 500,
                 seed: int = 0, with_selection: bool = False, allow_incomplete: bool = False,
                 log: Callable[[str], None] = print) -> dict:
    """Everything ``python -m eval.robustness`` reports for the adversarial-training run ``workdir`` (its flags,
    same names and defaults, documented there) -> the JSON dict: clean / PGD / AutoAttack accuracies on the first
    ``num`` examples of ``data`` (optionally behind DiffPure of the diffusion run ``diffpure``), the certified
    accuracy of denoised smoothing with the diffusion run ``smoothing``, and (``with_selection``) the run's own
    keep-best numbers. ``attacks``: :func:`parse_attacks` output; eps / norm None: the run's training values;
    ``allow_incomplete``: a sample folder ``data`` that sample.py did not finish is used as it is."""
    from jaxdiff.evaluation.robustness_data import Classifier, fit_data, load_data, load_denoiser
    clf = Classifier(workdir, checkpoint)
    eps = float(clf.config.eps) if eps is None else eps
    norm = norm or clf.config.norm
    images, labels = load_data(data, allow_incomplete)
    if num:
        images, labels = images[:num], labels[:num]
    images = fit_data(images, labels, clf.shape, clf.info.num_classes, data)
    key = jax.random.key(seed)
    names = ','.join(f'{a}{k}' if a == 'pgd' else a for a, k in attacks) or 'none'
    log(f'eval.robustness: {clf.describe()["arch"]} {clf.source} step {clf.step} of {workdir}; {len(images)} '
        f'examples of {data}; eps {eps:.4g} {norm}; attacks {names}')
    result = dict(workdir=os.path.abspath(workdir), model=clf.describe(), data=data, n=int(len(images)), eps=eps,
                  norm=norm, seed=seed, defense='none')
    if with_selection:
        result['selection'] = selection(clf)
    smoothing_model = load_denoiser(smoothing, clf.shape, '--smoothing') if smoothing else None
    purifier, variables = None, clf.variables
    if diffpure:
        variables, purifier, result['diffpure'] = diffpure_defense(clf, diffpure, t_star=t_star,
                                                                   num_steps=diffpure_steps, eot=eot)
        result['defense'] = f'DiffPure t*={t_star}, {diffpure_steps} SDE steps, EOT {eot}'
    if attacks:
        net = clf.net
        result.update(evaluate_attacks(lambda v, x: net.apply(v, x, train=False), variables, images, labels,
                                       eps=eps, norm=norm, attacks=attacks, batch_size=batch_size,
                                       key=jax.random.fold_in(key, 0), aa_iters=aa_iters,
                                       square_queries=square_queries, pgd_step=pgd_step,
                                       num_classes=clf.info.num_classes, purifier=purifier,
                                       cache_key=('plain', net) if purifier is None else None, log=log))
    if smoothing:
        denoiser_of, dvars, desc = smoothing_model
        result['smoothing'] = dict(evaluate_smoothing(clf.apply, clf.variables, denoiser_of, dvars, images, labels,
                                                      sigma=sigma, n0=n0, n=n, alpha=alpha, radii=radii,
                                                      batch=smoothing_batch, key=jax.random.fold_in(key, 1),
                                                      log=log), run=desc)
        if 'clean_acc' not in result:
            result['clean_acc'] = float(np.mean(np.argmax(np.concatenate([
                np.asarray(jax.jit(clf.apply)(clf.variables, jnp.asarray(images[lo:hi], jnp.float32) / 255.0))
                for lo, hi in batch_ranges(len(images), batch_size)]), -1) == labels))
    return result
