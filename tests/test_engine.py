"""The engine's promises, tested once against a fake task (tests/fake_task.py) that compiles in a second: bitwise
resume after kill -9, a clean stop on SIGTERM, 8 devices == 1 device, 2 processes == 1 process (the same global
batches, identical params on both), a 2-process checkpoint resumed on 1 process, the NaN policy, an in-process crash
resumed bitwise, and the metric accumulation (clu) matching the per-step metrics."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import fake_task
from conftest import free_port, run_together, xla_flags
from jaxdiff import parallel
from jaxdiff.dir_lock import DirectoryLockedError
from jaxdiff.engine import checkpoint as ckpt
from jaxdiff.engine import log as logs
from jaxdiff.engine import loop

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, 'fake_task.py')
SLOW = ('--sleep', '0.05')  # ~20 steps/s: a signal lands mid-run (the rerun sleeps too: the same config)


def command(workdir, *extra):
    return [sys.executable, SCRIPT, str(workdir), *extra]


def summary_of(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def arrays(workdir) -> dict:
    return ckpt.load_arrays(str(workdir))


def assert_bitwise(a: dict, b: dict) -> None:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb) and jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(x, y)


def max_diff(a: dict, b: dict) -> float:
    return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
               for x, y in zip(jax.tree.leaves((a['params'], a['ema'])), jax.tree.leaves((b['params'], b['ema']))))


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
    """An uninterrupted 30-step run in this process (checkpoints every 5)."""
    workdir = tmp_path_factory.mktemp('engine') / 'ref'
    summary = loop.run(fake_task.TASK, fake_task.config_of(), str(workdir))
    assert summary['step'] == 30 and summary['resumed_from'] is None
    return workdir


def wait_for_checkpoint(proc, workdir, step, timeout=120):
    path = os.path.join(workdir, 'checkpoints', str(step))
    t0 = time.time()
    while not os.path.isdir(path):
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.time() - t0 < timeout, 'no checkpoint in time'
        time.sleep(0.01)


def interrupt(env, workdir, sig, while_running=lambda proc: None):
    """Start the fake run (slowed to ~20 steps/s), call ``while_running(proc)`` and send ``sig`` once checkpoint 10
    exists; (returncode, stdout)."""
    proc = subprocess.Popen(command(workdir, *SLOW), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_for_checkpoint(proc, workdir, 10)
        while_running(proc)
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, out


def second_writer_is_refused(workdir):
    """While the run in ``workdir`` lives, another run there is refused in one line naming its pid and host, before
    touching anything."""
    def check(proc):
        config_before = (workdir / 'config.json').read_bytes()
        with pytest.raises(DirectoryLockedError, match=rf'in use by training \(fake\) \(pid {proc.pid} on host '
                                                       rf'{socket.gethostname()}, since '):
            loop.run(fake_task.TASK, fake_task.config_of(sleep=0.05), str(workdir))
        assert (workdir / 'config.json').read_bytes() == config_before
        assert (workdir / 'checkpoints' / '10').is_dir()
    return check


def test_kill9_then_rerun_matches_uninterrupted_run_bitwise(env, reference, tmp_path):
    """Also: the live run's directory lock refuses a second writer, and kill -9 leaves no stale lock behind."""
    code, _ = interrupt(env, tmp_path / 'run', signal.SIGKILL, second_writer_is_refused(tmp_path / 'run'))
    assert code == -signal.SIGKILL
    assert ckpt.Checkpointer(str(tmp_path / 'run'), 3).steps()[-1] < 30  # it really was interrupted
    result = subprocess.run(command(tmp_path / 'run', *SLOW), env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert summary_of(result.stdout)['resumed_from'] >= 10
    assert_bitwise(arrays(tmp_path / 'run'), arrays(reference))


@pytest.mark.parametrize('sig, exit_code', [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_stop_signal_saves_exits_128_plus_signal_and_rerun_resumes(env, reference, tmp_path, sig, exit_code):
    """The exit code says the run is not finished (so `train.py ... && sample.py ...` stops), the save is there."""
    code, out = interrupt(env, tmp_path / 'run', sig)
    assert code == exit_code and 'stop signal received: saved step' in out
    summary = summary_of(out)
    assert summary['stopped_by_signal'] and 10 <= summary['step'] < 30
    assert summary['step'] in ckpt.Checkpointer(str(tmp_path / 'run'), 3).steps()
    result = subprocess.run(command(tmp_path / 'run', *SLOW), env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and summary_of(result.stdout)['resumed_from'] == summary['step']
    assert_bitwise(arrays(tmp_path / 'run'), arrays(reference))


def test_in_process_crash_resumes_bitwise(reference, tmp_path):
    with pytest.raises(fake_task.Crash):
        loop.run(fake_task.crashing(fake_task.TASK, 12), fake_task.config_of(), str(tmp_path / 'run'))
    assert ckpt.Checkpointer(str(tmp_path / 'run'), 3).steps()[-1] == 10
    summary = loop.run(fake_task.TASK, fake_task.config_of(), str(tmp_path / 'run'))
    assert summary['resumed_from'] == 10 and summary['step'] == 30
    assert_bitwise(arrays(tmp_path / 'run'), arrays(reference))


def test_eight_devices_match_one_and_restore_across_device_counts(env, reference, tmp_path):
    env8 = dict(env, XLA_FLAGS=xla_flags(8))
    result = subprocess.run(command(tmp_path / 'run8'), env=env8, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert '8 device(s)' in result.stdout
    assert max_diff(arrays(tmp_path / 'run8'), arrays(reference)) < 1e-6
    # An 8-device checkpoint resumes on 1 device, and a 1-device one on 8.
    for source, devices in ((tmp_path / 'run8', 1), (reference, 8)):
        resumed = tmp_path / f'resumed_on_{devices}'
        shutil.copytree(source, resumed)
        for step in (15, 20, 25, 30):
            shutil.rmtree(resumed / 'checkpoints' / str(step))
        if devices == 1:
            assert loop.run(fake_task.TASK, fake_task.config_of(), str(resumed))['resumed_from'] == 10
        else:
            result = subprocess.run(command(resumed), env=env8, capture_output=True, text=True, timeout=120)
            assert result.returncode == 0 and summary_of(result.stdout)['resumed_from'] == 10, result.stderr[-2000:]
        assert max_diff(arrays(resumed), arrays(reference)) < 1e-6


def test_two_processes_match_one_and_their_checkpoint_resumes_on_one(env, reference, tmp_path):
    workdir = tmp_path / 'run'
    port = free_port()
    results = run_together([command(workdir, '--coordinator', f'127.0.0.1:{port}', '--num_processes', '2',
                                    '--process_id', str(i)) for i in range(2)], env, HERE)
    for code, _, err in results:
        assert code == 0, err[-3000:]
    summaries = [summary_of(out) for _, out, _ in results]
    assert summaries[0]['checksum'] == summaries[1]['checksum']  # both processes hold the same state
    assert '2 process(es)' in results[0][1]
    # Each process reads its rows of the same global batches: the 1-process run to float tolerance.
    assert max_diff(arrays(workdir), arrays(reference)) < 1e-6
    resumed = tmp_path / 'resumed'
    shutil.copytree(workdir, resumed)
    for step in (20, 25, 30):
        shutil.rmtree(resumed / 'checkpoints' / str(step))
    summary = loop.run(fake_task.TASK, fake_task.config_of(), str(resumed))
    assert summary['resumed_from'] == 15
    assert max_diff(arrays(resumed), arrays(workdir)) < 1e-6


def test_nan_loss_ends_with_one_line_and_keeps_the_last_checkpoint(tmp_path):
    with pytest.raises(ValueError, match=r'loss is nan by step 10: training diverged; the last checkpoint \(step 5\)'):
        loop.run(fake_task.TASK, fake_task.config_of(nan_at=7), str(tmp_path / 'run'))
    assert ckpt.Checkpointer(str(tmp_path / 'run'), 3).steps() == [5]  # the bad state was never saved


def test_a_run_whose_every_step_is_skipped_stops_with_one_line(tmp_path):
    """EDM's 'count' policy skips non-finite steps and goes on, but a run that cannot progress (every step of 10 or
    more skipped, e.g. sigma_data=0) stops: one line, the last checkpoint with a finite step kept. Also the short
    stretch before the run's end and a stretch with finite steps in it (NonfiniteStreak alone)."""
    with pytest.raises(ValueError, match=r'every step from 11 to 20 was non-finite .*the run cannot progress; the '
                                         r'last checkpoint \(step 15\) is kept'):
        loop.run(fake_task.TASK, fake_task.config_of(skip_from=10), str(tmp_path / 'run'))
    assert ckpt.Checkpointer(str(tmp_path / 'run'), 3).steps() == [5, 10, 15]
    streak = loop.NonfiniteStreak(100, 3)
    assert streak.check(105, 7, last=False) is None           # 4 of 5 skipped: progress, the stretch restarts
    assert streak.check(110, 12, last=False) is None          # 5 of 5, but fewer than 10 steps
    assert streak.check(113, 15, last=True) == 'every step from 106 to 113 was non-finite'  # the end of the run


def test_logged_metrics_are_interval_means_of_the_steps(reference):
    rows = logs.read_metrics(os.path.join(reference, logs.METRICS_FILE))
    assert [r['step'] for r in rows] == [5, 10, 15, 20, 25, 30]
    # Recompute the per-step losses of steps 1..5 with the task's step, outside the engine.
    config = fake_task.config_of()
    keys = loop.run_keys(config.seed, parallel.make_mesh(1, devices=jax.devices()[:1]))
    state, data, step_fn, losses = fake_task.init(keys.init), fake_task.StepData(config), fake_task.make_step(config), []
    for s in range(5):
        state, metrics = jax.jit(step_fn)(state, data.batch(s), keys.train)
        losses.append(float(metrics['loss']))
    assert rows[0]['loss'] == pytest.approx(np.mean(losses), rel=1e-6)
    assert rows[0]['lr'] == pytest.approx(1e-2) and rows[0]['img_per_s'] > 0
