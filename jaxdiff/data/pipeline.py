"""The grain input pipeline: host shard -> per-epoch shuffle -> repeat -> batch -> [-1, 1] floats.

Order (MapDataset): source [+ x-flipped copies, EDM's ``--xflip``: indices N..2N-1 are the mirrored images] ->
``[process_index::process_count]`` (hosts read disjoint shards that together cover the data) -> ``shuffle(seed)``
(grain reshuffles every epoch with seed + epoch) -> ``repeat()`` (endless) -> ``batch(B // process_count)`` ->
uint8 to float32 in [-1, 1] -> ``to_iter_dataset()`` [-> ``mp_prefetch`` with ``worker_count`` processes].
Batches may straddle epochs, as with EDM's InfiniteSampler. The iterator's ``get_state()`` is a small JSON dict.
"""
from __future__ import annotations

from typing import Any

import grain
import numpy as np

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


def make_dataset(source: Any, *, xflip: bool, local_batch_size: int, seed: int, process_index: int,
                 process_count: int) -> grain.MapDataset:
    """The endless MapDataset of this host's batches: dict(image=float32 (b, H, W, C), label=int32 (b,))."""
    dataset = grain.MapDataset.source(source)
    if xflip:
        dataset = grain.MapDataset.concatenate([dataset, dataset.map(flip_x)])
    dataset = dataset[process_index::process_count].shuffle(seed).repeat()
    return dataset.batch(local_batch_size, drop_remainder=True).map(to_float)


def make_iterator(config: Any, *, global_batch_size: int, seed: int, process_index: int = 0,
                  process_count: int = 1) -> tuple[grain.DatasetIterator, DatasetInfo]:
    """``config.data`` -> (endless iterator of this host's share of each global batch, DatasetInfo).

    Yields dict(image=float32 (global_batch_size // process_count, R, R, C) in [-1, 1], label=int32 (same,)).
    The order depends only on the seed (``config.shuffle_seed``, or ``seed`` when it is -1) and the host;
    ``iterator.get_state()`` / ``set_state(state)`` save and resume it (the state is JSON-serialisable).
    With ``config.worker_count > 0`` the caller's ``__main__`` must be guarded (grain starts processes).
    """
    if global_batch_size <= 0 or global_batch_size % process_count:
        raise ValueError(f'batch_size={global_batch_size} must be a positive multiple of the process count '
                         f'({process_count}); change --config.batch_size')
    if not 0 <= process_index < process_count:
        raise ValueError(f'process_index={process_index} is outside 0..{process_count - 1}')
    source, info = make_source(config)
    data_seed = (seed if config.shuffle_seed < 0 else config.shuffle_seed) % 2**32
    dataset = make_dataset(source, xflip=config.xflip, local_batch_size=global_batch_size // process_count,
                           seed=data_seed, process_index=process_index, process_count=process_count)
    iter_dataset = dataset.to_iter_dataset()
    if config.worker_count > 0:
        _mark_flags_parsed()
        iter_dataset = iter_dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.worker_count))
    return iter(iter_dataset), info
