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
