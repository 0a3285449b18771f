"""Shared test setup: float32 CPU JAX, deterministic keys; the environment and ports of CLI subprocess tests."""
import os
import socket

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")


@pytest.fixture(scope='module')
def env(tmp_path_factory):
    """Environment for CLI subprocesses: CPU JAX, one device, and a persistent compilation cache shared by the
    module's subprocesses (they compile the same programs)."""
    e = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='1',
             JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp('jax_cache')),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0', JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')
    e.pop('XLA_FLAGS', None)
    return e


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
