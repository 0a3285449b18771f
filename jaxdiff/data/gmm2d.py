"""``data.source = 'gmm2d'``: points of the 8-mode 2-D ring mixture (jaxdiff.toy) as a data source.

Points are carried as 1x1 two-channel "images" (B, 1, 1, 2) in the mixture's own units (radius 4, std 0.3), so
the training step, the losses and the samplers need no special case (jaxdiff.data.make_iterator reads it
like any source, without the uint8 -> [-1, 1] conversion); the label is the mode index (8 classes).
The fixed training set of :data:`NUM_POINTS` points is drawn from the data seed; order and host sharding follow
the image pipeline (shard -> per-epoch shuffle -> repeat -> batch).
"""
from __future__ import annotations

import jax
import numpy as np

from jaxdiff import toy
from jaxdiff.data.sources import DatasetInfo

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


def make_gmm2d_source(seed: int) -> tuple[PointSource, DatasetInfo]:
    """(source of dict(image=float32 (1, 1, 2), label=int32 ()), DatasetInfo) for ``data.source = 'gmm2d'``:
    :data:`NUM_POINTS` points of :func:`ring` drawn from ``seed`` (the data seed)."""
    points, labels = toy.sample(ring(), jax.random.key(seed), NUM_POINTS)
    source = PointSource(np.asarray(points, np.float32), np.asarray(labels, np.int32))
    return source, DatasetInfo(resolution=1, channels=2, num_classes=NUM_MODES, size=NUM_POINTS)
