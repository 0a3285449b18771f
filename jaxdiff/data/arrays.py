"""Checks and facts of in-memory image arrays shared by the data sources and the record writers."""
from __future__ import annotations

import numpy as np


def as_nhwc(images: np.ndarray, what: str) -> np.ndarray:
    """uint8 (N, H, W) or (N, H, W, C) -> (N, H, W, C); ValueError naming ``what`` otherwise."""
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
        raise ValueError(f'{what}: images must be uint8 (N, H, W) or (N, H, W, C), got {images.dtype} {images.shape}')
    if len(images) == 0:
        raise ValueError(f'{what} holds no images')
    return images[..., None] if images.ndim == 3 else images


def num_classes_of(labels: np.ndarray | None, what: str = 'the data') -> int:
    """max(label) + 1, or 0 when there are no labels. A negative label (e.g. -1, 'unconditional' in sample
    shards) is a ValueError naming ``what``: silently it would make those rows' one-hot zero, i.e. unconditional."""
    if labels is None or not len(labels):
        return 0
    if labels.min() < 0:
        raise ValueError(f'{what} has label {int(labels.min())}: class labels are 0..K-1; fix the labels, or train '
                         'without them (--config.data.use_labels=False)')
    return int(labels.max()) + 1
