"""python -m eval.fairness: the mixture task end to end (the 0.5 target), the digits path on a tiny random net, and
one-line errors."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

from eval import fairness as fairness_cli
from jaxdiff.evaluation import fairness as E

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_KEYS = {'rate', 'ber', 'valid', 'tau_index', 'tau_sigma'}


def cli(*args, env=None):
    return subprocess.run([sys.executable, '-m', 'eval.fairness', *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=env)


def test_mixture_switching_reaches_the_fair_rate(env, tmp_path):
    """Target: attribute rate 0.5 +- 0.05 with switching where the base gives >= 0.7.

    It is asserted at the best grid tau (calibrated on its own batch, evaluated on fresh noise): the tau_search
    minimisers miss the fair point on this mixture (the reference's criterion switches too late, rate ~0.64, the
    per-sample norm's too early, ~0.39, with the biased prior; see jaxdiff.transforms.attribute_switching.tau_search), so for them only
    "inside the mixing phase" is asserted.
    """
    # The scan window keeps the calibration to the grid near the two searched taus, which bracket the fair point.
    proc = cli('--out', tmp_path, '--num_samples', 2000, '--scan_samples', 1000, '--scan_window', 10, env=env)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == json.load(open(tmp_path / 'fairness_mixture.json'))
    assert os.path.getsize(tmp_path / 'fairness_mixture.png') > 0 and result['plot'].endswith('fairness_mixture.png')
    runs = result['runs']
    assert set(runs) == {'base', 'conditional', 'switch_search', 'switch_search_sample', 'switch_best'}
    assert all(set(r) == RUN_KEYS for r in runs.values())
    steps = result['steps']
    for key, run in (('tau_search', 'switch_search'), ('tau_search_sample', 'switch_search_sample')):
        found = result[key]
        assert len(found['curve']) == len(result['scan']['rate']) == len(result['tau_sigmas']) == steps + 1
        assert found['index'] == int(np.argmin(found['curve'])) == runs[run]['tau_index']
    assert (result['tau_search']['norm'], result['tau_search_sample']['norm']) == ('batch', 'sample')

    assert runs['base']['rate'] >= 0.7 and runs['conditional']['rate'] >= 0.7
    assert runs['conditional']['ber'] < 0.1  # without switching the shown attribute gives s0 away
    assert abs(runs['switch_best']['rate'] - 0.5) < 0.05 and abs(runs['switch_best']['ber'] - 0.5) < 0.05
    assert 0.1 < runs['switch_search']['rate'] < 0.9 and 0.1 < runs['switch_search_sample']['rate'] < 0.9
    assert proc.stdout.splitlines()[-2].startswith('switch_best')  # the table precedes the JSON line


def test_digits_path_on_a_tiny_net(run_dir):
    """Structure only (a random net draws no digits): a stand-in classifier calls an image 3, 8 or 5 by its pixel
    sum mod 3 (5 is neither attribute, so ``valid`` < 1 is exercised)."""
    from jaxdiff.sampling.model import load_model

    def classifier(images):
        assert images.dtype == jnp.uint8 and images.shape[1:] == (8, 8, 1)
        verdict = jnp.array([3, 8, 5])[jnp.sum(images.astype(jnp.int32), axis=(1, 2, 3)) % 3]
        return {'logits': jax.nn.one_hot(verdict, 10)}

    task = E.digits_task(load_model(run_dir), classifier, (3, 8), steps=3)
    assert task.sample_shape == (8, 8, 1)
    np.testing.assert_array_equal(task.cond_rows(jnp.array([0, 1])), jax.nn.one_hot(jnp.array([3, 8]), 10))
    result = E.evaluate(task, num_samples=12, prior=0.75, search_samples=4, scan_samples=4, batch_size=8,
                        log=lambda _: None)
    assert set(result['runs']) == {'conditional', 'switch_search', 'switch_search_sample', 'switch_best'}
    assert all(set(r) == RUN_KEYS and 0 <= r['valid'] <= 1 for r in result['runs'].values())
    assert len(result['tau_search']['curve']) == 4 and np.all(np.isfinite(result['tau_search']['curve']))
    json.dumps(result, allow_nan=False)
    # A scan window of 0 tries only the tau_search indices themselves.
    narrow = E.evaluate(task, num_samples=12, prior=0.75, search_samples=4, scan_samples=4, batch_size=8,
                        scan_window=0, log=lambda _: None)
    scanned = [i for i, b in enumerate(narrow['scan']['rate']) if b is not None]
    assert scanned == sorted({narrow['tau_search']['index'], narrow['tau_search_sample']['index']})
    assert narrow['scan_window'] == 0


def test_every_mixture_task_is_selectable_and_shows_its_regions():
    """Each 2-D task of E.MIXTURES parses with the mixture defaults, is a normalised two-condition mixture, and its
    regions' centres (and points 1.5 std out from them, away from the origin) show their own attribute."""
    from jaxdiff.transforms import attribute_switching as F
    assert {'mixture', 'mixture_spread', 'mixture_weak', 'mixture_ring', 'mixture_close'} <= set(E.MIXTURES)
    for name, (_, build) in E.MIXTURES.items():
        args = fairness_cli.parse_args(['--task', name])
        assert (args.num_samples, args.steps, args.scan_samples) == (4000, 128, 2000)
        task = E.mixture_task(args.steps, 0.75, name)
        assert task.description['kind'] == name and task.sample_shape == (2,)
        am = build(0.75)
        assert isinstance(am, F.AttributeMixture) and np.isclose(float(am.gm.weights.sum()), 1.0)
        out = am.means + 1.5 * am.stds[:, None] * am.means / np.linalg.norm(am.means, axis=1, keepdims=True)
        shown, valid = task.shown(jnp.asarray(np.concatenate([am.means, out]), jnp.float32))
        assert bool(valid.all()), name
        np.testing.assert_array_equal(shown, np.tile(am.attributes, 2).astype(bool), err_msg=name)


def test_missing_workdir_is_one_line(env, tmp_path):
    proc = cli('--task', 'digits', '--workdir', tmp_path / 'nope', '--out', tmp_path, env=env)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"eval.fairness: error: model directory not found: '{tmp_path / 'nope'}'; pass the --workdir of a train.py "
        "run or a folder written by python -m jaxdiff.nets.convert"]
    assert cli('--task', 'digits', env=env).returncode == 2  # no --workdir: a command-line error
