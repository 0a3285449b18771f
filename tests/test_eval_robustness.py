"""python -m eval.robustness: the JSON, AutoAttack <= PGD <= clean, eps = 0, certification rows, one-line errors.

The classifier run is built the way jaxdiff.tasks.adversarial saves one (config.json, dataset_info.json,
checkpoints/ and best/ with best.json), with a WRN-10-1 fitted for a few full-batch CE steps on the digits 'train'
split, so it is far better than chance and the robust accuracies are not all zero.
"""
import contextlib
import io
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eval import robustness as R
from jaxdiff.evaluation import robustness, robustness_data
from jaxdiff import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = ['--num', '60', '--batch_size', '48', '--aa_iters', '3', '--square_queries', '10']  # 48 + 12 (padded)


def make_run(workdir: str, steps: int = 20) -> None:
    """A task='adversarial' run directory with a trained WRN-10-1 (configs/robust/digits.py, width 1, eps 0.05)."""
    import optax
    from jaxdiff import files
    from jaxdiff.config import from_file
    from jaxdiff.data.sources import DatasetInfo
    from jaxdiff.metrics.feature_classifier import dataset_split
    from jaxdiff.robust import adv_step
    from jaxdiff.tasks import adversarial
    from jaxdiff.engine import checkpoint as ckpt

    c = from_file(os.path.join(ROOT, 'configs', 'robust', 'digits.py'))
    c.model.width, c.eps = 1, 0.05
    images, labels = dataset_split('digits_classifier', 'train')
    info = DatasetInfo(8, 1, 10, len(images))
    net = adv_step.build_net(c, info)
    state = jax.jit(lambda k: adv_step.init_state(net, (8, 8, 1), k))(jax.random.key(0))
    opt = optax.adam(1e-2)
    x, y = jnp.asarray(images[:512], jnp.float32) / 255.0, jnp.asarray(labels[:512])

    @jax.jit
    def step(params, stats, opt_state):
        def loss_fn(p):
            logits, new = net.apply({'params': p, 'batch_stats': stats}, x, train=True, mutable=['batch_stats'])
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new['batch_stats']
        (_, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), stats, opt_state

    params, stats, opt_state = state.params, state.buffers, opt.init(state.params)
    for _ in range(steps):
        params, stats, opt_state = step(params, stats, opt_state)
    state = state.replace(step=jnp.asarray(steps, jnp.int32), params=params, ema=params, buffers=stats)
    os.makedirs(workdir, exist_ok=True)
    ckpt.check_config(workdir, c, False, write=True)
    ckpt.write_dataset_info(workdir, info)
    for folder in (workdir, os.path.join(workdir, adversarial.BEST_DIR)):
        saver = ckpt.Checkpointer(folder, 1, use_async=False)
        saver.save(state, {'process_count': 1, 'states': [{}]}, c)
        saver.close()
    files.write_json(os.path.join(workdir, adversarial.BEST_DIR, adversarial.BEST_FILE),
                     dict(step=steps, clean_acc=None, pgd_acc=None))


@pytest.fixture(scope='module')
def run_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp('robust') / 'run')
    make_run(path)
    return path


class Failed(Exception):
    pass


def _main(argv, monkeypatch=None):
    """R.main in-process -> (result, stdout); with monkeypatch, fail() raises Failed(message, code)."""
    if monkeypatch is not None:
        def fake_fail(prog, message, code):
            raise Failed(f'{prog}: error: {" ".join(str(message).split())}', code)
        monkeypatch.setattr(cli, 'fail', fake_fail)  # argparse and evaluation errors both end in jaxdiff.cli.fail
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        result = R.main(argv)
    return result, out.getvalue()


def test_json_and_attack_ordering(run_dir, tmp_path):
    path = str(tmp_path / 'r.json')
    result, stdout = _main(['--workdir', run_dir, '--eps', '0.05', '--json', path] + QUICK)
    assert json.loads(stdout.strip().splitlines()[-1]) == result
    with open(path) as f:
        assert json.load(f) == result
    assert result['n'] == 60 and result['data'] == 'digits:heldout' and result['norm'] == 'Linf'
    assert result['model']['checkpoint'] == 'best' and result['model']['step'] == 20
    pgd, aa = result['pgd40'], result['autoattack']
    assert pgd['steps'] == 40 and pgd['step_size'] == pytest.approx(0.0125) and pgd['random_start']
    assert aa['order'] == ['apgd-ce', 'apgd-t', 'fab-t', 'square']
    assert aa['budget']['n_iter'] == 3 and aa['budget']['square_queries'] == 10 and not aa['budget']['standard']
    stages = [aa['stages'][s] for s in ['clean'] + aa['order']]
    assert stages[0] == result['clean_acc'] and stages[-1] == aa['acc']
    assert all(a >= b for a, b in zip(stages, stages[1:]))
    assert result['clean_acc'] > 0.5  # a trained classifier, so the comparisons below are not vacuous
    assert aa['acc'] <= pgd['acc'] <= result['clean_acc']
    assert aa['acc'] < result['clean_acc']
    assert result['worst_case_acc'] <= min(aa['acc'], pgd['acc'])


def test_eps_zero_robust_equals_clean(run_dir):
    result, _ = _main(['--workdir', run_dir, '--eps', '0'] + QUICK)  # reuses the compiled programs
    clean = result['clean_acc']
    assert result['pgd40']['acc'] == clean and result['autoattack']['acc'] == clean
    assert all(v == clean for v in result['autoattack']['stages'].values())
    assert result['worst_case_acc'] == clean


def test_certification_rows_monotone(run_dir):
    clf = robustness_data.Classifier(run_dir)
    images, labels = robustness_data.load_data('digits:heldout')
    identity = lambda variables: (lambda x, sigma, cond: x)  # noqa: E731  (a stand-in "denoiser")
    sm = robustness.evaluate_smoothing(clf.apply, clf.variables, identity, {}, images[:6], labels[:6], sigma=0.25, n0=10,
                              n=60, alpha=0.001, radii=[0.0, 0.25, 0.5, 0.75, 1.0], batch=70,
                              key=jax.random.key(0), log=lambda m: None)
    accs = [r['certified_acc'] for r in sm['rows']]
    assert [r['radius'] for r in sm['rows']] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert [r['radius_sigma'] for r in sm['rows']] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert all(a >= b for a, b in zip(accs, accs[1:])) and 0 <= accs[-1] <= accs[0] <= 1
    # n = 60, alpha = 0.001: no radius beyond sigma * Phi^-1(alpha^(1/n)) can be certified
    assert sm['max_certifiable_radius'] < 0.75 and accs[3] == accs[4] == 0.0
    assert sm['num'] == 6 and 0 <= sm['abstain_rate'] <= 1


def test_one_line_errors(run_dir, tmp_path, monkeypatch):
    bad = str(tmp_path / 'big.npz')
    np.savez(bad, images=np.zeros((4, 28, 28, 1), np.uint8), labels=np.zeros(4, np.int32))
    nolabels = str(tmp_path / 'nolabels.npz')
    np.savez(nolabels, images=np.zeros((4, 8, 8, 1), np.uint8))
    cases = [
        (['--workdir', str(tmp_path / 'missing')], 1, 'run directory not found'),
        (['--workdir', run_dir, '--data', str(tmp_path / 'nothing.npz')], 1, 'not found'),
        (['--workdir', run_dir, '--data', 'digits:valid'], 1, "unknown split 'valid'"),
        (['--workdir', run_dir, '--data', bad], 1, '28x28x1 images but the classifier takes 8x8x1'),
        (['--workdir', run_dir, '--data', nolabels], 1, 'needs "images" and "labels"'),
        (['--workdir', run_dir, '--attacks', 'pgd40,cw'], 2, "unknown attack 'cw'"),
        (['--workdir', run_dir, '--eps', '-1'], 2, '--eps must be >= 0'),
        (['--workdir', run_dir, '--smoothing', run_dir], 1, f'--smoothing: {run_dir} is an adversarial-training '
                                                               '(robust classifier) run, not a diffusion model run'),
        (['--eps', '0.1'], 2, '--workdir RUN is required'),
    ]
    for argv, code, text in cases:
        with pytest.raises(Failed) as info:
            _main(argv + ['--num', '4'], monkeypatch)
        message, got = info.value.args
        assert got == code and text in message and '\n' not in message, (argv, message)
    # sample.py's loader says what the run is (jaxdiff.runs reads every task's run)
    from jaxdiff.runs import load_run
    from jaxdiff.sampling.model import load_model
    with pytest.raises(ValueError, match=r'adversarial-training \(robust classifier\) run, not a diffusion model run '
                                         r'\(evaluate it with python -m eval.robustness --workdir .*\); train a '
                                         r'diffusion model with python train.py --config configs/diffusion/\*.py'):
        load_model(run_dir)
    best = load_run(run_dir, checkpoint='best')
    assert (best.task, best.step, best.checkpoint, sorted(best.variables)) == ('adversarial', 20, 'best',
                                                                              ['batch_stats', 'params'])
    # the real CLI: one stderr line, exit code 1, nothing on stdout
    env = dict(os.environ, JAX_PLATFORMS='cpu')
    proc = subprocess.run([sys.executable, '-m', 'eval.robustness', '--workdir', str(tmp_path / 'missing')],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stdout == ''
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith('eval.robustness: error: run directory not found')
