"""Random-access image sources and :func:`make_source`, the one entry point that turns ``config.data`` into one.

Every source yields ``dict(image=uint8 (H, W, C), label=int32 ())`` and has ``len``/``__getitem__``, which is all
``grain.MapDataset.source`` needs. Sources (``data.source``):

- ``digits``: scikit-learn's 8x8 digits (1797 images, 10 classes, 1 channel) from its wheel; values 0..16 are
  scaled to 0..255 (``round(v * 255 / 16)``).
- ``fashion_mnist``: the gzipped (or plain) idx files of Debian's ``dataset-fashion-mnist`` (28x28, 10 classes);
  ``data.path`` overrides the folder; ``data.split`` is ``train`` or ``test``.
- ``npz``: a ``.npz`` with ``images`` uint8 (N, H, W, C) or (N, H, W) and optional ``labels`` int (N,).
- ``folder``: PNG/JPEG files under a folder (recursively, sorted), EDM dataset-tool style, with an optional
  ``dataset.json`` ``{"labels": [[relative_path, label], ...]}``; all images share one size and mode (L or RGB).
- ``array_record`` and ``tfds``: see :mod:`jaxdiff.data.records`.

Resolution (``data.resolution``, rule shared by all sources): 0 or the native side keeps the images; an integer
multiple of the native side upsamples by pixel replication (nearest; digits 8 -> 16/32 keep filling the frame);
any other larger side zero-pads to the centre (Fashion-MNIST 28 -> 32, extra row/column at the bottom/right);
smaller sides are an error (no downscaling). Images must be square.

Subset (``data.max_size``, configs that have it): EDM's ``Dataset(max_size=...)`` rule, a shuffle of the indices
by ``np.random.RandomState(0)`` whose first ``max_size`` are kept in sorted order (:func:`subset_indices`); the
images left out are the natural non-members for a membership audit.
"""
from __future__ import annotations

import gzip
import json
import os
from typing import Any, NamedTuple, Optional

import numpy as np

from jaxdiff import files
from jaxdiff.data import records
from jaxdiff.data.arrays import as_nhwc, num_classes_of

FASHION_MNIST_DIR = '/usr/share/datasets/fashion-mnist'
IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg')
SOURCES = ('digits', 'fashion_mnist', 'npz', 'folder', 'array_record', 'tfds')


class DatasetInfo(NamedTuple):
    """What the model needs to know about the data (after resizing; ``num_classes`` is 0 when unlabelled)."""
    resolution: int
    channels: int
    num_classes: int
    size: int


class ArraySource:
    """In-memory source over ``images`` uint8 (N, H, W, C) and ``labels`` int32 (N,)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return dict(image=self.images[index], label=self.labels[index])


class FittedSource:
    """Wraps a source: images brought to ``resolution`` (see :func:`fit_resolution`), labels int32 or zeros; with
    ``indices`` (int (M,)), only those items of ``source``, in that order."""

    def __init__(self, source: Any, resolution: int, use_labels: bool, indices: Optional[np.ndarray] = None):
        self.source, self.resolution, self.use_labels, self.indices = source, resolution, use_labels, indices

    def __len__(self) -> int:
        return len(self.source) if self.indices is None else len(self.indices)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        item = self.source[index if self.indices is None else int(self.indices[index])]
        label = item['label'] if self.use_labels else 0
        return dict(image=fit_resolution(item['image'], self.resolution), label=np.int32(label))


def subset_indices(size: int, max_size: int, seed: int = 0) -> Optional[np.ndarray]:
    """The indices (sorted int64 (max_size,)) of a ``size``-item source kept by ``max_size``, or None when it keeps
    all (0 or >= size). EDM's rule: ``np.random.RandomState(seed).shuffle`` of ``arange(size)``, the first
    ``max_size`` sorted (EDM's ``Dataset`` default seed is 0)."""
    if max_size <= 0 or max_size >= size:
        return None
    order = np.arange(size)
    np.random.RandomState(seed % (1 << 31)).shuffle(order)
    return np.sort(order[:max_size])


def fit_resolution(image: np.ndarray, resolution: int) -> np.ndarray:
    """uint8 (n, n, C) -> (resolution, resolution, C): kept, nearest-upsampled by an integer factor, or centre-padded."""
    n = image.shape[0]
    if resolution in (0, n):
        return image
    if resolution % n == 0:
        factor = resolution // n
        return np.repeat(np.repeat(image, factor, axis=0), factor, axis=1)
    before = (resolution - n) // 2
    pad = (before, resolution - n - before)
    return np.pad(image, (pad, pad, (0, 0)))


def check_resolution(shape: tuple[int, ...], resolution: int, what: str) -> int:
    """The output side for images of ``shape`` (H, W, C); ValueError for non-square images or downscaling."""
    height, width = shape[:2]
    if height != width:
        raise ValueError(f'{what} has {height}x{width} images; jaxdiff needs square images (crop or pad them first)')
    if resolution < 0 or 0 < resolution < height:
        raise ValueError(f'data.resolution={resolution} is invalid for {what} ({height}x{width} images): '
                         f'use 0 (native) or a side >= {height} (integer multiples upsample, others zero-pad)')
    return resolution or height


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits: images uint8 (1797, 8, 8, 1) in 0..255, labels int32 (1797,)."""
    from sklearn.datasets import load_digits as sklearn_digits  # pylint: disable=import-outside-toplevel
    digits = sklearn_digits()
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)[..., None]
    return images, digits.target.astype(np.int32)


def read_idx(path: str) -> np.ndarray:
    """An idx file (gzipped or not) of unsigned bytes -> uint8 array of its declared shape."""
    opener = gzip.open if path.endswith('.gz') else open
    with opener(path, 'rb') as f:
        data = f.read()
    if len(data) < 4 or data[:3] != b'\x00\x00\x08':
        raise ValueError(f'{path} is not an idx file of unsigned bytes (bad magic number)')
    ndim = data[3]
    shape = tuple(int(d) for d in np.frombuffer(data, '>i4', count=ndim, offset=4))
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion_mnist(folder: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST from idx files in ``folder``: images uint8 (N, 28, 28, 1), labels int32 (N,)."""
    prefix = {'train': 'train', 'test': 't10k'}.get(split)
    if prefix is None:
        raise ValueError(f"data.split={split!r} is not a Fashion-MNIST split: use 'train' or 'test'")
    arrays = []
    for kind in ('images-idx3-ubyte', 'labels-idx1-ubyte'):
        candidates = [os.path.join(folder, f'{prefix}-{kind}{ext}') for ext in ('.gz', '')]
        found = [p for p in candidates if os.path.exists(p)]
        if not found:
            raise FileNotFoundError(
                f'Fashion-MNIST idx files not found at {candidates[0]}; install Debian\'s dataset-fashion-mnist '
                '(apt-get install dataset-fashion-mnist) or set --config.data.path to a folder holding them')
        arrays.append(read_idx(found[0]))
    return arrays[0][..., None], arrays[1].astype(np.int32)


def load_npz(path: str) -> tuple[np.ndarray, np.ndarray | None]:
    """A .npz with ``images`` uint8 (N, H, W[, C]) and optional ``labels`` -> (N, H, W, C), int32 (N,) or None."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f'npz file not found: {path!r}; set --config.data.path to an .npz with an "images" array')
    npz = files.read_npz(path, 'an image dataset (.npz)')
    if 'images' not in npz:
        raise ValueError(f'{path} has no "images" array (found {sorted(npz)}); save it with np.savez(path, '
                         'images=..., labels=...)')
    images = as_nhwc(npz['images'], path)
    labels = npz['labels'].astype(np.int32) if 'labels' in npz else None
    if labels is not None and labels.shape != images.shape[:1]:
        raise ValueError(f'{path}: labels have shape {labels.shape}, expected ({len(images)},)')
    return images, labels


def _unreadable_image(path: str, error: BaseException) -> str:
    return f'{path} is not a readable image ({type(error).__name__}: {error}); remove or replace the file'


def _open_image(path: str):
    """Pillow's Image of ``path`` (a context manager); ValueError (one line naming the file) if Pillow cannot read
    it."""
    from PIL import Image  # pylint: disable=import-outside-toplevel
    try:
        return Image.open(path)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(_unreadable_image(path, e)) from e


class FolderSource:
    """Images under a folder (EDM dataset-tool layout), decoded lazily with Pillow."""

    def __init__(self, folder: str):
        if not os.path.isdir(folder):
            raise FileNotFoundError(f'image folder not found: {folder!r}; set --config.data.path to a folder of PNG/JPEG images')
        self.folder = folder
        self.files = sorted(
            os.path.relpath(os.path.join(root, name), folder).replace(os.sep, '/')
            for root, _, names in os.walk(folder) for name in names if name.lower().endswith(IMAGE_SUFFIXES))
        if not self.files:
            raise ValueError(f'image folder {folder!r} holds no .png/.jpg/.jpeg files')
        self.shape = self._common_shape()
        self.labels = self._labels()

    def _common_shape(self) -> tuple[int, int, int]:
        first = None
        for name in self.files:
            with _open_image(os.path.join(self.folder, name)) as image:
                size, mode = image.size, image.mode
            if mode not in ('L', 'RGB'):
                raise ValueError(f'{name} in {self.folder} has mode {mode}; convert the images to RGB or L')
            if first is None:
                first = (name, size, mode)
            elif (size, mode) != first[1:]:
                raise ValueError(f'{name} in {self.folder} is {size[0]}x{size[1]} {mode} but {first[0]} is '
                                 f'{first[1][0]}x{first[1][1]} {first[2]}; all images must share one size and mode')
        (width, height), mode = first[1:]
        return height, width, 1 if mode == 'L' else 3

    def _labels(self) -> np.ndarray | None:
        path = os.path.join(self.folder, 'dataset.json')
        if not os.path.exists(path):
            return None
        try:
            with open(path) as f:
                pairs = json.load(f).get('labels')
        except (OSError, ValueError, AttributeError) as e:
            raise ValueError(f'{path} is unreadable ({type(e).__name__}: {e}); it must be JSON like EDM\'s '
                             'dataset.json: {"labels": [["file.png", class], ...]}') from e
        if pairs is None:
            return None
        table = dict(pairs)
        missing = [name for name in self.files if name not in table]
        if missing:
            raise ValueError(f'{path} has no label for {missing[0]} ({len(missing)} files without labels)')
        return np.asarray([table[name] for name in self.files], np.int32)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        path = os.path.join(self.folder, self.files[index])
        with _open_image(path) as image:
            try:
                array = np.asarray(image)
            except (OSError, SyntaxError, ValueError) as e:  # the pixels are decoded here: a truncated file fails
                raise ValueError(_unreadable_image(path, e)) from e
        label = 0 if self.labels is None else self.labels[index]
        return dict(image=array.reshape(self.shape), label=label)


def _raw_source(config: Any) -> tuple[Any, tuple[int, int, int], int]:
    """(source of native images, native (H, W, C), num_classes) for ``config.source``."""
    name = config.source
    if name in ('digits', 'fashion_mnist', 'npz'):
        if name == 'digits':
            images, labels = load_digits()
        elif name == 'fashion_mnist':
            images, labels = load_fashion_mnist(config.path or FASHION_MNIST_DIR, config.split)
        else:
            images, labels = load_npz(config.path)
        num_classes = num_classes_of(labels, f'data.source={name} {config.path}') if config.use_labels else 0
        labels = np.zeros(len(images), np.int32) if labels is None else labels
        return ArraySource(images, labels), images.shape[1:], num_classes
    if name == 'folder':
        source = FolderSource(config.path)
        num_classes = num_classes_of(source.labels, f'{config.path}/dataset.json') if config.use_labels else 0
        return source, source.shape, num_classes
    if name == 'array_record':
        source = records.ArrayRecordSource(config.path)
        return source, source.shape, source.num_classes
    if name == 'tfds':
        return records.tfds_source(config.tfds_name, config.split, config.path)
    raise ValueError(f'unknown data.source {name!r}: use one of {", ".join(SOURCES)}')


def make_source(config: Any) -> tuple[FittedSource, DatasetInfo]:
    """``config.data`` -> (source of dict(image=uint8 (R, R, C), label=int32 ()), DatasetInfo).

    Labels are zeros and ``num_classes`` is 0 when ``config.use_labels`` is false or the data has none.
    """
    source, shape, num_classes = _raw_source(config)
    resolution = check_resolution(shape, config.resolution, f'data.source={config.source}')
    num_classes = num_classes if config.use_labels else 0
    indices = subset_indices(len(source), config.get('max_size', 0))
    fitted = FittedSource(source, config.resolution, num_classes > 0, indices)
    info = DatasetInfo(resolution=resolution, channels=shape[2], num_classes=num_classes, size=len(fitted))
    return fitted, info
