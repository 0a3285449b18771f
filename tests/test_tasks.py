"""Every task through the one engine (tests/tiny/<task>.py, a few seconds each): a run that died between its last two
checkpoints (what kill -9 leaves on disk: the checkpoints before the last) resumes to the bitwise same final state as
the uninterrupted run, and 8 fake devices train the 1-device run to float tolerance. The 8-device subprocess runs while
this process trains the references (XLA compiles on one core each). The engine's own behaviours (kill -9 of a live
process, SIGTERM, process counts) are tested against a fake task in tests/test_engine.py."""
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import tiny_config, xla_flags
from jaxdiff.engine import checkpoint as ckpt
from jaxdiff.tasks import registry

HERE = os.path.dirname(os.path.abspath(__file__))
TASKS = [name for name in registry.TASKS if os.path.exists(os.path.join(HERE, 'tiny', f'{name}.py'))]


def train_all(out: str, base_run: str) -> None:
    """Train every tiny task into out/<name> (the 8-device subprocess runs this)."""
    for name in TASKS:
        registry.run(tiny_config(name, base_run), os.path.join(out, name))


@pytest.fixture(scope='module')
def eight_devices(tmp_path_factory, tiny_base_run, env):
    """(subprocess, folder): a process with 8 fake CPU devices training every tiny task into folder/<name>, started
    before the references are trained (the first test of the module asks for it)."""
    out = str(tmp_path_factory.mktemp('eight'))
    code = f'import sys; sys.path.insert(0, {HERE!r}); import test_tasks; test_tasks.train_all({out!r}, {tiny_base_run!r})'
    proc = subprocess.Popen([sys.executable, '-c', code], env=dict(env, XLA_FLAGS=xla_flags(8)), cwd=HERE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    yield proc, out
    if proc.poll() is None:
        proc.kill()


@pytest.fixture(scope='module')
def eight_device_runs(eight_devices):
    """The folder of the finished 8-device runs."""
    proc, out = eight_devices
    stdout, stderr = proc.communicate(timeout=900)
    assert proc.returncode == 0, stderr[-3000:]
    assert stdout.count('task ') >= len(TASKS) and ' 1 device(s)' not in stdout
    return out


def leaves(workdir: str) -> list:
    return jax.tree.leaves(ckpt.load_arrays(workdir))


@pytest.mark.parametrize('name', TASKS)
def test_task_resumes_bitwise_after_a_crash(name, eight_devices, tiny_runs, tiny_base_run, tmp_path):
    workdir = str(tmp_path / 'run')
    reference, finished = tiny_runs(name)
    shutil.copytree(reference, workdir)
    *kept, last = ckpt.Checkpointer(workdir, 5).steps()
    shutil.rmtree(os.path.join(workdir, 'checkpoints', str(last)))  # died after checkpoint kept[-1], before `last`
    config = tiny_config(name, tiny_base_run)
    summary = registry.run(config, workdir)
    assert summary['resumed_from'] == kept[-1] and summary['step'] == finished['step']
    for got, want in zip(leaves(workdir), leaves(reference), strict=True):
        np.testing.assert_array_equal(got, want)
    if name == 'trigger':  # the finished run's report too (its wall time aside)
        reports = [json.load(open(os.path.join(d, 'trigger.json'))) for d in (reference, workdir)]
        assert dict(reports[0], seconds=0) == dict(reports[1], seconds=0)


# Largest |8 devices - 1 device| over the final state. The trigger's L1 term pulls each weight by lr * sign(theta -
# theta_frozen): where theta sits at theta_frozen, float noise flips the sign and moves the weight by ~lr (1e-4).
# The autoencoder's attention key bias adds q.b_k to a whole softmax row, so its true gradient is exactly 0 and Adam
# turns the float noise into steps of ~lr (1e-3): 3.7e-3 there after 20 steps, < 7e-5 in every other leaf.
TOLERANCE = dict(trigger=1e-3, autoencoder=1e-2)


@pytest.mark.parametrize('name', TASKS)
def test_task_on_eight_devices_matches_one(name, tiny_runs, eight_device_runs):
    pairs = list(zip(leaves(os.path.join(eight_device_runs, name)), leaves(tiny_runs(name)[0]), strict=True))
    assert all(got.shape == want.shape for got, want in pairs)
    diff = max(float(np.max(np.abs(np.asarray(got, np.float64) - want))) if got.size else 0.0 for got, want in pairs)
    print(f'{name}: max |8 devices - 1 device| over the state = {diff:.3g}')
    assert diff < TOLERANCE.get(name, 1e-4)
