"""Filter generated samples before they become training data: drop copies of the training set, then keep the top
fraction of each class by a classifier's confidence, as in the generated-data AT pipeline.

Memorisation: a sample whose normalised distance to the training set (Carlini et al. 2023's l, computed by
:mod:`jaxdiff.evaluation.memorization`) is below a threshold is a near-copy of a training image and is dropped;
the manifest records the threshold and how many went.
Confidence: Wang et al. (2023) sample 5M class-conditional CIFAR-10 images and keep the 20% of each class to which
a pseudo-labeller gives the highest probability of the conditioning class (1M images). Here the score of a sample
is ``softmax(classifier(image))[label]``; within a class, ties go to the lower seed, so the result is a function
of the samples alone.
"""
from __future__ import annotations

import os
from typing import Callable, NamedTuple, Optional

import numpy as np

from jaxdiff import files
from jaxdiff.sampling import shards


class MemorizationCheck(NamedTuple):
    """How to find copies: ``score`` maps uint8 images (N, H, W, C) to their normalised distance l (N,) to the
    training set; samples with l < ``threshold`` are dropped; ``description`` names the training set."""
    score: Callable[[np.ndarray], np.ndarray]
    threshold: float
    description: str


def top_per_class(scores: np.ndarray, labels: np.ndarray, fraction: float) -> np.ndarray:
    """Indices (ascending) of the round(fraction * n_c) highest-scoring samples of every class c.

    scores float (N,), labels int (N,) (>= 0), fraction in (0, 1].
    """
    if not 0 < fraction <= 1:
        raise ValueError(f'fraction {fraction} must lie in (0, 1]')
    keep = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        order = np.argsort(-scores[members], kind='stable')  # stable: equal scores keep seed order
        keep.append(members[order[:int(round(fraction * len(members)))]])
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, np.int64)


def class_scores(apply: Callable, images: np.ndarray, labels: np.ndarray, batch_size: int = 1000) -> np.ndarray:
    """p(label | image) (N,) float32 from ``apply(images uint8 (B,H,W,C)) -> {'logits': (B, K)}``, batched."""
    import jax
    out = []
    for lo in range(0, len(images), batch_size):
        logits = np.asarray(apply(images[lo:lo + batch_size])['logits'], np.float32)
        probs = np.asarray(jax.nn.softmax(logits, axis=-1))
        out.append(probs[np.arange(len(probs)), labels[lo:lo + batch_size]])
    return np.concatenate(out)


def filter_folder(in_dir: str, fraction: Optional[float] = None, classifier: Optional[str] = None, *,
                  memorized: Optional[MemorizationCheck] = None, out_dir: str | None = None,
                  shard_size: int = 10_000, log: Callable[[str], None] = print) -> str:
    """Write the samples of folder ``in_dir`` that pass the filters to ``out_dir`` as shards of the same format,
    with a manifest naming the source, the filters and what each removed.

    memorized: drop near-copies of the training set first (see :class:`MemorizationCheck`); fraction (0, 1] with
    classifier (a :mod:`jaxdiff.metrics.feature_classifier` name, trained and cached on first use): then keep the
    top fraction of each class. out_dir defaults to ``in_dir/`` + ``unmemorized`` and/or ``top<percent>``, joined
    by '_'. Returns out_dir. Raises ValueError for no filter, unconditional samples with ``fraction``, or an
    incomplete input folder.
    """
    if memorized is None and fraction is None:
        raise ValueError('nothing to filter by: give a memorisation threshold and/or a top fraction per class')
    manifest = shards.read_manifest(in_dir)
    if manifest is None or not manifest.get('complete'):
        raise ValueError(f'{in_dir} is not a complete sample folder; finish sampling (rerun sample.py) first')
    data = shards.load_samples(in_dir)
    if fraction is not None and (data['labels'] < 0).any():
        raise ValueError('filtering keeps the best samples of each class; these samples are unconditional')
    keep = np.arange(len(data['seeds']))
    record: dict = {}
    if memorized is not None:
        log(f'memorisation: normalised distance of {len(keep):,} samples to {memorized.description}')
        l = memorized.score(data['images'])
        keep = np.flatnonzero(l >= memorized.threshold)
        record.update(memorized_threshold=memorized.threshold, memorized_dropped=int(len(l) - len(keep)),
                      memorized_against=memorized.description, min_l=float(l.min()))
        log(f'dropped {len(l) - len(keep):,} of {len(l):,} samples with l < {memorized.threshold:g} (smallest l '
            f'{l.min():.3f})')
    if fraction is not None:
        from jaxdiff.tasks.feature_classifier import load_or_train
        net = load_or_train(classifier, log=log)
        log(f'scoring {len(keep):,} samples with {classifier} (held-out accuracy {net.accuracy:.3f})')
        scores = class_scores(net.apply, data['images'][keep], data['labels'][keep])
        top = top_per_class(scores, data['labels'][keep], fraction)
        record.update(classifier=classifier, fraction=fraction, mean_score_kept=float(scores[top].mean()),
                      mean_score_all=float(scores.mean()))
        log(f'kept {len(top):,} of {len(scores):,} (top {fraction:.0%} per class; mean p(class) '
            f'{record["mean_score_all"]:.3f} -> {record["mean_score_kept"]:.3f})')
        keep = keep[top]
    name = '_'.join((['unmemorized'] if memorized is not None else []) +
                    ([f'top{fraction * 100:g}'] if fraction is not None else []))
    out_dir = out_dir or os.path.join(in_dir, name)
    os.makedirs(out_dir, exist_ok=True)
    plan = shards.Plan(0, len(keep), shard_size)
    for k in range(plan.num_shards):
        rows = keep[k * shard_size:(k + 1) * shard_size]
        shards.write_shard(out_dir, k, data['images'][rows], data['labels'][rows], data['seeds'][rows],
                           int(manifest['labels']['num_classes']))
    record = dict(format=shards.FORMAT, num_samples=int(len(keep)), shard_size=shard_size,
                  num_shards=plan.num_shards, image_shape=manifest['image_shape'], labels=manifest['labels'],
                  filtered_from=os.path.abspath(in_dir), num_input=int(len(data['seeds'])), **record)
    entries = [dict(file=os.path.basename(shards.shard_path(out_dir, k)), count=int(min(shard_size, len(keep) -
               k * shard_size)), sha256=files.sha256(shards.shard_path(out_dir, k))) for k in range(plan.num_shards)]
    shards.write_manifest(out_dir, record, entries)
    log(f'{len(keep):,} of {len(data["seeds"]):,} samples -> {out_dir}')
    return out_dir
