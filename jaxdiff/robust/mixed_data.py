"""Data for adversarial training with generated images: the real training set (minus a held-out slice for
best-checkpoint selection), a sample.py folder of generated images, and mixed batches drawn from both.

The real set is held in memory (50,000 CIFAR-10 images: 150 MB); the generated images (1M-20M) stay in their
shards and each batch reads its rows from disk (:class:`jaxdiff.data.sample_shards.ShardImages`), so memory does
not grow with their number. Each process builds only its own rows of the global batch (``rows``).

Composition (Wang et al. 2023 / DM-Improves-AT's ``SemiSupervisedSampler``): every batch of B examples holds
``n_gen = floor(B * generated_fraction)`` generated and ``n_real = B - n_gen`` real ones (512 * 0.7 -> 358 + 154,
as the reference's ``int(batch_size * unsup_fraction)``). Each stream is an endless sequence of passes over its
data; pass p is a permutation drawn from ``np.random.SeedSequence([seed, stream, p])`` (stream 0 real, 1
generated), and step s takes positions ``[s * n, (s + 1) * n)`` of that sequence (a batch may straddle two passes).
So a batch depends on (seed, step, dataset sizes) alone: a resumed run repeats the uninterrupted run's batches and
the data-stream state is just the step. (The reference draws the generated part with replacement, and its real
part restarts a fresh permutation of the real set at every epoch and stops after the epoch's batches: with 98
batches of 154 it uses the first 15,092 of each permutation, 31% of the 48,976. Here both streams are without
replacement within a pass, the real stream runs on across epochs (every real example once per ceil(48,976 / 154)
= 319 steps) and every batch has the exact counts.)

Epoch length, as the reference: ``ceil(N_real_train / B)`` steps, N_real_train the WHOLE real training set (the
held-out slice included; 50,000 for CIFAR-10 -> 98 steps at B = 512), with or without generated data and whatever
its amount. DM-Improves-AT's ``get_semisup_dataloaders`` gives its batch sampler
``num_batches = int(np.ceil(dataset_size / batch_size))`` (core/data/semisup.py), where ``dataset_size =
len(self.dataset)`` is taken when the base CIFAR-10 train set is loaded (core/data/cifar10s.py), i.e. before the
1,024-image validation slice is cut and before the generated images are appended. An epoch is therefore ~N_real_train
examples seen (98 * 512 = 50,176 at CIFAR-10 scale), of which only 30% are real; 400 epochs = 39,200 steps.

Held-out slice (the reference keeps the first 1024 CIFAR-10 training images out for PGD-40 selection): the first
``eval.size`` examples of the real training set are removed from training and used for evaluation.

Filtering generated samples (top-p% per class by a pseudo-labeller) is not done here: run
``jaxdiff.sampling.filter.filter_folder`` (writes ``<folder>/top<p>``) and point ``data.generated`` at its output.
"""
from __future__ import annotations

import math
import os
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxdiff.data.sample_shards import ShardImages, check_complete

REAL, GENERATED = 0, 1


class AdvData(NamedTuple):
    """The data of one run. images uint8 (N, H, W, C) (the generated ones indexed like an array, read from disk on
    demand), labels int32 (N,)."""
    real_images: np.ndarray
    real_labels: np.ndarray
    gen_images: Optional[ShardImages]  # read on demand from sample.py's shards; None without generated data
    gen_labels: Optional[np.ndarray]
    eval_images: np.ndarray            # the held-out slice ((0, H, W, C) when eval.size is 0)
    eval_labels: np.ndarray
    info: object                       # jaxdiff.data.sources.DatasetInfo of the real data (size = real train size)


def _real_config(data) -> ml_collections.ConfigDict:
    """The real-data fields of an adversarial config.data as the ``config.data`` that
    :func:`jaxdiff.data.sources.make_source` reads (labels on)."""
    fields = {k: data[k] for k in ('source', 'path', 'tfds_name', 'split', 'resolution')}
    return ml_collections.ConfigDict(dict(fields, use_labels=True))


def load_real(data) -> tuple[np.ndarray, np.ndarray, object]:
    """All images uint8 (N, R, R, C) and labels int32 (N,) of the real data of ``config.data``, and its
    DatasetInfo."""
    from jaxdiff.data.sources import ArraySource, make_source
    source, info = make_source(_real_config(data))
    inner = source.source
    if isinstance(inner, ArraySource) and inner.images.shape[1] == info.resolution:
        images, labels = np.asarray(inner.images), np.asarray(inner.labels, np.int32)
    else:
        items = [source[i] for i in range(len(source))]
        images = np.stack([it['image'] for it in items])
        labels = np.asarray([it['label'] for it in items], np.int32)
    if info.num_classes < 2:
        raise ValueError(f'data.source={data.source!r} has {info.num_classes} classes: adversarial training '
                         'needs a labelled dataset with at least 2 classes')
    return images, labels, info


def load_generated(folder: str, image_shape: tuple, num_classes: int) -> tuple[ShardImages, np.ndarray]:
    """(images: a :class:`~jaxdiff.data.sample_shards.ShardImages` reader, uint8 (M, H, W, C) on demand; labels
    int32 (M,)) of a sample.py folder, checked against the real data. The images stay on disk: memory does not
    grow with M."""
    if os.path.isdir(folder):
        check_complete(folder, hint='')  # training on part of the samples would change the run silently
    try:
        images = ShardImages(folder)
    except FileNotFoundError:
        raise FileNotFoundError(f'data.generated={folder!r}: no such folder; write one with python sample.py '
                                '--out DIR (class-conditional), or set --config.generated_fraction=0 to train on '
                                'real data only') from None
    labels = images.labels
    if images.shape != tuple(image_shape):
        raise ValueError(f'data.generated={folder!r} holds {images.shape} images but the real data is '
                         f'{tuple(image_shape)}; sample at the real data\'s resolution and channels')
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f'data.generated={folder!r} has labels outside 0..{num_classes - 1} (-1 marks '
                         'unconditional samples): adversarial training needs class-conditional samples')
    return images, labels


def load(config) -> AdvData:
    """The real train set minus the held-out slice, the generated samples (if any) and the slice."""
    images, labels, info = load_real(config.data)
    held = int(config.eval.size)
    if held >= len(images):
        raise ValueError(f'eval.size={held} leaves no training data ({len(images)} real examples); lower it')
    gen_images = gen_labels = None
    if config.generated_fraction > 0:
        gen_images, gen_labels = load_generated(config.data.generated, images.shape[1:], info.num_classes)
    info = info._replace(size=len(images) - held)
    return AdvData(images[held:], labels[held:], gen_images, gen_labels, images[:held], labels[:held], info)


def split_counts(batch_size: int, generated_fraction: float) -> tuple[int, int]:
    """(n_real, n_generated) per batch: n_generated = floor(B * fraction) (the reference's int())."""
    n_gen = int(math.floor(batch_size * generated_fraction + 1e-9))
    return batch_size - n_gen, n_gen


def real_train_size(data: AdvData) -> int:
    """N_real_train: the whole real training set, i.e. the training part plus the held-out slice (both cut from
    it by :func:`load`); the generated images are not counted. (the reference's ``dataset_size``)"""
    return int(len(data.real_labels) + len(data.eval_labels))


def steps_per_epoch(batch_size: int, n_real_train: int) -> int:
    """ceil(n_real_train / batch_size): the steps of one epoch, with n_real_train the whole real training set (before
    the held-out slice is cut; generated data not counted). The reference's ``num_batches = int(np.ceil(
    dataset_size / batch_size))`` with ``dataset_size = len(CIFAR-10 train) = 50,000`` -> 98 at batch 512."""
    if n_real_train < 1 or batch_size < 1:
        raise ValueError(f'steps_per_epoch needs a positive batch size and real set size (got {batch_size}, '
                         f'{n_real_train})')
    return -(-int(n_real_train) // int(batch_size))


class Stream:
    """Positions ``[step * n, (step + 1) * n)`` of an endless sequence of seeded permutations of range(size)."""

    def __init__(self, size: int, per_step: int, seed: int, stream: int):
        self.size, self.per_step, self.seed, self.stream = size, per_step, seed, stream
        self._cache: dict[int, np.ndarray] = {}

    def permutation(self, p: int) -> np.ndarray:
        """Pass ``p``'s order of range(size) (int64)."""
        if p not in self._cache:
            if len(self._cache) > 2:
                self._cache.pop(min(self._cache))
            rng = np.random.default_rng(np.random.SeedSequence([self.seed, self.stream, p]))
            self._cache[p] = rng.permutation(self.size)
        return self._cache[p]

    def indices(self, step: int) -> np.ndarray:
        """The dataset indices (int64 (per_step,)) of ``step``."""
        if self.per_step == 0:
            return np.zeros(0, np.int64)
        pos = np.arange(step * self.per_step, (step + 1) * self.per_step, dtype=np.int64)
        passes, within = pos // self.size, pos % self.size
        out = np.empty_like(pos)
        for p in np.unique(passes):
            sel = passes == p
            out[sel] = self.permutation(int(p))[within[sel]]
        return out


class MixedBatches:
    """The batches of a run: ``batch(step)`` -> {image uint8 (B, H, W, C), label int32 (B,), generated bool (B,)},
    the real examples first, then the generated ones (order within a batch does not change the loss).
    ``steps_per_epoch`` = ceil(N_real_train / B) (:func:`steps_per_epoch`; the generated data do not lengthen it)."""

    def __init__(self, data: AdvData, batch_size: int, generated_fraction: float, seed: int):
        n_real, n_gen = split_counts(batch_size, generated_fraction if data.gen_images is not None else 0.0)
        self.data, self.batch_size, self.n_real, self.n_gen = data, batch_size, n_real, n_gen
        self.real = Stream(len(data.real_labels), n_real, seed, REAL)
        n_generated = 0 if data.gen_labels is None else len(data.gen_labels)
        self.gen = Stream(max(n_generated, 1), n_gen, seed, GENERATED)
        self.steps_per_epoch = steps_per_epoch(batch_size, real_train_size(data))  # generated data not counted

    def indices(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(real indices (n_real,), generated indices (n_gen,)) of ``step``."""
        return self.real.indices(step), self.gen.indices(step)

    def batch(self, step: int, rows: Optional[slice] = None) -> dict[str, np.ndarray]:
        """The global batch of ``step`` (or its ``rows``, this process's share: only those images are read)."""
        r, g = self.indices(step)
        d = self.data
        positions = np.arange(self.batch_size)[rows if rows is not None else slice(None)]
        real, gen = r[positions[positions < self.n_real]], g[positions[positions >= self.n_real] - self.n_real]
        images, labels = [d.real_images[real]], [d.real_labels[real]]
        if self.n_gen:
            images.append(d.gen_images[gen])
            labels.append(d.gen_labels[gen])
        return dict(image=np.concatenate(images), label=np.concatenate(labels).astype(np.int32),
                    generated=positions >= self.n_real)

    def state(self, step: int) -> dict:
        """The JSON data-stream state saved with a checkpoint (the batches are a function of these)."""
        return dict(step=int(step), n_real=int(len(self.data.real_labels)),
                    n_generated=int(0 if self.data.gen_labels is None else len(self.data.gen_labels)),
                    n_real_per_batch=self.n_real, n_generated_per_batch=self.n_gen)


def augment(key: jax.Array, x: jax.Array, padding: int, xflip: bool) -> jax.Array:
    """The reference's 'base' augmentation on device: random crop after zero-padding ``padding`` pixels on each
    side (torchvision RandomCrop(size, padding)), then a horizontal flip with probability 1/2. x (B, H, W, C)."""
    k_y, k_x, k_f = jax.random.split(key, 3)
    b, h, w, c = x.shape
    if padding > 0:
        p = padding
        padded = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
        oy = jax.random.randint(k_y, (b,), 0, 2 * p + 1)
        ox = jax.random.randint(k_x, (b,), 0, 2 * p + 1)
        x = jax.vmap(lambda img, i, j: jax.lax.dynamic_slice(img, (i, j, 0), (h, w, c)))(padded, oy, ox)
    if xflip:
        flip = jax.random.bernoulli(k_f, 0.5, (b,))
        x = jnp.where(flip[:, None, None, None], x[:, :, ::-1], x)
    return x
