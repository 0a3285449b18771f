"""Sampling at scale: every process generates the shards it owns, skipping the complete ones, in full batches.

``sample(...)`` is what sample.py runs. Work is this process's incomplete shards' seeds in one stream, cut into
batches of ``batch_size`` (the last padded by repeating its last seed, the extra rows dropped), so every batch
but one is full whatever the shard size. The next batch is dispatched before the previous one is copied to the
host and written, which keeps the devices busy while files are written.
"""
from __future__ import annotations

import os
from typing import Callable, Optional, Sequence

import jax
import numpy as np

from jaxdiff.cli import UsageError
from jaxdiff.dir_lock import DirectoryLock
from jaxdiff.progress import Progress
from jaxdiff.sampling import generate as gen
from jaxdiff.sampling import options, shards
from jaxdiff.sampling.model import Model


def _batches(seeds: np.ndarray, batch_size: int):
    """(seeds int32 (batch_size,), number of real rows) over ``seeds``, the last batch padded."""
    for lo in range(0, len(seeds), batch_size):
        chunk = seeds[lo:lo + batch_size]
        real = len(chunk)
        if real < batch_size:
            chunk = np.concatenate([chunk, np.full(batch_size - real, chunk[-1], chunk.dtype)])
        yield chunk.astype(np.int32), real


def sample(model: Model, out_dir: str, *, first: int, end: int, batch_size: int = 64, shard_size: int = 10_000,
           solver: str = 'edm', solver_options: Optional[dict] = None, transforms: Sequence[str] = (),
           labels: Optional[gen.Labels] = None, array_record: bool = False, log: Callable[[str], None] = print,
           progress_every_s: float = 10.0) -> dict:
    """Write seeds ``first .. end - 1`` of ``model`` as shards in ``out_dir`` (resuming); returns the manifest plan.

    batch_size: per process, a multiple of its local device count. The manifest gets "complete": true once
    every shard exists (process 0 writes it after all processes finished). Raises :class:`jaxdiff.cli.UsageError`
    for settings the model cannot take, ValueError for an out_dir holding samples made with other settings.
    """
    labels = labels or gen.make_labels(model.label_dim)
    devices = jax.local_device_count()
    if batch_size <= 0 or batch_size % devices:
        raise UsageError(f'--batch_size {batch_size} must be a positive multiple of the {devices} local devices')
    if shard_size <= 0:
        raise UsageError(f'--shard_size {shard_size} must be positive')
    resolved = options.resolve_solver(solver, solver_options or {}, model.sigma_range)
    image_shape = (model.resolution, model.resolution, model.channels)
    transform, described = options.make_transform(transforms, model.label_dim, solver, resolved, model.sigma_range,
                                                  model.solver_shape)
    plan = shards.Plan(first, end, shard_size)
    record = shards.plan_record(plan, image_shape=list(image_shape), labels=labels.describe(),
                                model=model.description, solver=dict(name=solver, **_jsonable(resolved)),
                                transforms=described, base_seed=gen.BASE_SEED, array_record=array_record)
    primary = jax.process_index() == 0
    with DirectoryLock(out_dir, 'sample.py', enabled=primary):  # one writer per sample folder
        shards.check_plan(out_dir, record)
        if primary and shards.read_manifest(out_dir) is None:
            shards.write_manifest(out_dir, record)

        owned = plan.owned(jax.process_index(), jax.process_count())
        shards.remove_stale_temporaries(out_dir, owned)
        todo = []
        for k in owned:
            if shards.shard_ok(out_dir, plan, k, image_shape, array_record):
                continue
            moved = shards.set_aside(out_dir, k)  # present but wrong: keep it aside, never delete it
            if moved:
                log(f'warning: {shards.shard_path(out_dir, k)} was damaged; moved to {moved} and regenerating it')
            todo.append(k)
        prefix = f'[process {jax.process_index()}/{jax.process_count()}] ' if jax.process_count() > 1 else ''
        total = sum(len(plan.seeds(k)) for k in todo)
        log(f'{prefix}{len(owned) - len(todo)} of {len(owned)} shard(s) already complete; {total:,} samples to go '
            f'({solver}, batch {batch_size} on {devices} device(s))')
        if todo:
            _generate_shards(model, out_dir, plan, todo, batch_size, resolved, solver, transform, labels,
                             array_record, Progress(f'{prefix}sampled', total, log, progress_every_s))
        _finish(out_dir, plan, record, primary)
        return record


def _generate_shards(model, out_dir, plan, todo, batch_size, resolved, solver, transform, labels, array_record,
                     progress) -> None:
    mesh = gen.local_mesh()
    base = model.denoiser
    denoiser = base if transform is None else (lambda v: transform(base(v)))
    fn = gen.make_generator(denoiser, options.make_solver(solver, resolved), labels, model.solver_shape, mesh,
                            model.decode)
    variables = jax.device_put(model.variables, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    stream = np.concatenate([plan.seeds(k) for k in todo])
    # Pending rows of the shard being filled: shards of `todo` fill in order, as the stream runs through them.
    queue = list(todo)
    images, labels_out = [], []
    filled = 0

    def consume(result, real: int) -> None:
        nonlocal filled
        imgs, labs = (np.asarray(a)[:real] for a in jax.device_get(result))
        while len(imgs):
            shard = queue[0]
            need = len(plan.seeds(shard)) - filled
            images.append(imgs[:need])
            labels_out.append(labs[:need])
            taken = len(imgs[:need])
            filled += taken
            imgs, labs = imgs[taken:], labs[taken:]
            if filled == len(plan.seeds(shard)):
                shards.write_shard(out_dir, shard, np.concatenate(images), np.concatenate(labels_out),
                                   plan.seeds(shard), labels.num_classes, array_record)
                images.clear()
                labels_out.clear()
                filled = 0
                queue.pop(0)
            progress.add(taken)

    pending = None
    for seeds, real in _batches(stream, batch_size):
        result = fn(variables, seeds)
        if pending is not None:
            consume(*pending)
        pending = (result, real)
    consume(*pending)


def _finish(out_dir: str, plan: shards.Plan, record: dict, primary: bool) -> None:
    """After every process is done, process 0 checks all shards and marks the manifest complete."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices('jaxdiff_sampling_done')
    if primary:
        missing = [k for k in range(plan.num_shards) if not os.path.exists(shards.shard_path(out_dir, k))]
        if missing:
            raise RuntimeError(f'{len(missing)} shard(s) are missing after sampling (e.g. '
                               f'{shards.shard_path(out_dir, missing[0])}); rerun the same command')
        shards.write_manifest(out_dir, record, shards.shard_entries(out_dir, plan))


def _jsonable(d: dict) -> dict:
    """Option values as JSON can hold them (inf -> 'inf', tuples -> lists)."""
    out = {}
    for key, value in d.items():
        if isinstance(value, float) and not np.isfinite(value):
            value = str(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[key] = value
    return out
