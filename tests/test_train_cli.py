"""``python train.py`` as users run it (subprocesses): preemption (kill -9, SIGTERM) and bitwise resume, one-line
errors with non-zero exits that never delete checkpoints, config-change refusal, restore on 8 fake devices, and two
processes training together through jax.distributed on 127.0.0.1."""
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import free_port, run_together, snapshot, truncate_largest_file, xla_flags
from jaxdiff.train import checkpoint as ckpt

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TINY = os.path.join(HERE, 'train_tiny_config.py')
LONG = ['--config.total_steps=200', '--config.checkpoint_every=50', '--config.log_every=50']


def command(workdir, *extra, config=TINY):
    return [sys.executable, os.path.join(ROOT, 'train.py'), '--config', config, '--workdir', str(workdir), *extra]


def train(env, workdir, *extra, config=TINY, timeout=300, **kwargs):
    return subprocess.run(command(workdir, *extra, config=config), env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, **kwargs)


def final(workdir):
    return ckpt.load_arrays(str(workdir))


def assert_bitwise_equal(a, b):
    import jax
    for name in ('params', 'ema', 'opt_state'):
        la, lb = jax.tree.leaves(a[name]), jax.tree.leaves(b[name])
        assert len(la) == len(lb)
        for x, y in zip(la, lb):
            np.testing.assert_array_equal(x, y, err_msg=name)
    assert int(a['step']) == int(b['step'])


def assert_one_line_error(result, code=1, match=''):
    assert result.returncode == code, (result.returncode, result.stdout[-2000:], result.stderr[-3000:])
    assert 'Traceback' not in result.stderr, result.stderr[-3000:]
    errors = [l for l in result.stderr.splitlines() if l.startswith('train.py: error:')]
    assert len(errors) == 1, result.stderr[-3000:]
    assert result.stderr.rstrip().splitlines()[-1] == errors[0]
    assert match in errors[0], errors[0]
    return errors[0]


def wait_for_checkpoint(proc, workdir, step, timeout=240):
    path = os.path.join(workdir, 'checkpoints', str(step))
    t0 = time.time()
    while not os.path.isdir(path):
        assert proc.poll() is None, 'the run ended before its first checkpoint'
        assert time.time() - t0 < timeout, 'no checkpoint in time'
        time.sleep(0.01)


@pytest.fixture(scope='module')
def reference(env, tmp_path_factory):
    """An uninterrupted 200-step run (checkpoints every 50)."""
    workdir = tmp_path_factory.mktemp('ref') / 'run'
    result = train(env, workdir, *LONG)
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'step 200/200' in result.stdout
    return workdir


@pytest.fixture(scope='module')
def short_run(env, tmp_path_factory):
    """A finished 20-step run with checkpoints 10 and 20 (copied by tests that damage it)."""
    workdir = tmp_path_factory.mktemp('short') / 'run'
    result = train(env, workdir, '--config.total_steps=20')
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir


def test_kill9_then_rerun_matches_uninterrupted_run_bitwise(env, reference, tmp_path):
    workdir = tmp_path / 'run'
    proc = subprocess.Popen(command(workdir, *LONG), env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_for_checkpoint(proc, workdir, 50)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert ckpt.Checkpointer(str(workdir), 3).steps()[-1] < 200  # it really was interrupted
    result = train(env, workdir, *LONG)
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'resuming from step' in result.stdout
    assert_bitwise_equal(final(workdir), final(reference))
    status = ckpt.verify(str(workdir))
    assert status and all(v is None for v in status.values()), status


def test_sigterm_saves_exits_zero_and_rerun_resumes(env, reference, tmp_path):
    workdir = tmp_path / 'run'
    proc = subprocess.Popen(command(workdir, *LONG), env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_for_checkpoint(proc, workdir, 50)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert 'stop signal received: saved step' in out
    stopped_at = int(out.split('saved step ')[1].split(';')[0])
    assert 50 <= stopped_at < 200 and stopped_at in ckpt.Checkpointer(str(workdir), 3).steps()
    result = train(env, workdir, *LONG)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f'resuming from step {stopped_at}' in result.stdout
    assert_bitwise_equal(final(workdir), final(reference))


def test_unknown_config_key_is_one_line_exit_2(env, tmp_path):
    result = train(env, tmp_path / 'run', '--config.model.dropuot=0.1')
    assert_one_line_error(result, code=2, match="unknown config key 'model.dropuot'")
    assert not (tmp_path / 'run').exists()


def test_missing_dataset_is_one_line_error_and_keeps_checkpoints(env, short_run, tmp_path):
    workdir = tmp_path / 'run'
    shutil.copytree(short_run, workdir)
    before = snapshot(workdir)
    result = train(env, workdir, '--config.total_steps=20', '--config.data.source=npz',
                   '--config.data.path=/nonexistent/data.npz', '--allow_config_change')
    assert_one_line_error(result, code=1, match='/nonexistent/data.npz')
    assert snapshot(workdir) == before


def test_config_change_refused_unless_allowed(env, short_run, tmp_path):
    workdir = tmp_path / 'run'
    shutil.copytree(short_run, workdir)
    before = snapshot(workdir)
    result = train(env, workdir, '--config.total_steps=30', '--config.model.dropout=0.2')
    line = assert_one_line_error(result, code=1, match='--allow_config_change')
    assert 'total_steps' in line and 'model.dropout' in line
    assert snapshot(workdir) == before
    result = train(env, workdir, '--config.total_steps=30', '--allow_config_change')
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'resuming from step 20' in result.stdout and 'step 30/30' in result.stdout


def test_corrupt_only_checkpoints_one_line_error_nothing_deleted(env, short_run, tmp_path):
    workdir = tmp_path / 'run'
    shutil.copytree(short_run, workdir)
    for step in ('10', '20'):
        truncate_largest_file(workdir / 'checkpoints' / step)
    before = snapshot(workdir)
    result = train(env, workdir, '--config.total_steps=20')
    assert_one_line_error(result, code=1, match='no usable checkpoint')
    assert snapshot(workdir) == before


def test_corrupt_latest_warns_and_resumes_from_older(env, short_run, tmp_path):
    workdir = tmp_path / 'run'
    shutil.copytree(short_run, workdir)
    truncate_largest_file(workdir / 'checkpoints' / '20')
    result = train(env, workdir, '--config.total_steps=20')
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'resuming from step 10' in result.stdout
    assert 'step 20' in result.stderr and 'corrupt_checkpoints' in result.stderr  # the warning names both
    assert len(os.listdir(workdir / 'corrupt_checkpoints')) == 1  # set aside, not deleted
    assert_bitwise_equal(final(workdir), final(short_run))


def test_restore_on_8_fake_devices(env, tmp_path):
    workdir = tmp_path / 'run'
    result = train(env, workdir, '--config.total_steps=10')
    assert result.returncode == 0, result.stderr[-3000:]
    env8 = dict(env, XLA_FLAGS=xla_flags(8))
    result = train(env8, workdir, '--config.total_steps=20', '--allow_config_change')
    assert result.returncode == 0, result.stderr[-3000:]
    assert '8 device(s)' in result.stdout and 'resuming from step 10' in result.stdout
    assert 'step 20/20' in result.stdout
    status = ckpt.verify(str(workdir))
    assert status[20] is None and status[10] is None


def max_param_diff(a, b):
    import jax
    return max(float(np.max(np.abs(x - y))) for name in ('params', 'ema')
               for x, y in zip(jax.tree.leaves(a[name]), jax.tree.leaves(b[name])))


def test_two_processes_train_together(env, short_run, tmp_path):
    workdir = tmp_path / 'run'
    port = free_port()
    results = run_together([command(workdir, '--config.total_steps=20', f'--coordinator_address=127.0.0.1:{port}',
                                    '--num_processes=2', f'--process_id={i}') for i in range(2)], env, ROOT)
    for code, _, err in results:
        assert code == 0, err[-3000:]
    outs = [(out, err) for _, out, err in results]
    sums = [[l for l in out.splitlines() if 'checksum' in l][0].split()[-1] for out, _ in outs]
    assert sums[0] == sums[1]
    assert 'step 20/20' in outs[0][0] and '2 process(es)' in outs[0][0]
    assert ckpt.verify(str(workdir)) == {10: None, 20: None}
    # Each process reads its slice of the same global batches, so two processes run the one-process run (to float
    # tolerance: the gradient mean is summed over two devices), and their checkpoint resumes on one process.
    assert max_param_diff(final(workdir), final(short_run)) < 1e-5
    resumed = tmp_path / 'resumed'
    shutil.copytree(workdir, resumed)
    shutil.rmtree(resumed / 'checkpoints' / '20')
    result = train(env, resumed, '--config.total_steps=20')
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'resumed on 1' in result.stdout + result.stderr
    assert max_param_diff(final(resumed), final(workdir)) < 1e-5
