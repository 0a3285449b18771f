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


def num_classes_of(labels: np.ndarray | None) -> int:
    """max(label) + 1, or 0 when there are no labels."""
    return 0 if labels is None else int(labels.max()) + 1
