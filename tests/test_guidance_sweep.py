"""eval.guidance_sweep: the toy's metrics on known samples, and the model sweep end to end on the tiny run."""
import json
import os
import sys

import jax
import numpy as np

from conftest import run_together
from eval import guidance_sweep as cli
from jaxdiff.evaluation import guidance_toy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_toy_metrics_see_exact_draws_as_perfect_and_trunks_as_lost_branches():
    data = guidance_toy.branching_mixture()
    gm = data.gm
    assert 800 <= int(np.sum(np.asarray(gm.labels) == 0)) <= 1200 and data.branch.max() + 1 == 32
    labels = np.arange(2000) % 2
    exact = guidance_toy.class_draws(gm, labels, jax.random.key(0))
    again = guidance_toy.class_draws(gm, labels, jax.random.key(1))
    m = guidance_toy.toy_metrics(data, again, labels, exact, jax.random.key(2))
    assert m['outliers'] < 0.002 and m['branches_lost'] == 0 and m['branch_tv'] < 0.15 and m['swd'] < 0.2
    # Only the trunks and first splits (no outer branch): every branch is lost, none of it off the data.
    inner = gm._replace(weights=np.where(data.branch < 0, np.asarray(gm.weights), 0.0))
    trunks = guidance_toy.class_draws(inner, labels, jax.random.key(3))
    m = guidance_toy.toy_metrics(data, trunks, labels, exact, jax.random.key(2))
    assert m['branches_lost'] == 1 and m['outliers'] < 0.002  # a 2-D Gaussian puts 3e-4 beyond 4 stds
    # Shifted off the data by far more than any std: all outliers.
    assert guidance_toy.toy_metrics(data, again + 20.0, labels, exact, jax.random.key(2))['outliers'] == 1


def test_sweep_on_the_tiny_run_with_itself_as_guide(run_dir, tmp_path, capsys):
    """Guided by itself, every autoguidance row equals the unguided one; the interval saves evaluations."""
    out = tmp_path / 'sweep'
    assert cli.main(['--workdir', run_dir, '--guide', run_dir, '--cfg_weights', '2', '--autoguidance_weights', '3',
                     '--intervals', '0.5:5', '--num_samples', '40', '--num_steps', '3', '--batch_size', '20',
                     '--out', str(out)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rows = {r['setting']: r for r in result['rows']}
    assert list(rows) == ['none', 'none_6steps', 'cfg_w2', 'cfg_w2_interval0.5-5', 'auto_w3']
    assert rows['auto_w3']['fd'] == rows['none']['fd'] and rows['auto_w3']['recall'] == rows['none']['recall']
    assert rows['none']['nfe'] == 5 and rows['none_6steps']['nfe'] == 11 and rows['cfg_w2']['nfe'] == 10
    assert 5 < rows['cfg_w2_interval0.5-5']['nfe'] < 10
    assert result['best']['cfg']['setting'] == 'cfg_w2' and (out / 'guidance_sweep.png').stat().st_size > 0
    assert json.loads((out / 'guidance_sweep.json').read_text())['rows'] == result['rows']


def test_errors_are_one_line(env, tmp_path):
    """Command-line errors exit 2, a missing run 1, each with one 'eval.guidance_sweep: error:' line."""
    cases = [(['--toy', '--workdir', 'x'], 2, 'give --toy or --workdir'),
             (['--workdir', 'x', '--intervals', '3:1'], 2, '--intervals: interval='),
             (['--workdir', 'x', '--guide_steps', 'ten'], 2, '--guide_steps'),
             (['--workdir', str(tmp_path / 'nope'), '--out', str(tmp_path)], 1, 'model directory not found')]
    results = run_together([[sys.executable, '-m', 'eval.guidance_sweep', *argv] for argv, _, _ in cases], env, ROOT)
    for (argv, code, needle), (returncode, stdout, stderr) in zip(cases, results):
        lines = stderr.strip().splitlines()
        assert returncode == code and stdout == '' and len(lines) == 1, stderr
        assert lines[0].startswith('eval.guidance_sweep: error:') and needle in lines[0], lines[0]
