"""Shared test setup: float32 CPU JAX, deterministic keys; the environment and ports of CLI subprocess tests.

One persistent XLA compilation cache serves the whole session: the pytest process and every CLI subprocess
compile many identical programs (the tiny config's train step, sampler and loaders in a dozen modules), and a
program's cache key is its HLO and compile options, so a hit returns the executable a fresh compile would build.
It lives in a fresh temporary folder per session, so nothing carries over between runs.

The tests compile far more than they compute (a tiny UNet's value-and-grad: 18 s to compile, 0.2 s to run on
2 cores), so XLA's LLVM backend runs at optimisation level 1 here: that compile takes 9.5 s and the run the
same 0.16 s, and the FID Inception forward runs as fast as at the default level 2 (level 0 compiles in 6 s but
runs that forward 2.4x slower). Same HLO, numerics up to float reassociation, which no test depends on beyond
its stated tolerance. Users' runs keep XLA's defaults.
"""
import atexit
import os
import shutil
import socket
import tempfile

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
FAST_COMPILE = '--xla_backend_optimization_level=1'


def xla_flags(devices: int = 1) -> str:
    """XLA_FLAGS for a test process: quick compiles and, with devices > 1, that many fake CPU devices."""
    return FAST_COMPILE + (f' --xla_force_host_platform_device_count={devices}' if devices > 1 else '')


# Before anything imports jax; kept where a test's subprocess already set its own (e.g. 8 fake devices).
os.environ.setdefault('XLA_FLAGS', xla_flags())
_CACHE = os.environ.get('JAX_COMPILATION_CACHE_DIR')  # a test's subprocess importing this file shares the parent's
if not _CACHE:
    _CACHE = tempfile.mkdtemp(prefix='jaxdiff_test_xla_cache_')
    atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
_CACHE_ENV = dict(JAX_COMPILATION_CACHE_DIR=_CACHE, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
                  JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')
os.environ.update(_CACHE_ENV)  # read by jax at import, in this process and in every child


@pytest.fixture(scope='module')
def env():
    """Environment for CLI subprocesses: CPU JAX, one device, the session's compilation cache."""
    return dict(os.environ, JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='1', XLA_FLAGS=xla_flags(), **_CACHE_ENV)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for a jax.distributed coordinator)."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def run_together(commands, env, cwd, timeout=240):
    """Start every command at once (the processes of one multi-host job), wait for all; kill leftovers.
    Returns [(returncode, stdout, stderr)] in order."""
    import subprocess
    procs = [subprocess.Popen(c, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for c in commands]
    try:
        outs = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return [(p.returncode, out, err) for p, (out, err) in zip(procs, outs)]


def truncate_largest_file(step_dir) -> str:
    """Cut the biggest file under a checkpoint step dir in half (a torn write); returns its path."""
    files = [os.path.join(d, f) for d, _, fs in os.walk(step_dir) for f in fs]
    path = max(files, key=os.path.getsize)
    size = os.path.getsize(path)
    with open(path, 'r+b') as f:
        f.truncate(size // 2)
    return path


def snapshot(workdir) -> dict:
    """{relative path: size} of every file under workdir except tb/ (the event writer may touch it)."""
    out = {}
    for d, _, files in os.walk(workdir):
        for f in files:
            path = os.path.join(d, f)
            rel = os.path.relpath(path, workdir)
            if not rel.startswith('tb'):
                out[rel] = os.path.getsize(path)
    return out


def make_tiny_run(workdir: str, ema_offset: float = 0.0, step: int = 0) -> str:
    """A train.py-style run directory with one checkpoint of tests/train_tiny_config.py's random-init conditional
    net on digits (no training): config.json, dataset_info.json, checkpoints/<step>/. ``ema_offset`` is added to
    every EMA param so EMA and raw params differ."""
    import jax
    import numpy as np
    from jaxdiff.config import from_file
    from jaxdiff.data.sources import DatasetInfo
    from jaxdiff.train import checkpoint as ckpt
    from jaxdiff.train.model import build_net
    from jaxdiff.train.state import init_state
    config = from_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'train_tiny_config.py'))
    info = DatasetInfo(resolution=8, channels=1, num_classes=10, size=1797)
    state = init_state(config, build_net(config, info), info, jax.random.key(0))
    state = state.replace(ema=jax.tree.map(lambda p: p + ema_offset, state.params), step=np.int32(step))
    ckpt.check_config(workdir, config, False)
    ckpt.write_dataset_info(workdir, info)
    checkpointer = ckpt.Checkpointer(workdir, 2, use_async=False)
    checkpointer.save(state, {'process_count': 1, 'states': [{}]}, config)
    checkpointer.close()
    return workdir


@pytest.fixture(scope='module')
def run_dir(tmp_path_factory):
    """A tiny run directory (:func:`make_tiny_run`), shared by a test module."""
    return make_tiny_run(str(tmp_path_factory.mktemp('run')))
