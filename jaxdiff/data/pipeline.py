"""The grain input pipeline: the global batch of step s is a function of (seed, s, data) alone; each host loads
its slice of it.

Order (MapDataset): record indices 0..N-1 [+ N..2N-1 for EDM's ``--xflip``: the mirrored images] -> ``shuffle(seed)``
(grain reshuffles every epoch with seed + epoch) -> ``repeat()`` (endless) -> ``batch(B)`` (global batches of
indices; they may straddle epochs, as with EDM's InfiniteSampler) -> this host's slice ``[p * B / P : (p + 1) * B /
P]`` of each -> load those records -> uint8 to float32 in [-1, 1] -> ``to_iter_dataset()`` [-> ``mp_prefetch`` with
``worker_count`` processes]. So 1 process and P processes train on the same global batches, and the iterator's
``get_state()`` (a small JSON dict: how many global batches were taken) resumes a run on any process count.
Latent folders (``data.source = 'latents'``, :mod:`jaxdiff.data.latents`) follow the same order; their records are
float latents, normalised (and, for stored posterior moments, sampled) instead of the uint8 conversion.
"""
from __future__ import annotations

from typing import Any

import grain
import numpy as np

from jaxdiff.data.gmm2d import make_gmm2d_source
from jaxdiff.data.latents import LatentBatch, make_latent_source
from jaxdiff.data.sources import DatasetInfo, make_source


def flip_x(item: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """dict(image=(H, W, C), label) -> the same with the image mirrored left-right."""
    return dict(image=item['image'][:, ::-1], label=item['label'])


def to_float(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """dict(image=uint8 (B, H, W, C), label=(B,)) -> image float32 in [-1, 1], label int32."""
    image = batch['image'].astype(np.float32) / np.float32(127.5) - np.float32(1)
    return dict(image=image, label=batch['label'].astype(np.int32))


def _mark_flags_parsed() -> None:
    """grain's worker processes read absl flags; mark them parsed when no absl app did."""
    from absl import flags  # pylint: disable=import-outside-toplevel
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


class HostSlice:
    """Loads this host's slice of a global batch of record indices: indices (B,) -> dict(image=uint8 (b, H, W, C),
    label (b,), and any other per-record array stacked alike), b = B / process_count; an index i >= ``size`` is
    record i - size mirrored (xflip)."""

    def __init__(self, source: Any, size: int, process_index: int, process_count: int):
        self.source, self.size, self.index, self.count = source, size, process_index, process_count

    def __call__(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        local = len(indices) // self.count
        items = [self._item(int(i)) for i in indices[self.index * local:(self.index + 1) * local]]
        return {key: np.stack([x[key] for x in items]) for key in items[0]}

    def _item(self, i: int) -> dict[str, np.ndarray]:
        return self.source[i] if i < self.size else flip_x(self.source[i - self.size])


def host_batches(source: Any, *, global_batch_size: int, seed: int, process_index: int = 0, process_count: int = 1,
                 xflip: bool = False) -> grain.MapDataset:
    """The endless MapDataset of this host's slices of the global batches: dict(image=(b, H, W, C) as the source
    stores it, label=(b,)), b = global_batch_size / process_count (module docstring). Raises ValueError for a
    batch the processes cannot split or a process index out of range."""
    if global_batch_size <= 0 or global_batch_size % process_count:
        raise ValueError(f'batch_size={global_batch_size} must be a positive multiple of the process count '
                         f'({process_count}); change --config.batch_size')
    if not 0 <= process_index < process_count:
        raise ValueError(f'process_index={process_index} is outside 0..{process_count - 1}')
    size = len(source)
    indices = grain.MapDataset.range((2 if xflip else 1) * size).shuffle(seed).repeat()
    batches = indices.batch(global_batch_size, drop_remainder=True)
    return batches.map(HostSlice(source, size, process_index, process_count))


def data_seed(config: Any, seed: int) -> int:
    """The shuffle seed: ``config.shuffle_seed``, or the run's ``seed`` when it is -1 (mod 2**32)."""
    return (seed if config.shuffle_seed < 0 else config.shuffle_seed) % 2**32


def make_iterator(config: Any, *, global_batch_size: int, seed: int, process_index: int = 0,
                  process_count: int = 1) -> tuple[grain.DatasetIterator, DatasetInfo]:
    """``config.data`` -> (endless iterator of this host's share of each global batch, DatasetInfo).

    Yields dict(image=float32 (global_batch_size // process_count, R, R, C) in [-1, 1] (gmm2d: (.., 1, 1, 2) points;
    latents: normalised (.., h, h, c) latents), label=int32 (same,)).
    The global batches depend only on the seed (``config.shuffle_seed``, or ``seed`` when it is -1) and the data;
    the host takes its slice. ``iterator.get_state()`` / ``set_state(state)`` save and resume the position (JSON-
    serialisable, the same on every host, valid for any process count).
    With ``config.worker_count > 0`` the caller's ``__main__`` must be guarded (grain starts processes).
    """
    if config.source == 'gmm2d':  # float points in the mixture's units: no conversion, no flips
        source, info = make_gmm2d_source(data_seed(config, seed))
        dataset = host_batches(source, global_batch_size=global_batch_size, seed=data_seed(config, seed),
                               process_index=process_index, process_count=process_count)
    elif config.source == 'latents':
        source, info, space = make_latent_source(config)
        dataset = host_batches(source, global_batch_size=global_batch_size, seed=data_seed(config, seed),
                               process_index=process_index, process_count=process_count)
        dataset = dataset.random_map(LatentBatch(space, process_index, process_count, info.num_classes > 0),
                                     seed=data_seed(config, seed))
    else:
        source, info = make_source(config)
        dataset = host_batches(source, global_batch_size=global_batch_size, seed=data_seed(config, seed),
                               process_index=process_index, process_count=process_count,
                               xflip=config.xflip).map(to_float)
    iter_dataset = dataset.to_iter_dataset()
    if config.worker_count > 0:
        _mark_flags_parsed()
        iter_dataset = iter_dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.worker_count))
    return iter(iter_dataset), info


class IteratorBatches:
    """A grain iterator of :func:`make_iterator` as the engine's ``Batches``: ``batch(step)`` is the next batch
    (the engine asks for steps in order), the state is the iterator's (the global batches taken: the same on every
    host, valid for any process count)."""

    def __init__(self, iterator):
        self.iterator = iterator

    def batch(self, step: int) -> dict[str, np.ndarray]:
        return next(self.iterator)

    def get_state(self) -> dict:
        return self.iterator.get_state()

    def set_state(self, state: dict) -> str:
        self.iterator.set_state(state)
        return ''
