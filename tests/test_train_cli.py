"""``python train.py`` as users run it (subprocesses): one-line errors with non-zero exits that never delete
checkpoints, config-change refusal, damaged checkpoints set aside. Preemption (kill -9, SIGTERM), device and process
counts are the engine's, tested in tests/test_engine.py against a fake task and per task in tests/test_tasks.py."""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import snapshot, truncate_largest_file
from jaxdiff.engine import checkpoint as ckpt

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TINY = os.path.join(HERE, 'tiny', 'denoiser.py')


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


@pytest.fixture(scope='module')
def short_run(tiny_runs):
    """The session's finished 20-step tiny denoiser run (checkpoints 10 and 20; tests copy it before changing it), the
    run ``train.py --config tests/tiny/denoiser.py`` makes."""
    return tiny_runs('denoiser')[0]


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
    # a line at each slow moment, in order: imports and data, compilation, the first step, the final save
    said = ["train.py: loading JAX and task 'denoiser'", 'resuming from step 20',
            'compiling the step; step 21 runs once it is compiled', 'step 21 done ', 'step 30/30 |',
            'writing the final checkpoint (step 30)', 'done: step 30']
    at = [next((i for i, line in enumerate(result.stdout.splitlines()) if line.startswith(text)), -1) for text in said]
    assert -1 not in at and at == sorted(at), (at, result.stdout)


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
    moved = os.listdir(workdir / 'corrupt_checkpoints')
    assert len(moved) == 1 and moved[0].startswith('20-')  # set aside, not deleted
    assert sorted(ckpt.verify(str(workdir)).items()) == [(10, None), (20, None)]  # step 20 saved again
    assert_bitwise_equal(final(workdir), final(short_run))
