"""python -m eval.safety: the ring task end to end (JSON, table, plot; unguidance and the exact safe denoiser reach
the safe sub-mixture), the other mixtures and the practical grid (wiring), the digits path on a tiny random-init model
(structure only), and one-line errors."""
import json
import os
import subprocess
import sys

import jax
import numpy as np

from eval import safety
from jaxdiff.evaluation import safety as common
from jaxdiff.evaluation import safety_digits, safety_mixture
from jaxdiff import schedules

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def cli(*args, env=None):
    return subprocess.run([sys.executable, '-m', 'eval.safety', *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=240, env=env)


def test_mixture_task_end_to_end(tmp_path, capsys):
    # Every method is listed; the ones README says meet the target on the ring are run (one sampler compile each).
    gm, refs = safety_mixture.ring(), np.zeros((4, 2), np.float32)
    listed = safety_mixture.mixture_methods(gm, common.MIXTURE_UNSAFE, schedules.karras_sigmas(18), refs,
                                    schedules.ddpm_sigmas(50), jax.random.key(0))
    assert {m.name for m in listed} == {'none', 'unguidance', 'negative_classifier_guidance',
                                        'safe_classifier_guidance', 'exact_safe_denoiser', 'paper_safe_denoiser',
                                        'practical_safe_denoiser', 'sld'}
    run = 'unguidance,exact_safe_denoiser,safe_classifier_guidance'
    assert safety.main(['--num_samples', '1000', '--methods', run, '--out', str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    result = json.loads(out.strip().splitlines()[-1])
    assert result == json.load(open(tmp_path / 'safety_mixture.json'))
    assert os.path.getsize(tmp_path / 'safety_mixture.png') > 0 and result['plot'].endswith('safety_mixture.png')
    assert result['task'] == 'mixture' and result['num_samples'] == 1000 and result['true_unsafe'] == 0.25
    assert result['mixture'] == 'ring'
    rows = {(r['method'], r['strength']): r for r in result['rows']}
    for row in result['rows']:
        assert set(row) >= {'unsafe', 'off', 'min_ratio', 'max_ratio', 'meets_target', 'shares', 'solver'}
        assert len(row['shares']) == 8 and np.isclose(sum(row['shares']), 1.0, atol=1e-3)
    assert 0.2 <= rows['none', '-']['unsafe'] <= 0.3 and not rows['none', '-']['meets_target']
    # Unguidance runs twice: the plain transform on EDM Heun, and the seed's exact update on its own 50-step DDIM.
    assert rows['unguidance', 'gamma=3 seed update']['solver'] == 'ddim50'
    assert [r['solver'] for r in result['rows'] if r['method'] == 'none'] == ['edm', 'ddim50']
    for key in (('unguidance', 'gamma=30'), ('unguidance', 'gamma=3 seed update'), ('exact_safe_denoiser', 'beta*'),
                ('safe_classifier_guidance', 'scale=1')):
        row = rows[key]
        assert row['unsafe'] <= 0.03 and row['off'] <= 0.01, row
        assert 0.8 <= row['min_ratio'] and row['max_ratio'] <= 1.2, row
    assert 'unguidance' in err and 'min_ratio' in err  # the table


def test_other_mixtures_and_the_practical_grid(tmp_path, capsys, monkeypatch):
    assert safety.main(['--mixture', 'neighbours', '--num_samples', '500', '--methods', 'exact_safe_denoiser',
                        '--out', str(tmp_path)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result['mixture'] == 'neighbours' and result['true_unsafe'] == 0.2 and result['unsafe_modes'] == [0]
    assert result['json'].endswith('safety_neighbours.json') and os.path.exists(tmp_path / 'safety_neighbours.png')
    assert [r['method'] for r in result['rows']] == ['none', 'exact_safe_denoiser']
    assert result['rows'][1]['unsafe'] <= 0.03 < result['rows'][0]['unsafe']
    # The grid runs the practical safe denoiser (on 50-step DDPM, next to that solver's baseline) and nothing else.
    monkeypatch.setitem(common.PRACTICAL_GRID, 'mixture', dict(scale=(1.0,), bandwidth=(1.0,), window=(40,),
                                                               margin=(0.0, None)))
    assert safety.main(['--practical_grid', '--mixture', 'unequal', '--num_samples', '300', '--out',
                        str(tmp_path)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result['json'].endswith('safety_unequal_practical_grid.json')
    assert [(r['method'], r['solver']) for r in result['rows']] == [('none', 'ddpm50')] + [
        ('practical_safe_denoiser', 'ddpm50')] * 2


def test_mixture_methods_filter_keeps_the_baseline(tmp_path, capsys):
    assert safety.main(['--num_samples', '200', '--methods', 'exact_safe_denoiser', '--out', str(tmp_path)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [r['method'] for r in result['rows']] == ['none', 'exact_safe_denoiser']


def test_digits_path_runs_on_a_tiny_model(run_dir, tmp_path, monkeypatch):
    # One strength per method: each strength is one compilation of the sampler, and only the wiring is checked.
    every = safety_digits.digits_methods

    def first_strengths(*args):
        # The ddpm50 baseline is dropped too (the practical row then falls back to the first row's baseline).
        methods = every(*args)
        return [m for i, m in enumerate(methods) if m.name not in {n.name for n in methods[:i]}]

    def noisy_logits(source):  # a stand-in noise-conditional classifier: linear in x, blind to sigma
        fn = lambda x, sigma: x.reshape(x.shape[0], -1)[:, :10]
        fn.num_classes = 10
        return fn

    monkeypatch.setattr(safety_digits, 'digits_methods', first_strengths)
    monkeypatch.setattr(safety_digits, 'noisy_classifier_logits', noisy_logits)
    result, samples = safety_digits.run_digits(run_dir, 7, num_samples=16, num_steps=18, batch_size=8,
                                        noisy_classifier='stand-in', log=lambda m: None)
    names = [r['method'] for r in result['rows']]
    assert names[0] == 'none' and set(names) == {'none', 'unguidance', 'negative_classifier_guidance',
                                                 'safe_classifier_guidance', 'paper_safe_denoiser',
                                                 'practical_safe_denoiser', 'sld'}
    for row in result['rows']:
        assert 0.0 <= row['unsafe'] <= 1.0 and isinstance(row['meets_target'], bool)
        assert set(row) >= {'fd', 'fd_ratio', 'seconds', 'solver'}
    assert {r['solver'] for r in result['rows'] if r['method'] == 'practical_safe_denoiser'} == {'ddpm50'}
    assert all(x.shape == (16, 8, 8, 1) and x.dtype == np.uint8 for x in samples.values())
    assert os.path.getsize(safety_digits.digits_plot(samples, str(tmp_path / 'grid.png'))) > 0


def test_float_logits_match_the_uint8_classifier(tmp_path):
    from jaxdiff.metrics.feature_classifier import make_feature_net
    from jaxdiff.nets.classifier import SmallCNN
    variables = SmallCNN(10).init(jax.random.key(0), np.zeros((1, 8, 8, 1), np.float32))
    net = make_feature_net('digits_classifier', variables)
    images = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 1), dtype=np.uint8)
    np.testing.assert_allclose(safety_digits.float_logits(net)(images / 127.5 - 1), net.apply(images)['logits'],
                               rtol=1e-5, atol=1e-5)


def test_errors_are_one_line(tmp_path):
    missing = cli('--task', 'digits', '--workdir', tmp_path / 'nope', '--out', tmp_path)
    assert missing.returncode == 1 and missing.stdout == ''
    lines = missing.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('eval.safety: error: model directory not found')
    no_workdir = cli('--task', 'digits')
    assert no_workdir.returncode == 2 and no_workdir.stderr.strip().endswith('needs --workdir RUN '
                                                                             '(a class-conditional train.py run)')
    bad_method = cli('--methods', 'magic', '--num_samples', '10', '--out', tmp_path)
    assert bad_method.returncode == 1 and 'unknown method(s) magic' in bad_method.stderr
