"""Sample shards on disk: fixed seed ranges, atomic writes, the manifest, and what a rerun may skip.

Layout of ``OUT_DIR``::

    manifest.json           the plan (seeds, shard size, image shape, model, solver, transforms, labels) and,
                            once every shard exists, "complete": true with each shard's sha256
    shard-00000.npz         images uint8 (n, H, W, C), labels int32 (n,) (-1: unconditional), seeds int64 (n,)
    records/shard-00000.array_record   the same samples for grain / jaxdiff's array_record source (optional)

Shard k holds seeds ``first + k*S .. min(first + (k+1)*S, end) - 1`` in order. A shard is written to a temporary
name and renamed, so a shard file that exists is complete; a rerun checks each one's seeds and skips it.
Shard k belongs to process ``k % process_count``, so hosts never write the same file.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from typing import Any, Mapping, NamedTuple, Optional

import numpy as np

from jaxdiff import files
from jaxdiff.data.sample_shards import MANIFEST, check_complete, read_manifest, shard_names

FORMAT = 'jaxdiff-samples/1'
RECORDS_DIR = 'records'


class Plan(NamedTuple):
    """Seeds ``first .. end - 1`` cut into shards of ``shard_size``."""
    first: int
    end: int
    shard_size: int

    @property
    def num_samples(self) -> int:
        """Seeds in the plan."""
        return self.end - self.first

    @property
    def num_shards(self) -> int:
        """Shards in the plan (the last one may be short)."""
        return -(-self.num_samples // self.shard_size)

    def seeds(self, shard: int) -> np.ndarray:
        """The seeds (int64 (n,)) of shard ``shard``."""
        lo = self.first + shard * self.shard_size
        return np.arange(lo, min(lo + self.shard_size, self.end), dtype=np.int64)

    def owned(self, process_index: int, process_count: int) -> list[int]:
        """The shards process ``process_index`` writes."""
        return list(range(process_index, self.num_shards, process_count))


def parse_seeds(seeds: Optional[str], num_samples: Optional[int]) -> tuple[int, int]:
    """(first, end) from ``--seeds A-B`` (inclusive, as EDM's generate.py) and/or ``--num_samples N``.

    Only N: seeds 0..N-1. Both: N must equal B - A + 1. Seeds must lie in [0, 2^31 - 1] (they are folded into
    PRNG keys as 32-bit integers).
    """
    if seeds:
        parts = seeds.split('-')
        try:
            first, last = (int(parts[0]), int(parts[1])) if len(parts) == 2 else (int(seeds), int(seeds))
        except ValueError:
            raise ValueError(f'--seeds {seeds!r}: expected A-B, e.g. 0-49999') from None
        if last < first:
            raise ValueError(f'--seeds {seeds!r}: the range is empty (B < A)')
        if num_samples is not None and num_samples != last - first + 1:
            raise ValueError(f'--num_samples {num_samples} disagrees with --seeds {seeds} ({last - first + 1} seeds)')
    elif num_samples is not None:
        if num_samples <= 0:
            raise ValueError(f'--num_samples {num_samples} must be positive')
        first, last = 0, num_samples - 1
    else:
        raise ValueError('give --num_samples N (seeds 0..N-1) or --seeds A-B')
    if first < 0 or last > 2 ** 31 - 1:
        raise ValueError(f'seeds must lie in 0..{2 ** 31 - 1}, got {first}-{last}')
    return first, last + 1


def shard_path(out_dir: str, shard: int) -> str:
    """``OUT_DIR/shard-XXXXX.npz``."""
    return os.path.join(out_dir, f'shard-{shard:05d}.npz')


def record_path(out_dir: str, shard: int) -> str:
    """``OUT_DIR/records/shard-XXXXX.array_record``."""
    return os.path.join(out_dir, RECORDS_DIR, f'shard-{shard:05d}.array_record')


def write_shard(out_dir: str, shard: int, images: np.ndarray, labels: np.ndarray, seeds: np.ndarray,
                num_classes: int, array_record: bool = False) -> None:
    """Atomically write shard ``shard``: images uint8 (n, H, W, C), labels int32 (n,), seeds int64 (n,).

    array_record: also write ``records/shard-XXXXX.array_record`` (first, so the npz marks both complete).
    """
    if array_record:
        from jaxdiff.data.records import write_array_record
        os.makedirs(os.path.join(out_dir, RECORDS_DIR), exist_ok=True)
        stored = np.maximum(labels, 0) if num_classes else None
        files.atomic_write(record_path(out_dir, shard),
                lambda tmp: write_array_record(tmp, images, stored, num_classes=num_classes or None))

    def save(tmp: str) -> None:
        with open(tmp, 'wb') as f:
            np.savez(f, images=images.astype(np.uint8), labels=labels.astype(np.int32),
                     seeds=seeds.astype(np.int64))

    files.atomic_write(shard_path(out_dir, shard), save)


def read_shard(path: str) -> dict[str, np.ndarray]:
    """{'images', 'labels', 'seeds'} of one shard file; ValueError (one line) when it is unreadable."""
    arrays = files.read_npz(path, 'a sample shard')
    missing = [key for key in ('images', 'labels', 'seeds') if key not in arrays]
    if missing:
        raise ValueError(f'{path} is not a sample shard: it lacks {", ".join(missing)}; regenerate it with the '
                         'sample.py command of its folder')
    return {key: arrays[key] for key in ('images', 'labels', 'seeds')}


def shard_ok(out_dir: str, plan: Plan, shard: int, image_shape: tuple[int, ...], array_record: bool) -> bool:
    """Whether shard ``shard`` exists with exactly its planned seeds and image shape (and its records file)."""
    path = shard_path(out_dir, shard)
    if not os.path.exists(path):
        return False
    try:
        data = read_shard(path)
    except ValueError:
        return False
    seeds = plan.seeds(shard)
    ok = (np.array_equal(data['seeds'], seeds) and data['images'].shape == (len(seeds),) + tuple(image_shape)
          and data['images'].dtype == np.uint8 and data['labels'].shape == seeds.shape)
    return ok and (not array_record or os.path.exists(record_path(out_dir, shard)))


def set_aside(out_dir: str, shard: int) -> Optional[str]:
    """Move a damaged shard file to ``OUT_DIR/damaged/`` (kept, never deleted) so it can be rewritten."""
    path = shard_path(out_dir, shard)
    if not os.path.exists(path):
        return None
    target = os.path.join(out_dir, 'damaged')
    os.makedirs(target, exist_ok=True)
    dest = os.path.join(target, f'{os.path.basename(path)}-{int(time.time())}')
    shutil.move(path, dest)
    return dest


def remove_stale_temporaries(out_dir: str, shards: list[int]) -> None:
    """Delete temporary files an interrupted run of this process's ``shards`` left (never a finished shard)."""
    names = {os.path.basename(shard_path(out_dir, k)) for k in shards}
    names |= {os.path.basename(record_path(out_dir, k)) for k in shards}
    for folder in (out_dir, os.path.join(out_dir, RECORDS_DIR)):
        if os.path.isdir(folder):
            for name in os.listdir(folder):
                base, sep, _ = name.partition(files.TMP_MARK)
                if sep and base in names:
                    os.remove(os.path.join(folder, name))


def plan_record(plan: Plan, **fields: Any) -> dict:
    """The manifest's plan: everything that decides the bytes of the samples (not batch size or device count)."""
    return dict(format=FORMAT, num_samples=plan.num_samples, seeds=[plan.first, plan.end - 1],
                shard_size=plan.shard_size, num_shards=plan.num_shards, **fields)


def _differences(a: Any, b: Any, prefix: str = '') -> list[str]:
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        out = []
        for key in sorted(set(a) | set(b)):
            out += _differences(a.get(key), b.get(key), f'{prefix}.{key}' if prefix else key)
        return out
    return [] if a == b else [prefix]


def check_plan(out_dir: str, plan: dict) -> None:
    """Refuse an ``out_dir`` whose manifest was made with a different plan (the shards would not fit together)."""
    old = read_manifest(out_dir)
    if old is None:
        return
    old = {k: v for k, v in old.items() if k not in ('complete', 'shards')}
    diff = _differences(old, json.loads(json.dumps(plan)))
    if diff:
        raise ValueError(f'{out_dir} holds samples made with other settings ({", ".join(diff[:6])} differ); '
                         'rerun with the same flags to resume, or pick another --out')


def write_manifest(out_dir: str, plan: dict, shards: Optional[list[dict]] = None) -> str:
    """Atomically write the manifest: the plan, plus the shard list and "complete": true once all exist."""
    path = os.path.join(out_dir, MANIFEST)
    files.write_json(path, dict(plan, complete=shards is not None, shards=shards or []))
    return path


def shard_entries(out_dir: str, plan: Plan) -> list[dict]:
    """[{'file', 'seeds': [first, last], 'count', 'sha256'}] of every shard (for the final manifest)."""
    out = []
    for k in range(plan.num_shards):
        seeds = plan.seeds(k)
        path = shard_path(out_dir, k)
        out.append(dict(file=os.path.basename(path), seeds=[int(seeds[0]), int(seeds[-1])], count=len(seeds),
                        sha256=files.sha256(path)))
    return out


def write_samples(out_dir: str, images: np.ndarray, labels: np.ndarray, num_classes: int, *, first: int = 0,
                  shard_size: int = 10_000, record: Optional[dict] = None) -> dict:
    """A finished sample folder from arrays, as sample.py leaves one: images uint8 (N, H, W, C), labels int32 (N,)
    (-1: unconditional) as the shards of seeds first .. first + N - 1 and the complete manifest (the plan plus
    ``record``'s fields, e.g. {'labels': ..., 'model': ...}). Returns the manifest's plan record. For tests,
    benchmarks and samples made elsewhere."""
    os.makedirs(out_dir, exist_ok=True)
    plan = Plan(first, first + len(images), shard_size)
    for k in range(plan.num_shards):
        rows = slice(k * shard_size, (k + 1) * shard_size)
        write_shard(out_dir, k, images[rows], np.asarray(labels)[rows], plan.seeds(k), num_classes)
    plan_dict = plan_record(plan, image_shape=list(images.shape[1:]), **(record or {}))
    write_manifest(out_dir, plan_dict, shard_entries(out_dir, plan))
    return plan_dict


def load_samples(folder: str, allow_incomplete: bool = False) -> dict[str, np.ndarray]:
    """Every shard of a sample folder concatenated in seed order: {'images', 'labels', 'seeds'}.

    Raises FileNotFoundError for a missing folder, ValueError for a folder without shards and, unless
    ``allow_incomplete``, for one that sample.py did not finish (:func:`check_complete`).
    """
    if not allow_incomplete and os.path.isdir(folder):
        check_complete(folder)
    parts = [read_shard(os.path.join(folder, n)) for n in shard_names(folder)]
    shapes = {p['images'].shape[1:] for p in parts}
    if len(shapes) > 1:
        raise ValueError(f'{folder}: shards hold images of different sizes {sorted(shapes)}')
    return {key: np.concatenate([p[key] for p in parts]) for key in ('images', 'labels', 'seeds')}
