"""Shared test setup: float32 CPU JAX, deterministic keys; the environment and ports of CLI subprocess tests.

The metrics' feature classifiers (``load_or_train``) are cached in one fresh folder per test process
($JAXDIFF_CACHE, inherited by its CLI subprocesses): the digits classifier trains once per pytest worker, never in
the user's ~/.cache, and two workers never train into one folder.

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
if not os.environ.get('JAXDIFF_CACHE'):  # a test's subprocess keeps its parent's
    os.environ['JAXDIFF_CACHE'] = tempfile.mkdtemp(prefix='jaxdiff_test_classifiers_')
    atexit.register(shutil.rmtree, os.environ['JAXDIFF_CACHE'], ignore_errors=True)


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
    """{relative path: size} of every file under workdir except tb/ (the event writer may touch it) and the
    directory lock's file (each writer records itself there: it is not data)."""
    out = {}
    for d, _, files in os.walk(workdir):
        for f in files:
            path = os.path.join(d, f)
            rel = os.path.relpath(path, workdir)
            if not rel.startswith('tb') and rel != '.lock':
                out[rel] = os.path.getsize(path)
    return out


def make_tiny_run(workdir: str, ema_offset: float = 0.0, step: int = 0) -> str:
    """A train.py-style run directory with one checkpoint of tests/tiny/denoiser.py's random-init conditional
    net on digits (no training): config.json, dataset_info.json, checkpoints/<step>/. ``ema_offset`` is added to
    every EMA param so EMA and raw params differ."""
    import jax
    import numpy as np
    from jaxdiff.config import from_file
    from jaxdiff.data.sources import DatasetInfo
    from jaxdiff.engine import checkpoint as ckpt
    from jaxdiff.nets.from_config import build_net
    from jaxdiff.tasks.denoiser import init_state
    config = from_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'tiny', 'denoiser.py'))
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


def tiny_config(name: str, base_run: str = ''):
    """tests/tiny/<name>.py's locked config; a task that fine-tunes a run (trigger) gets ``base_run``."""
    from jaxdiff.config import from_file
    config = from_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'tiny', f'{name}.py'))
    if 'base_run' in config:
        config.unlock()
        config.base_run = base_run
        config.lock()
    return config


@pytest.fixture(scope='session')
def tiny_base_run(tmp_path_factory):
    """A random-init tiny conditional denoiser run (:func:`make_tiny_run`), the base of fine-tuning tasks."""
    return make_tiny_run(str(tmp_path_factory.mktemp('tiny_base')))


@pytest.fixture(scope='session')
def tiny_runs(tmp_path_factory, tiny_base_run):
    """get(name) -> (workdir, summary) of tests/tiny/<name>.py trained once per session by the engine (tests that
    change a run copy it first)."""
    from jaxdiff.tasks import registry
    root, done = tmp_path_factory.mktemp('tiny_runs'), {}

    def get(name: str):
        if name not in done:
            workdir = str(root / name)
            done[name] = workdir, registry.run(tiny_config(name, tiny_base_run), workdir)
        return done[name]
    return get


# Tests marked `background` need one long computation (the Fashion-MNIST classifier's two epochs: ~2 minutes of
# arithmetic, no compilation to speak of). The suite is mostly single-threaded XLA compilation, so that computation
# starts in a one-thread subprocess as soon as the tests are collected, and the marked tests run last, when it is
# done: a spare core does it meanwhile. Each marked test names its job in BACKGROUND_JOBS. Under pytest-xdist
# (make test: two workers) every worker collects, so the first to claim a job's folder (shared through the
# environment) starts it and any worker's test waits for the job's exit-code file.
BACKGROUND_JOBS = {
    'fashion_mnist_classifier': ('from jaxdiff.tasks.feature_classifier import load_or_train; '
                                 "load_or_train('fashion_mnist_classifier', cache_dir={folder!r}, log=print)"),
}
_JOBS_ROOT = os.environ.get('JAXDIFF_TEST_JOBS')  # a worker (or a test's subprocess) shares the first process's
if not _JOBS_ROOT:
    _JOBS_ROOT = os.environ['JAXDIFF_TEST_JOBS'] = tempfile.mkdtemp(prefix='jaxdiff_background_')
    atexit.register(shutil.rmtree, _JOBS_ROOT, ignore_errors=True)
_WRAPPER = """import os
import traceback
try:
    exec({code!r})
    rc = 0
except BaseException:
    traceback.print_exc()
    rc = 1
open({rc_file!r} + '.tmp', 'w').write(str(rc))
os.replace({rc_file!r} + '.tmp', {rc_file!r})  # whole, for a reader in another process
"""


def pytest_configure(config):
    config.addinivalue_line('markers', 'background(job): its long computation runs in a subprocess from the start '
                                       '(tests/conftest.py BACKGROUND_JOBS); the test runs last')


def pytest_collection_modifyitems(session, config, items):
    import subprocess
    import sys
    marked = [item for item in items if item.get_closest_marker('background') and _runs(item)]
    items[:] = [item for item in items if item not in marked] + marked
    for job in {item.get_closest_marker('background').args[0] for item in marked}:
        folder = os.path.join(_JOBS_ROOT, job)
        try:
            os.mkdir(folder)  # atomic: one process of the session claims the job
        except FileExistsError:
            continue
        env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=xla_flags() + ' --xla_cpu_multi_thread_eigen=false '
                   'intra_op_parallelism_threads=1', **_CACHE_ENV)
        code = _WRAPPER.format(code=BACKGROUND_JOBS[job].format(folder=folder),
                               rc_file=os.path.join(folder, 'exit_code'))
        with open(os.path.join(folder, 'log.txt'), 'w') as log:
            proc = subprocess.Popen([sys.executable, '-c', code], env=env, stdout=log, stderr=subprocess.STDOUT,
                                    cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        with open(os.path.join(folder, 'pid'), 'w') as f:
            f.write(str(proc.pid))
        atexit.register(lambda p=proc: p.poll() is None and p.kill())


def _runs(item) -> bool:
    """Whether no skipif marker of ``item`` holds (a skipped test needs no background job)."""
    return not any(mark.args and mark.args[0] for mark in item.iter_markers('skipif'))


def _alive(folder: str) -> bool:
    """Whether the job process of ``folder`` still runs (a zombie left by another worker counts as ended)."""
    try:
        with open(os.path.join(folder, 'pid')) as f, open(f'/proc/{int(f.read())}/stat') as stat:
            return stat.read().rsplit(')', 1)[1].split()[0] != 'Z'
    except (OSError, ValueError):
        return not os.path.exists(os.path.join(folder, 'pid'))  # not started yet, or gone


@pytest.fixture
def background(request):
    """The folder where the test's background job (its `background` marker) wrote its result, once finished; the
    job's output is in the assertion message if it failed."""
    import time
    folder = os.path.join(_JOBS_ROOT, request.node.get_closest_marker('background').args[0])
    rc_file, deadline = os.path.join(folder, 'exit_code'), time.time() + 1800
    while not os.path.exists(rc_file) and time.time() < deadline and _alive(folder):
        time.sleep(1)
    with open(os.path.join(folder, 'log.txt')) as f:
        out = f.read()
    assert os.path.exists(rc_file) and open(rc_file).read() == '0', out[-3000:]
    return folder
