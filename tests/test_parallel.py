"""Meshes, shardings, host <-> global arrays, and the training step on 8 fake CPU devices matching 1 device."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxdiff import parallel

sys.path.insert(0, os.path.dirname(__file__))
from conftest import xla_flags  # noqa: E402
from test_train_step import batches, flat, run_steps, tiny_config  # noqa: E402

SMALL = (1,)  # one resolution level: the sharding logic is the same, and 8-device compiles stay quick
EIGHT_DEVICES = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=xla_flags(8))


def test_make_mesh_rejects_bad_fsdp():
    n = jax.device_count()
    for bad in (0, n + 1, -2):
        with pytest.raises(ValueError, match='parallel.fsdp'):
            parallel.make_mesh(bad)
    assert parallel.make_mesh(1).shape == {'data': n, 'fsdp': 1}


def test_fsdp_spec_picks_largest_divisible_axis():
    assert parallel.fsdp_spec((3, 3, 16, 32), 8) == P(None, None, None, 'fsdp')
    assert parallel.fsdp_spec((64, 24), 8) == P('fsdp')
    assert parallel.fsdp_spec((6, 10), 4) == P()
    assert parallel.fsdp_spec((), 2) == P()
    assert parallel.fsdp_spec((64, 24), 1) == P()


def test_host_to_global_round_trips():
    mesh = parallel.make_mesh(1)
    n = jax.device_count()
    local = dict(image=np.random.default_rng(0).normal(size=(2 * n, 4, 4, 3)).astype(np.float32),
                 label=np.arange(2 * n, dtype=np.int32))
    glob = parallel.host_to_global(local, mesh)
    assert glob['image'].sharding == parallel.batch_sharding(mesh)
    back = parallel.global_to_host(glob)
    for k in local:
        assert back[k].dtype == local[k].dtype
        np.testing.assert_array_equal(back[k], local[k])


def test_host_to_global_rejects_indivisible_batch():
    mesh = parallel.make_mesh(1)
    if len(mesh.local_devices) == 1:
        pytest.skip('every batch divides one device')
    with pytest.raises(ValueError, match='divisible'):
        parallel.host_to_global(dict(image=np.zeros((len(mesh.local_devices) + 1, 2))), mesh)


def test_multiprocess_env_detection():
    assert not parallel.multiprocess_env({})
    assert not parallel.multiprocess_env({'SLURM_NTASKS': '1', 'SLURM_JOB_ID': '7'})
    assert parallel.multiprocess_env({'SLURM_NTASKS': '4'})
    assert parallel.multiprocess_env({'TPU_WORKER_HOSTNAMES': 'a,b'})
    assert not parallel.multiprocess_env({'TPU_WORKER_HOSTNAMES': 'a'})
    assert parallel.multiprocess_env({'JAX_COORDINATOR_ADDRESS': '10.0.0.1:1234'})


def test_initialize_single_process_is_noop_and_partial_args_fail(monkeypatch):
    for var in ('JAX_COORDINATOR_ADDRESS', 'SLURM_NTASKS', 'SLURM_NPROCS', 'TPU_WORKER_HOSTNAMES',
                'MEGASCALE_COORDINATOR_ADDRESS'):
        monkeypatch.delenv(var, raising=False)
    parallel.initialize()
    assert jax.process_count() == 1 and not jax.distributed.is_initialized()
    with pytest.raises(ValueError, match='--num_processes'):
        parallel.initialize(coordinator_address='127.0.0.1:1234')


def _eight_device_main(out_path):
    """Subprocess body: the tiny run on meshes (data 4, fsdp 2) and (fsdp 8); params, EMA, specs saved. (Data
    parallelism alone, (data 8), is every task's 8-device run in test_tasks.py.)"""
    assert jax.device_count() == 8, jax.devices()
    specs = {}
    for fsdp in (2, 8):
        run = run_steps(tiny_config(SMALL), parallel.make_mesh(fsdp), batches())
        state = run['state']
        specs[fsdp] = sorted({str(x.sharding.spec) for x in jax.tree.leaves(state.params)})
        np.savez(f'{out_path}.fsdp{fsdp}.npz', losses=[m['loss'] for m in run['metrics']],
                 **{'params' + k: v for k, v in flat(state.params).items()},
                 **{'ema' + k: v for k, v in flat(state.ema).items()})
    with open(out_path, 'w') as f:
        json.dump(specs, f)


def test_eight_devices_match_one_device(tmp_path):
    """Same config, seed and global batch: 1 device (this process) vs 8 fake CPU devices (a subprocess)."""
    out = tmp_path / 'specs.json'
    code = (f'import sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); import test_parallel as t; '
            f't._eight_device_main({str(out)!r})')
    proc = subprocess.Popen([sys.executable, '-c', code], env=EIGHT_DEVICES, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    one = run_steps(tiny_config(SMALL), parallel.make_mesh(1, devices=jax.devices()[:1]), batches())
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, log[-3000:]
    want = dict({'params' + k: v for k, v in flat(one['state'].params).items()},
                **{'ema' + k: v for k, v in flat(one['state'].ema).items()})
    for fsdp in (2, 8):
        got = np.load(f'{out}.fsdp{fsdp}.npz')
        np.testing.assert_allclose(got['losses'], [m['loss'] for m in one['metrics']], rtol=1e-5)
        diff = max(float(np.max(np.abs(got[k] - v))) for k, v in want.items())
        print(f'fsdp={fsdp}: max |param or ema diff| vs 1 device = {diff:.3g}')
        assert diff < 1e-5
    specs = json.loads(out.read_text())
    assert str(P(None, None, None, 'fsdp')) in specs['8'] and str(P(None, None, None, 'fsdp')) in specs['2']
