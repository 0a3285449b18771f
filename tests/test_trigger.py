"""Trigger watermark (jaxdiff.watermark.trigger, task jaxdiff.tasks.trigger): the reserved trigger class keeps the
old classes exactly, the watermark image, the L1 regulariser against numpy, and fine-tuning a tiny conditional run
(watermark.py trigger and the engine): the output loads as a denoiser, the regulariser keeps the weights closer to
the frozen ones, the trigger's samples move towards the watermark image, and the prior term and the EMA do what they
say (a killed fine-tuning resuming to the same bits is tests/test_tasks.py's)."""
import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from conftest import tiny_config
from jaxdiff.config import from_file
from jaxdiff.engine import checkpoint as ckpt
from jaxdiff.engine.ema import decay_per_step
from jaxdiff.engine.task import Callback
from jaxdiff.runs import load_run
from jaxdiff.sampling.model import load_model
from jaxdiff.tasks import registry
from jaxdiff.tasks import trigger as TT
from jaxdiff.watermark import trigger as T

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_trigger_label_leaves_every_old_class_unchanged(tiny_base_run):
    from jaxdiff.nets.from_config import denoiser_fn
    run = load_run(tiny_base_run)
    net, params = T.add_trigger_label(run.net, run.variables['params'])
    assert net.label_dim == 11 and params['map_label']['weight'].shape[0] == 11
    old = denoiser_fn(run.config, run.net, run.variables)
    new = denoiser_fn(run.config, net, {**run.variables, 'params': params})
    x = jax.random.normal(jax.random.key(0), (12, 8, 8, 1))
    labels = jnp.concatenate([jnp.eye(10)[jnp.arange(10)], jnp.zeros((2, 10))])  # every class + unconditional
    pad = jnp.zeros((12, 1))
    for sigma in (0.05, 1.0, 20.0):
        np.testing.assert_allclose(new(x, sigma, jnp.concatenate([labels, pad], 1)), old(x, sigma, labels),
                                   atol=2e-5, rtol=1e-5)
    np.testing.assert_array_equal(T.trigger_condition(11), np.eye(11)[10])
    with pytest.raises(ValueError, match='class-conditional'):
        T.add_trigger_label(run.net.clone(label_dim=0), run.variables['params'])


def test_watermark_images(tmp_path):
    mark = T.default_watermark_image(8, 1)
    assert mark.shape == (8, 8, 1) and set(np.unique(mark)) == {0, 255}
    assert mark[0].min() == 255 and mark[3, 3, 0] == 255 and mark[3, 1, 0] == 0  # frame, cross, field
    path = str(tmp_path / 'mark.png')
    Image.fromarray(np.kron(np.eye(4, dtype=np.uint8) * 255, np.ones((4, 4), np.uint8))).save(path)
    loaded = T.load_watermark_image(path, 8, 1)
    assert loaded.shape == (8, 8, 1)
    np.testing.assert_array_equal(loaded[..., 0], np.kron(np.eye(4, dtype=np.uint8) * 255, np.ones((2, 2), np.uint8)))
    assert T.load_watermark_image(path, 8, 3).shape == (8, 8, 3)
    with pytest.raises(FileNotFoundError):
        T.load_watermark_image(str(tmp_path / 'missing.png'), 8, 1)


def test_l1_distance_matches_numpy():
    rng = np.random.default_rng(0)
    a = {'w': rng.normal(size=(3, 4)), 'b': {'c': rng.normal(size=(5,))}}
    b = jax.tree.map(lambda x: x + rng.normal(size=x.shape), a)
    want = sum(np.abs(x - y).sum() for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    assert float(T.l1_distance(a, b)) == pytest.approx(want, rel=1e-5)


def tuned_config(tiny_base_run: str, lam: float, steps: int = 40):
    """The fine-tuning of the ``tuned`` fixture as a trigger config (what its watermark.py flags build)."""
    config = TT.trigger_config()
    config.base_run, config.lam, config.total_steps = tiny_base_run, lam, steps
    config.optim.lr, config.batch_size, config.log_every, config.checkpoint_every = 3e-3, 8, 20, 20
    return config


@pytest.fixture(scope='module')
def tuned(tiny_base_run, tmp_path_factory, env):
    """Two fine-tunings of the tiny random-init run, 40 steps each: without a regulariser through watermark.py (its
    last stdout line is trigger.json), and with a strong one through the engine in-process. {lam: (OUT, report)}"""
    path = str(tmp_path_factory.mktemp('trigger0'))
    proc = subprocess.run([sys.executable, 'watermark.py', 'trigger', '--workdir', tiny_base_run, '--out', path, '--lam',
                           '0', '--steps', '40', '--lr', '3e-3', '--batch_size', '8'], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = {0.0: (path, json.loads(proc.stdout.strip().splitlines()[-1]))}
    path = str(tmp_path_factory.mktemp('trigger1'))
    assert registry.run(tuned_config(tiny_base_run, 1.0), path)['step'] == 40
    out[1.0] = (path, json.load(open(os.path.join(path, T.TRIGGER_FILE))))
    return out


def test_finetune_writes_a_loadable_run(tuned, tiny_base_run):
    path, report = tuned[0.0]
    settings = json.load(open(os.path.join(path, T.TRIGGER_FILE)))
    assert settings == report and report['steps'] == 40 and report['base_run'] == os.path.abspath(tiny_base_run)
    model = load_model(path)  # the run loads as the denoiser it exported
    assert model.description['step'] == report['base_step'] + 40 and model.label_dim == 11
    trigger = T.read_trigger(path)
    assert report['trigger_label'] == 10
    np.testing.assert_allclose(trigger.cond, np.eye(11)[10])
    np.testing.assert_array_equal(trigger.image, T.default_watermark_image(8, 1))
    with pytest.raises(ckpt.ConfigMismatchError, match='config differs'):  # other settings: a new --out
        registry.run(tuned_config(tiny_base_run, 0.0, steps=1), path)


def test_regulariser_keeps_weights_near_the_frozen_ones(tuned):
    assert tuned[1.0][1]['l1'] < 0.5 * tuned[0.0][1]['l1']


def test_finetuning_pulls_trigger_samples_to_the_image(tuned, tiny_base_run):
    base = load_model(tiny_base_run)
    image = T.default_watermark_image(8, 1)
    # the extended model before fine-tuning: its trigger row is zero, i.e. the unconditional model
    before = T.trigger_mse(T.sample_trigger(base.denoiser, base.variables, (8, 8, 1), base.sigma_range,
                                            np.zeros(10, np.float32)), image)
    assert tuned[0.0][1]['trigger_mse'] < 0.5 * before


def test_trigger_mse_by_hand():
    image = np.full((2, 2, 1), 255, np.uint8)
    samples = np.stack([np.zeros((2, 2, 1), np.uint8), np.full((2, 2, 1), 255, np.uint8)])
    assert T.trigger_mse(samples, image) == pytest.approx(0.5)
    assert float(jnp.float32(T.trigger_mse(samples[1:], image))) == 0.0


def test_prior_preservation_term(tiny_base_run):
    """The prior term is the denoising loss on the prior batch; weight 0 leaves the trigger loss alone."""
    run = load_run(tiny_base_run)
    net, params = T.add_trigger_label(run.net, run.variables['params'])
    image = jnp.asarray(T.default_watermark_image(8, 1), jnp.float32) / 127.5 - 1
    fixed = TT.Fixed(net, params, image, jnp.asarray(T.trigger_condition(11)), None)
    prior = (jnp.zeros((4, 8, 8, 1)), jax.nn.one_hot(jnp.arange(4), 11))

    def losses(p):  # no prior, then weights 0 and 2: one compilation
        out = []
        for weight, with_prior in ((1.0, None), (0.0, prior), (2.0, prior)):
            config = TT.trigger_config()
            config.batch_size, config.lam, config.prior_weight = 4, 0.0, weight
            out.append(TT.trigger_loss(config, run.config, fixed._replace(prior=with_prior), p, {},
                                       jax.random.key(1)))
        return out

    (_, (plain, _, _)), *weighted = jax.jit(losses)(params)
    for weight, (loss, (denoise, prior_loss, _)) in zip((0.0, 2.0), weighted):
        assert float(prior_loss) > 0 and float(denoise) == pytest.approx(float(plain), rel=1e-6)
        assert float(loss) == pytest.approx(float(denoise) + weight * float(prior_loss), rel=1e-5)


def test_ema_decay_counts_images():
    """beta = 0.5 ** (batch_size / halflife_img): 1/2 (halfway) for a half-life of one step's images, no EMA at 0
    (the trigger's default)."""
    config = TT.trigger_config()
    assert decay_per_step(config.batch_size, config.batch_size) == 0.5
    assert decay_per_step(config.ema.halflife_img, config.batch_size) == 0.0


class Crash(Exception):
    """Stands for a kill: raised by a callback between checkpoints."""


def crashing_trigger(at: int, states: dict):
    """The trigger task with one more callback: it keeps (params, ema) of the last two steps in ``states`` and
    raises after step ``at``."""
    def record(step, state):
        if step >= at - 1:
            states[step] = jax.device_get((state.params, state.ema))
        if step == at:
            raise Crash(f'step {step}')

    def setup(*args):
        out = TT.TASK.setup(*args)
        out.callbacks.append(Callback('crash', 1, record, at_end=False))
        return out
    return dataclasses.replace(TT.TASK, setup=setup)


def test_ema_follows_the_iterates_and_a_crash_keeps_the_last_checkpoint(tiny_base_run, tmp_path):
    """Killed after step 12 (checkpoint 10 saved): the run is not loadable as finished, its checkpoint verifies; on
    the way, the EMA is the moving average of the iterates: ema_s = p_s + beta (ema_s-1 - p_s) (the tiny config:
    half-life 5 steps). Resuming to the same bits as an uninterrupted run: tests/test_tasks.py."""
    from jaxdiff.engine import loop
    config = tiny_config('trigger', tiny_base_run)
    killed = str(tmp_path / 'killed')
    states: dict = {}
    with pytest.raises(Crash):
        loop.run(crashing_trigger(12, states), config, killed)
    assert ckpt.verify(killed) == {10: None}
    with pytest.raises(FileNotFoundError, match='not finished'):
        load_run(killed)
    (p11, e11), (p12, e12) = states[11], states[12]
    beta = np.float32(decay_per_step(config.ema.halflife_img, config.batch_size))
    assert beta == np.float32(0.5 ** (1 / 5))
    assert max(float(np.abs(x - y).max()) for x, y in zip(jax.tree.leaves(p12), jax.tree.leaves(p11))) > 1e-5
    jax.tree.map(lambda e, p, e0: np.testing.assert_allclose(e, p + beta * (e0 - p), rtol=1e-5, atol=1e-7),
                 e12, p12, e11)


def test_train_py_continues_a_trigger_run_on_clean_data(tuned, tmp_path):
    """The robustness check "does the trigger survive further fine-tuning": train.py resumes the 11-class model the
    trigger run exported (OUT/denoiser) on the 10-class digits. The net keeps its trigger class; clean labels never
    select its embedding row, so that row stays as fine-tuned (Adam moves nothing with zero gradient) while the
    ordinary rows train on."""
    import shutil
    path, report = tuned[0.0]
    work = str(tmp_path / 'clean')
    shutil.copytree(os.path.join(path, 'denoiser'), work)
    config = from_file(os.path.join(os.path.dirname(__file__), 'tiny', 'denoiser.py'))
    with config.unlocked():
        config.total_steps = report['base_step'] + report['steps'] + 4
        config.sample_every = 0
    assert registry.run(config, work, allow_config_change=True)['step'] == config.total_steps
    before, after = load_run(path), load_run(work)
    assert after.step == config.total_steps and after.net.label_dim == 11 and after.info.num_classes == 11
    w0, w1 = (np.asarray(r.variables['params']['map_label']['weight']) for r in (before, after))
    np.testing.assert_allclose(w1[10], w0[10], rtol=1e-6, atol=1e-7)
    assert np.abs(w1[:10] - w0[:10]).max() > 1e-4


def test_net_info_keeps_the_runs_classes_and_refuses_data_that_does_not_fit(tmp_path):
    from jaxdiff.data.sources import DatasetInfo
    from jaxdiff.engine import checkpoint as ckpt
    data = DatasetInfo(resolution=8, channels=1, num_classes=10, size=1797)
    assert ckpt.net_info(str(tmp_path), data) == data  # a new run: the data's
    ckpt.write_dataset_info(str(tmp_path), data._replace(num_classes=11, size=5))
    assert ckpt.net_info(str(tmp_path), data) == data._replace(num_classes=11)
    for bad in (data._replace(resolution=28), data._replace(num_classes=12), data._replace(num_classes=0)):
        with pytest.raises(ValueError, match='does not fit the net'):
            ckpt.net_info(str(tmp_path), bad)


def test_prior_images_from_the_runs_training_data(tiny_base_run):
    from jaxdiff.data.sources import load_digits
    images, labels = TT.prior_images(load_run(tiny_base_run), 5, 11, 'data')
    digits, digit_labels = load_digits()
    np.testing.assert_allclose(np.asarray(images), digits[:5].astype(np.float32) / 127.5 - 1, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(labels), np.eye(11)[digit_labels[:5]])
    with pytest.raises(ValueError, match='unknown prior source'):
        TT.prior_images(load_run(tiny_base_run), 5, 11, 'web')


def test_prior_samples_are_sample_pys(tiny_base_run):
    """The 'samples' prior: the images sample.py --class_balanced writes for the same seeds, batching aside."""
    from jaxdiff.sampling.generate import Labels, sample_array
    model = load_model(tiny_base_run)
    want = sample_array(model, 3, labels=Labels('cycle', tuple(range(10)), 10))
    got = T.class_samples(model.denoiser, model.variables, (8, 8, 1), model.sigma_range, 10, 3, batch_size=2)
    np.testing.assert_array_equal(got, want)
