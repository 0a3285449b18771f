"""``data.source = 'gmm2d'``: points of the 8-mode 2-D ring mixture (jaxdiff.toy) as a grain pipeline.

Points are carried as 1x1 two-channel "images" (B, 1, 1, 2) in the mixture's own units (radius 4, std 0.3), so
the training step, the losses and the samplers need no special case; the label is the mode index (8 classes).
The fixed training set of :data:`NUM_POINTS` points is drawn from the data seed; order and host sharding follow
the image pipeline (shard -> per-epoch shuffle -> repeat -> batch).
"""
from __future__ import annotations

from typing import Any

import grain
import jax
import numpy as np

from jaxdiff import toy
from jaxdiff.data import DatasetInfo
from jaxdiff.data.pipeline import data_seed, host_batches

NUM_POINTS = 16384
NUM_MODES = 8


def ring() -> toy.GaussianMixture:
    """The mixture the points come from: 8 modes on a circle of radius 4, std 0.3, mode k has label k."""
    return toy.ring_mixture(NUM_MODES, radius=4.0, std=0.3, labels=list(range(NUM_MODES)), num_classes=NUM_MODES)


class PointSource:
    """Random-access source of dict(image=float32 (1, 1, 2), label=int32 ())."""

    def __init__(self, points: np.ndarray, labels: np.ndarray):
        self.points, self.labels = points, labels

    def __len__(self) -> int:
        return len(self.points)

    def __getitem__(self, index: int) -> dict:
        return dict(image=self.points[index].reshape(1, 1, 2), label=self.labels[index])


def make_gmm2d_iterator(config: Any, *, global_batch_size: int, seed: int, process_index: int = 0,
                        process_count: int = 1) -> tuple[grain.DatasetIterator, DatasetInfo]:
    """Like :func:`jaxdiff.data.make_iterator` for ``config.source == 'gmm2d'``: yields dict(image=float32
    (global_batch_size // process_count, 1, 1, 2), label=int32 (same,)); the state is JSON-serialisable."""
    shuffle = data_seed(config, seed)
    points, labels = toy.sample(ring(), jax.random.key(shuffle), NUM_POINTS)
    source = PointSource(np.asarray(points, np.float32), np.asarray(labels, np.int32))
    dataset = host_batches(source, global_batch_size=global_batch_size, seed=shuffle, process_index=process_index,
                           process_count=process_count)
    info = DatasetInfo(resolution=1, channels=2, num_classes=NUM_MODES, size=NUM_POINTS)
    return iter(dataset.to_iter_dataset()), info
