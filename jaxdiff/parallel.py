"""Devices, meshes and shardings: one 2-D mesh ('data', 'fsdp') over all devices of all processes.

- The global batch is split over both axes (every device holds ``B_global / device_count`` examples).
- Parameters, EMA and optimizer state are sharded over 'fsdp' (each array on its largest axis divisible by the
  fsdp size) and replicated over 'data'; with fsdp = 1 they are replicated everywhere (plain data parallelism).
- Multi-host: :func:`initialize` starts ``jax.distributed``; each process feeds its own slice of the batch and
  :func:`host_to_global` assembles the global arrays.
"""
from __future__ import annotations

import hashlib

import os
from typing import Mapping, Optional, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

AXES = ('data', 'fsdp')


def multiprocess_env(environ: Mapping[str, str]) -> bool:
    """Whether the environment describes a multi-process launch that ``jax.distributed`` can auto-detect.

    True for a SLURM job step with more than one task, a multi-worker Cloud TPU slice, or an explicit
    ``JAX_COORDINATOR_ADDRESS``.
    """
    if environ.get('JAX_COORDINATOR_ADDRESS'):
        return True
    if int(environ.get('SLURM_NTASKS', environ.get('SLURM_NPROCS', '1')) or 1) > 1:
        return True
    workers = [w for w in environ.get('TPU_WORKER_HOSTNAMES', '').split(',') if w]
    return len(workers) > 1 or bool(environ.get('MEGASCALE_COORDINATOR_ADDRESS'))


def initialize(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None) -> None:
    """Start ``jax.distributed`` for a multi-process run; a no-op for a single process.

    With any argument given, all three are passed on (``coordinator_address`` 'HOST:PORT'). With none, the
    cluster is auto-detected (TPU pod, SLURM) only when :func:`multiprocess_env` says the environment asks for
    it. Calling it again after a successful start does nothing.
    """
    if jax.distributed.is_initialized():
        return
    explicit = (coordinator_address, num_processes, process_id)
    if any(a is not None for a in explicit):
        if coordinator_address is None or num_processes is None or process_id is None:
            raise ValueError('multi-process training needs all of --coordinator_address HOST:PORT, '
                             f'--num_processes N and --process_id I (got {explicit}).')
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                   process_id=process_id)
    elif multiprocess_env(os.environ):
        jax.distributed.initialize()


def make_mesh(fsdp: int = 1, devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """Mesh with axes ('data', 'fsdp') of shape (n // fsdp, fsdp) over ``devices`` (default: all, all hosts).

    Axes are AxisType.Auto: the jitted step states input/output shardings and XLA propagates the rest.
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if fsdp < 1 or n % fsdp:
        raise ValueError(f'parallel.fsdp={fsdp} must be a positive divisor of the device count {n} '
                         f'(choose one of {[d for d in range(1, n + 1) if n % d == 0]}).')
    return jax.make_mesh((n // fsdp, fsdp), AXES, axis_types=(AxisType.Auto,) * 2, devices=devices)


def replicated(mesh: Mesh) -> NamedSharding:
    """The sharding of an array held whole on every device."""
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over ('data', 'fsdp'); other axes whole. For (B, ...) arrays of any rank."""
    return NamedSharding(mesh, P(AXES))


def fsdp_spec(shape: Sequence[int], fsdp: int) -> P:
    """PartitionSpec putting 'fsdp' on the largest axis of ``shape`` divisible by ``fsdp``; P() if none or fsdp=1.

    Ties go to the earliest axis.
    """
    if fsdp > 1:
        axes = [i for i, d in enumerate(shape) if d % fsdp == 0]
        if axes:
            axis = max(axes, key=lambda i: (shape[i], -i))
            return P(*([None] * axis + ['fsdp']))
    return P()


def fsdp_shardings(mesh: Mesh, tree) -> object:
    """NamedSharding per array leaf of ``tree`` (arrays or ShapeDtypeStructs), as :func:`fsdp_spec` picks."""
    fsdp = mesh.shape['fsdp']
    return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(np.shape(x), fsdp)), tree)


def host_rows(global_batch: int) -> slice:
    """This process's rows [p B / P, (p + 1) B / P) of a global batch of B rows (P processes, p this one's index):
    the rows every step-indexed data source loads here."""
    local = global_batch // jax.process_count()
    return slice(jax.process_index() * local, (jax.process_index() + 1) * local)


def host_to_global(local_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assemble each process's local batch (dict of (B_local, ...) numpy) into global arrays (B_global, ...).

    B_global = B_local * process_count; process p's rows are rows [p * B_local, (p + 1) * B_local) of the global
    batch, sharded as :func:`batch_sharding`. B_local must be divisible by the process's device count.
    """
    sharding = batch_sharding(mesh)
    local_devices = len(mesh.local_devices)
    out = {}
    for name, value in local_batch.items():
        value = np.asarray(value)
        if value.ndim == 0 or value.shape[0] % local_devices:
            raise ValueError(f'batch[{name!r}] has shape {value.shape}: its leading (batch) axis must be divisible '
                             f'by the {local_devices} local devices; pick batch_size divisible by '
                             f'{local_devices * jax.process_count()}.')
        global_shape = (value.shape[0] * jax.process_count(),) + value.shape[1:]
        out[name] = jax.make_array_from_process_local_data(sharding, value, global_shape)
    return out


def global_to_host(tree) -> object:
    """Fetch every leaf of a pytree of (possibly multi-host sharded) jax Arrays as full numpy arrays."""
    from jax.experimental import multihost_utils
    return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


def local_checksum(tree) -> str:
    """sha256 (16 hex digits) of this process's first addressable shard of every leaf: equal on all processes
    when the leaves are replicated (the multi-host consistency check printed at the end of a run)."""
    digest = hashlib.sha256()
    for leaf in jax.tree.leaves(tree):
        digest.update(np.ascontiguousarray(np.asarray(leaf.addressable_shards[0].data)).tobytes())
    return digest.hexdigest()[:16]
