"""Privacy audits of a diffusion model: training-data extraction from its samples (Carlini et al. 2023, the
CIFAR-10 attack) and membership inference from its denoising loss (``python -m eval.memorization``).

Extraction. Every generated image x^ gets its nearest training images (exact l2 search,
:mod:`jaxdiff.metrics.nearest`, streamed shard by shard) and the normalised distance

    l(x^) = l2(x^, x_nn) / (alpha * mean_{y in S} l2(x^, y)),   l2(a, b) = sqrt(mean((a - b)^2)) on [0, 1] pixels,

with S the n = 50 training images nearest to x^ (so x_nn is one of them) and alpha = 0.5; x^ is *extracted* when
l < 1: it is at least twice as close to its neighbour as to its typical close neighbours, which a sample that
merely lands in a dense region of the data is not. S is the sample's own neighbourhood (``neighbours='sample'``):
that is the paper's definition (S_x^ is "the set containing the n closest elements from the training dataset to
the example x^"), and it needs no search beyond the one that finds x_nn. Some reimplementations average over the
training image's neighbourhood instead (the n training images nearest to x_nn, x_nn itself excluded);
``neighbours='train'`` is that variant, which asks instead whether x_nn is isolated in the training set.
When the run trained with x-flips the reference set holds the mirrored training images too: a sample that copies
a flipped image is as memorised as one that copies the original.

Membership. Training images (members) and images the model never saw (non-members) are scored by the per-image
denoising loss at chosen sigmas (:mod:`jaxdiff.metrics.denoising_loss`); lower loss reads as "member". The ROC,
AUC, TPR at 1% FPR and best accuracy are reported per sigma and for the epsilon-space loss averaged over sigmas
(the seed's statistic, ||eps - eps_hat||^2 at a mid noise level). Non-members are the images a run with
``data.max_size`` left out of its dataset (the same distribution), or a held-out split given by name.
"""
from __future__ import annotations

import json
import os
import time
from typing import Callable, Iterable, Iterator, NamedTuple, Optional, Sequence

import numpy as np

from jaxdiff.metrics.nearest import NearestSearch, to_rows
from jaxdiff.evaluation.plots import histogram_png, roc_png
from jaxdiff.metrics.roc import roc_summary

N_NEIGHBOURS = 50       # Carlini et al. (2023): n, the neighbourhood averaged in the denominator
ALPHA = 0.5             # Carlini et al. (2023): alpha
THRESHOLD = 1.0         # extracted when l < THRESHOLD
NEIGHBOURS = ('sample', 'train')
MEMBERSHIP_SIGMAS = (0.1, 0.3, 1.0)  # ~ DDPM t = 30, 100, 300 of 1000 (linear betas): the informative mid range
GRID_PAIRS = 64         # pairs (sample | neighbour) in the picture grid
SEARCH_BATCH = 10_000   # samples per search call while streaming (progress lines between calls)


class TrainingData(NamedTuple):
    """The reference images of an audit: ``images`` uint8 (N, H, W, C) and ``labels`` int32 (N,) (the training
    set); ``heldout_images`` / ``heldout_labels`` (M, ...) images of the same distribution not trained on, or None;
    ``xflip``: the model saw mirrored copies; ``description``: where they came from, in words."""
    images: np.ndarray
    labels: np.ndarray
    heldout_images: Optional[np.ndarray]
    heldout_labels: Optional[np.ndarray]
    xflip: bool
    description: str


def _materialise(source) -> tuple[np.ndarray, np.ndarray]:
    items = [source[i] for i in range(len(source))]
    return np.stack([it['image'] for it in items]), np.asarray([it['label'] for it in items], np.int32)


def run_training_data(data_config) -> TrainingData:
    """A run's training images exactly as its pipeline fed them (resolution, ``max_size`` subset) and, when
    ``max_size`` left images out, those as the held-out set. ``data_config`` is the run's ``config.data``."""
    from jaxdiff.data.sources import FittedSource, make_source
    if data_config.source in ('latents', 'gmm2d'):
        raise ValueError(f'the run trained on data.source={data_config.source!r}, not images; audit it against the '
                         'images with --train DATASET')
    members, info = make_source(data_config)
    images, labels = _materialise(members)
    heldout_images = heldout_labels = None
    what = f'{data_config.source} ({info.size:,} training images)'
    if members.indices is not None:
        rest = np.setdiff1d(np.arange(len(members.source)), members.indices)
        heldout_images, heldout_labels = _materialise(FittedSource(members.source, members.resolution,
                                                                   members.use_labels, rest))
        what = (f'{data_config.source}: the run\'s {info.size:,}-image subset (data.max_size); the other '
                f'{len(rest):,} held out')
    return TrainingData(images, labels, heldout_images, heldout_labels, bool(data_config.xflip), what)


def dataset_training_data(spec: str, shape: tuple[int, int, int], xflip: bool = False) -> TrainingData:
    """Reference images named on the command line (``digits:all``, ``fashion_mnist:train``, an .npz, a folder),
    brought to ``shape`` (H, W, C) by the data pipeline's rule."""
    from jaxdiff.evaluation.robustness_data import fit_data, load_data
    images, labels = load_data(spec)
    images = fit_data(images, labels, shape, int(labels.max()) + 1, spec)
    return TrainingData(images, labels.astype(np.int32), None, None, xflip, f'{spec} ({len(images):,} images)')


RUN_SETS = ('run:train', 'run:heldout')  # image-set specs naming a run's own training / held-out images


def run_images(spec: str, train: TrainingData) -> dict:
    """{'images', 'labels', 'seeds': None} of ``spec`` 'run:train' (the run's training images) or 'run:heldout'
    (those its data.max_size left out; ValueError when it trained on everything)."""
    if spec == 'run:train':
        return dict(images=train.images, labels=train.labels, seeds=None)
    if spec != 'run:heldout':
        raise ValueError(f'{spec!r}: the run\'s image sets are {", ".join(RUN_SETS)}')
    if train.heldout_images is None:
        raise ValueError('the run trained on all of its data (no data.max_size): run:heldout is empty; give images '
                         'by name')
    return dict(images=train.heldout_images, labels=train.heldout_labels, seeds=None)


def sample_batches(spec: str, allow_incomplete: bool = False, train: Optional[TrainingData] = None
                   ) -> Iterator[dict]:
    """The images to audit, batch by batch: {'images' uint8 (B,H,W,C), 'labels' (B,) or None, 'seeds' (B,) or
    None}. A sample.py folder streams shard by shard (a million samples never sit in memory at once); any other
    image set (:func:`jaxdiff.evaluation.fid.load_image_set`, or a run's own set of :data:`RUN_SETS`, given its
    ``train``) is one batch."""
    from jaxdiff.evaluation.fid import load_image_set
    from jaxdiff.sampling import shards
    if spec in RUN_SETS:
        if train is None:
            raise ValueError(f'{spec} names the run\'s images: give the run (--workdir)')
        yield run_images(spec, train)
        return
    if os.path.isdir(spec) and any(n.startswith('shard-') and n.endswith('.npz') for n in os.listdir(spec)):
        if not allow_incomplete:
            shards.check_complete(spec)
        for name in shards.shard_names(spec):
            yield shards.read_shard(os.path.join(spec, name))
        return
    data = load_image_set(spec, allow_incomplete)
    if 'images' not in data:
        raise ValueError(f'{spec} holds feature statistics, not images: the audit compares pixels')
    yield dict(data)


def normalised_distance(distances: np.ndarray, alpha: float = ALPHA,
                        denominators: Optional[np.ndarray] = None) -> np.ndarray:
    """Carlini et al.'s l (Q,) from each sample's neighbour distances (Q, n), ascending: d_1 / (alpha * mean(d));
    ``denominators`` (Q,) replaces mean(d) (the 'train' variant). 0 / 0 (a sample equal to n training images)
    counts as 0: extracted."""
    d = np.asarray(distances, np.float64)
    mean = d.mean(axis=1) if denominators is None else np.asarray(denominators, np.float64)
    with np.errstate(invalid='ignore', divide='ignore'):
        l = d[:, 0] / (alpha * mean)
    return np.where(d[:, 0] == 0, 0.0, l)


def _reference(train: TrainingData) -> np.ndarray:
    rows = to_rows(train.images)
    if train.xflip:
        rows = np.concatenate([rows, to_rows(train.images[:, :, ::-1])])
    return rows


def memorization_check(train: TrainingData, threshold: float = THRESHOLD, n: int = N_NEIGHBOURS,
                       alpha: float = ALPHA):
    """A :class:`jaxdiff.sampling.filter.MemorizationCheck` scoring images by their l against ``train`` (the same
    search and definition as :func:`extraction_audit`, neighbours='sample')."""
    from jaxdiff.sampling.filter import MemorizationCheck
    reference = _reference(train)
    search = NearestSearch(reference, min(n, len(reference)))

    def score(images: np.ndarray) -> np.ndarray:
        if images.shape[1:] != train.images.shape[1:]:
            raise ValueError(f'samples are {"x".join(map(str, images.shape[1:]))} but the training images '
                             f'{"x".join(map(str, train.images.shape[1:]))}')
        return np.concatenate([normalised_distance(search(to_rows(images[lo:lo + SEARCH_BATCH])).distances, alpha)
                               for lo in range(0, len(images), SEARCH_BATCH)])
    return MemorizationCheck(score, threshold, train.description + (' + mirrored' if train.xflip else ''))


def extraction_audit(batches: Iterable[dict], train: TrainingData, *, n: int = N_NEIGHBOURS, alpha: float = ALPHA,
                     threshold: float = THRESHOLD, neighbours: str = 'sample', keep: int = GRID_PAIRS,
                     log: Callable[[str], None] = print) -> dict:
    """Carlini et al.'s extraction attack on the sample ``batches`` (see the module docstring).

    Returns {'per_sample': {'seeds', 'labels', 'nn_index' (into train.images), 'nn_flipped' (bool: the match is
    the mirrored image), 'nn_distance', 'mean_distance' (the denominator before alpha), 'l'} (each (Q,)),
    'kept': {'images', 'rows'} (the ``keep`` lowest-l samples, for the picture),
    'summary': {...}} with the counts, the extraction rate and quantiles of l.
    """
    if neighbours not in NEIGHBOURS:
        raise ValueError(f"neighbours={neighbours!r}: use 'sample' (the paper's) or 'train'")
    if alpha <= 0:
        raise ValueError(f'alpha={alpha} must be positive')
    shape = train.images.shape[1:]
    reference = _reference(train)
    n = min(n, len(reference))
    search = NearestSearch(reference, n)
    parts: dict[str, list] = {k: [] for k in ('seeds', 'labels', 'nn_index', 'nn_distance', 'mean_distance')}
    kept_images, kept_rows, kept_l = np.zeros((0,) + shape, np.uint8), np.zeros(0, np.int64), np.zeros(0)
    start, done, below = time.time(), 0, 0
    for batch in batches:
        images = np.asarray(batch['images'])
        if images.shape[1:] != shape:
            raise ValueError(f'samples are {"x".join(map(str, images.shape[1:]))} but the training images '
                             f'{"x".join(map(str, shape))}; audit against training data of the samples\' size')
        for lo in range(0, len(images), SEARCH_BATCH):
            part = images[lo:lo + SEARCH_BATCH]
            found = search(to_rows(part))
            rows = done + np.arange(len(part))
            parts['nn_index'].append(found.indices[:, 0])
            parts['nn_distance'].append(found.distances[:, 0])
            parts['mean_distance'].append(found.distances.mean(axis=1))
            seeds = batch.get('seeds')
            labels = batch.get('labels')
            parts['seeds'].append(rows if seeds is None else np.asarray(seeds)[lo:lo + len(part)])
            parts['labels'].append(np.full(len(part), -1) if labels is None else np.asarray(labels)[lo:lo + len(part)])
            l = normalised_distance(found.distances, alpha)
            below += int(np.sum(l < threshold))
            # the picture's candidates: the ``keep`` lowest l so far (by the sample-neighbourhood l: the 'train'
            # variant's l is known after the stream)
            pick = np.argsort(l, kind='stable')[:keep]
            kept_images = np.concatenate([kept_images, part[pick]])
            kept_rows, kept_l = np.concatenate([kept_rows, rows[pick]]), np.concatenate([kept_l, l[pick]])
            order = np.argsort(kept_l, kind='stable')[:keep]
            kept_images, kept_rows, kept_l = kept_images[order], kept_rows[order], kept_l[order]
            done += len(part)
            log(f'extraction audit: {done:,} samples searched against {len(train.images):,} training images '
                f'({done / max(time.time() - start, 1e-9):,.0f} samples/s), {below:,} with sample-neighbourhood '
                f'l < {threshold:g} so far')
    if done == 0:
        raise ValueError('no samples to audit')
    out = {k: np.concatenate(v) for k, v in parts.items()}
    num_train = len(train.images)
    out['nn_flipped'] = out['nn_index'] >= num_train
    out['nn_index'] = out['nn_index'] % num_train
    if neighbours == 'train':
        out['mean_distance'] = _training_neighbourhood(train, out['nn_index'], n)
    out['l'] = normalised_distance(out['nn_distance'][:, None], alpha, out['mean_distance'])
    extracted = out['l'] < threshold
    summary = dict(num_samples=int(done), num_train=num_train, xflip_reference=train.xflip, n=n, alpha=alpha,
                   threshold=threshold, neighbours=neighbours, extracted=int(extracted.sum()),
                   extraction_rate=float(extracted.mean()),
                   distinct_training_images_extracted=int(len(np.unique(out['nn_index'][extracted]))),
                   l_quantiles={f'{q:g}': float(np.quantile(out['l'], q)) for q in (0, 0.001, 0.01, 0.1, 0.5)},
                   nn_distance_median=float(np.median(out['nn_distance'])), training_data=train.description,
                   seconds=round(time.time() - start, 1))
    if neighbours == 'train':  # the picture's rows re-ranked by the variant's l
        row_l = out['l'][kept_rows]
        order = np.argsort(row_l, kind='stable')
        kept_images, kept_rows = kept_images[order], kept_rows[order]
    return dict(per_sample=out, kept=dict(images=kept_images, rows=kept_rows), summary=summary)


def _training_neighbourhood(train: TrainingData, indices: np.ndarray, n: int) -> np.ndarray:
    """Mean l2 (Q,) from training image ``indices[q]`` to its n nearest other training images (the 'train'
    variant's denominator; the image itself is left out, its mirror is not)."""
    unique, inverse = np.unique(indices, return_inverse=True)
    reference = _reference(train)
    k = min(n + 1, len(reference))
    found = NearestSearch(reference, k)(to_rows(train.images[unique]))
    means = np.empty(len(unique))
    for j, (d, i) in enumerate(zip(found.distances, found.indices)):
        others = d[i != unique[j]]
        means[j] = others[:n].mean() if len(others) else np.nan
    return means[inverse]


def pairs_grid(samples: np.ndarray, train_images: np.ndarray, flipped: np.ndarray, columns: int = 8) -> np.ndarray:
    """uint8 grid image: each sample (K, H, W, C) beside its training neighbour (mirrored where ``flipped``),
    ``columns`` pairs per row."""
    from jaxdiff.tasks.sample_grid import grid_image
    neighbours = np.where(flipped[:, None, None, None], train_images[:, :, ::-1], train_images)
    pairs = np.concatenate([samples, neighbours], axis=2)  # side by side
    return grid_image(pairs, columns, min_side=32, gap=3)


def write_extraction(result: dict, train: TrainingData, out_dir: str) -> dict:
    """Write the audit to ``out_dir``: extraction.json (summary + every extracted sample: seed, label, training
    index, flipped, l, l2), per_sample.npz (the per-sample arrays), extracted.png (sample | neighbour pairs, the
    extracted ones or else the closest) and l_histogram.png. Returns the summary with the file paths."""
    os.makedirs(out_dir, exist_ok=True)
    per, summary = result['per_sample'], dict(result['summary'])
    np.savez(os.path.join(out_dir, 'per_sample.npz'), **per)
    extracted = np.flatnonzero(per['l'] < summary['threshold'])
    extracted = extracted[np.argsort(per['l'][extracted], kind='stable')]
    summary['extracted_samples'] = [dict(seed=int(per['seeds'][i]), label=int(per['labels'][i]),
                                         train_index=int(per['nn_index'][i]), flipped=bool(per['nn_flipped'][i]),
                                         l=float(per['l'][i]), l2=float(per['nn_distance'][i])) for i in extracted]
    shown, images = result['kept']['rows'], result['kept']['images']  # ordered by l
    if len(extracted):
        mask = per['l'][shown] < summary['threshold']
        shown, images = shown[mask], images[mask]
    shown, images = shown[:GRID_PAIRS], images[:GRID_PAIRS]
    if len(shown):
        from PIL import Image
        grid = pairs_grid(images, train.images[per['nn_index'][shown]], per['nn_flipped'][shown])
        Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(os.path.join(out_dir, 'extracted.png'))
    summary['grid'] = dict(file='extracted.png', shows=f'the {len(shown)} extracted samples of lowest l' if
                           len(extracted) else f'the {len(shown)} closest samples (none extracted)',
                           pairs='sample | training neighbour')
    histogram_png([per['l']], [f'{summary["num_samples"]:,} samples'], 'normalised distance l',
                  os.path.join(out_dir, 'l_histogram.png'), vline=summary['threshold'])
    with open(os.path.join(out_dir, 'extraction.json'), 'w') as f:
        json.dump(summary, f, indent=1)
    return summary


def membership_audit(denoiser: Callable, label_dim: int, train: TrainingData, *,
                     sigmas: Sequence[float] = MEMBERSHIP_SIGMAS, draws: int = 4, num: int = 1000, seed: int = 0,
                     batch_size: int = 250, log: Callable[[str], None] = print) -> dict:
    """Loss-based membership inference: ``num`` members (a seeded draw from train.images) against ``num``
    non-members (from train.heldout_images), scored by -loss. Returns {'per_sigma': {sigma: roc summary},
    'eps_mean': roc summary of the epsilon-space loss averaged over sigmas, 'scores': {'members',
    'nonmembers'} (N, S) x0-space losses, 'sigmas', 'num'}."""
    from jaxdiff.metrics.denoising_loss import denoising_losses, eps_space
    if train.heldout_images is None:
        raise ValueError('membership inference needs images the model did not train on: a run trained with '
                         'data.max_size, or --heldout DATASET')
    rng = np.random.default_rng(seed)
    num = min(num, len(train.images), len(train.heldout_images))
    member_rows = np.sort(rng.choice(len(train.images), num, replace=False))
    other_rows = np.sort(rng.choice(len(train.heldout_images), num, replace=False))
    log(f'membership: denoising losses of {num:,} members and {num:,} non-members at sigma '
        f'{", ".join(f"{s:g}" for s in sigmas)} ({draws} noise draws each)')
    members = denoising_losses(denoiser, train.images[member_rows], train.labels[member_rows], label_dim, sigmas,
                               draws=draws, seed=seed, batch_size=batch_size, log=log)
    others = denoising_losses(denoiser, train.heldout_images[other_rows], train.heldout_labels[other_rows],
                              label_dim, sigmas, draws=draws, seed=seed + 1, batch_size=batch_size, log=log)
    per_sigma = {f'{s:g}': roc_summary(-members[:, j], -others[:, j]) for j, s in enumerate(sigmas)}
    eps_mean = roc_summary(-eps_space(members, sigmas).mean(1), -eps_space(others, sigmas).mean(1))
    return dict(per_sigma=per_sigma, eps_mean=eps_mean, scores=dict(members=members, nonmembers=others),
                sigmas=[float(s) for s in sigmas], num=int(num), draws=draws)


def write_membership(result: dict, out_dir: str) -> dict:
    """membership.json (the summaries), membership_scores.npz (the losses) and membership_roc.png in ``out_dir``;
    returns the JSON object."""
    os.makedirs(out_dir, exist_ok=True)
    scores, sigmas = result['scores'], result['sigmas']
    np.savez(os.path.join(out_dir, 'membership_scores.npz'), sigmas=np.asarray(sigmas), **scores)
    from jaxdiff.metrics.denoising_loss import eps_space
    curves = [(f'sigma {s:g}', -scores['members'][:, j], -scores['nonmembers'][:, j]) for j, s in enumerate(sigmas)]
    curves.append(('eps-loss mean', -eps_space(scores['members'], sigmas).mean(1),
                   -eps_space(scores['nonmembers'], sigmas).mean(1)))
    roc_png(curves, os.path.join(out_dir, 'membership_roc.png'), 'membership by denoising loss')
    record = {k: v for k, v in result.items() if k != 'scores'}
    with open(os.path.join(out_dir, 'membership.json'), 'w') as f:
        json.dump(record, f, indent=1)
    return record
