"""Keep the top fraction of each class by a classifier's confidence, as in the generated-data AT pipeline.

Wang et al. (2023) sample 5M class-conditional CIFAR-10 images and keep the 20% of each class to which a
pseudo-labeller gives the highest probability of the conditioning class (1M images). Here the score of a sample
is ``softmax(classifier(image))[label]``; within a class, ties go to the lower seed, so the result is a function
of the samples alone.
"""
from __future__ import annotations

import os
from typing import Callable

import numpy as np

from jaxdiff import files
from jaxdiff.sampling import shards


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


def filter_folder(in_dir: str, fraction: float, classifier: str, *, out_dir: str | None = None,
                  shard_size: int = 10_000, log: Callable[[str], None] = print) -> str:
    """Write the top ``fraction`` per class of sample folder ``in_dir`` to ``out_dir`` (default
    ``in_dir/top<percent>``) as shards of the same format, with a manifest naming the source and the classifier.

    classifier: a name of :mod:`jaxdiff.metrics.feature_classifier` (trained and cached on first use).
    Returns out_dir. Raises ValueError for unconditional samples or an incomplete input folder.
    """
    from jaxdiff.tasks.feature_classifier import load_or_train
    manifest = shards.read_manifest(in_dir)
    if manifest is None or not manifest.get('complete'):
        raise ValueError(f'{in_dir} is not a complete sample folder; finish sampling (rerun sample.py) first')
    data = shards.load_samples(in_dir)
    if (data['labels'] < 0).any():
        raise ValueError('filtering keeps the best samples of each class; these samples are unconditional')
    out_dir = out_dir or os.path.join(in_dir, f'top{fraction * 100:g}')
    net = load_or_train(classifier, log=log)
    log(f'scoring {len(data["images"]):,} samples with {classifier} (held-out accuracy {net.accuracy:.3f})')
    scores = class_scores(net.apply, data['images'], data['labels'])
    keep = top_per_class(scores, data['labels'], fraction)
    os.makedirs(out_dir, exist_ok=True)
    plan = shards.Plan(0, len(keep), shard_size)
    for k in range(plan.num_shards):
        rows = keep[k * shard_size:(k + 1) * shard_size]
        shards.write_shard(out_dir, k, data['images'][rows], data['labels'][rows], data['seeds'][rows],
                           int(manifest['labels']['num_classes']))
    record = dict(format=shards.FORMAT, num_samples=int(len(keep)), shard_size=shard_size,
                  num_shards=plan.num_shards, image_shape=manifest['image_shape'], labels=manifest['labels'],
                  filtered_from=os.path.abspath(in_dir), classifier=classifier, fraction=fraction,
                  mean_score_kept=float(scores[keep].mean()), mean_score_all=float(scores.mean()))
    entries = [dict(file=os.path.basename(shards.shard_path(out_dir, k)), count=int(min(shard_size, len(keep) -
               k * shard_size)), sha256=files.sha256(shards.shard_path(out_dir, k))) for k in range(plan.num_shards)]
    shards.write_manifest(out_dir, record, entries)
    log(f'kept {len(keep):,} of {len(scores):,} (top {fraction:.0%} per class; mean p(class) '
        f'{record["mean_score_all"]:.3f} -> {record["mean_score_kept"]:.3f}) -> {out_dir}')
    return out_dir
