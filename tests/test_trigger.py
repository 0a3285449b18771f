"""Trigger watermark (jaxdiff.watermark.trigger): the reserved trigger class keeps the old classes exactly, the
watermark image, the L1 regulariser
against numpy, and fine-tuning a tiny conditional run: the output is a loadable run, the regulariser keeps the
weights closer to the frozen ones, and the trigger's samples move towards the watermark image."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from jaxdiff.sampling.model import load_model
from jaxdiff.watermark import trigger as T


def test_trigger_label_leaves_every_old_class_unchanged(run_dir):
    from jaxdiff.runs import load_run
    from jaxdiff.train.model import denoiser_fn
    run = load_run(run_dir)
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


@pytest.fixture(scope='module')
def tuned(run_dir, tmp_path_factory):
    """Two fine-tunings of the tiny random-init run: without and with a strong regulariser."""
    out = {}
    for lam in (0.0, 1.0):
        path = str(tmp_path_factory.mktemp(f'trigger{lam:g}'))
        out[lam] = (path, T.finetune(run_dir, path, lam=lam, steps=40, lr=3e-3, batch_size=8, log_every=20,
                                     print_fn=lambda s: None))
    return out


def test_finetune_writes_a_loadable_run(tuned, run_dir):
    path, report = tuned[0.0]
    settings = json.load(open(os.path.join(path, T.TRIGGER_FILE)))
    assert settings == report and report['steps'] == 40 and report['base_run'] == os.path.abspath(run_dir)
    model = load_model(path)
    assert model.description['step'] == report['base_step'] + 40 and model.label_dim == 11
    trigger = T.read_trigger(path)
    assert report['trigger_label'] == 10
    np.testing.assert_allclose(trigger.cond, np.eye(11)[10])
    np.testing.assert_array_equal(trigger.image, T.default_watermark_image(8, 1))
    with pytest.raises(ValueError, match='already holds a run'):
        T.finetune(run_dir, path, steps=1)


def test_regulariser_keeps_weights_near_the_frozen_ones(tuned):
    assert tuned[1.0][1]['l1'] < 0.5 * tuned[0.0][1]['l1']


def test_finetuning_pulls_trigger_samples_to_the_image(tuned, run_dir):
    base = load_model(run_dir)
    image = T.default_watermark_image(8, 1)
    # the extended model before fine-tuning: its trigger row is zero, i.e. the unconditional model
    before = T.trigger_mse(T.sample_trigger(base, base.variables, np.zeros(10, np.float32), 16), image)
    assert tuned[0.0][1]['trigger_mse'] < 0.5 * before


def test_trigger_mse_by_hand():
    image = np.full((2, 2, 1), 255, np.uint8)
    samples = np.stack([np.zeros((2, 2, 1), np.uint8), np.full((2, 2, 1), 255, np.uint8)])
    assert T.trigger_mse(samples, image) == pytest.approx(0.5)
    assert float(jnp.float32(T.trigger_mse(samples[1:], image))) == 0.0


def test_prior_preservation_term(run_dir):
    """The prior term is the denoising loss on the prior batch; weight 0 leaves the trigger loss alone."""
    import optax
    from jaxdiff.runs import load_run
    run = load_run(run_dir)
    net, params = T.add_trigger_label(run.net, run.variables['params'])
    image = jnp.asarray(T.default_watermark_image(8, 1), jnp.float32) / 127.5 - 1
    cond = jnp.asarray(T.trigger_condition(11))
    prior = (jnp.zeros((4, 8, 8, 1)), jax.nn.one_hot(jnp.arange(4), 11))
    opt = optax.sgd(0.0)
    key = jax.random.key(1)
    plain = T.make_finetune_step(run.config, net, {}, params, image, cond, 0.0, 4, opt)(
        params, params, opt.init(params), key)[3]
    for weight in (0.0, 2.0):
        step = T.make_finetune_step(run.config, net, {}, params, image, cond, 0.0, 4, opt, prior, weight)
        m = step(params, params, opt.init(params), key)[3]
        assert float(m['prior']) > 0 and float(m['denoise']) == pytest.approx(float(plain['denoise']), rel=1e-6)
        assert float(m['loss']) == pytest.approx(float(m['denoise']) + weight * float(m['prior']), rel=1e-5)


def test_finetune_ema_is_the_moving_average_of_the_iterates(run_dir):
    """Half-life 1 step: beta = 1/2, so after one SGD step the average is halfway between old and new params."""
    import optax
    from jaxdiff.runs import load_run
    run = load_run(run_dir)
    net, params = T.add_trigger_label(run.net, run.variables['params'])
    image = jnp.asarray(T.default_watermark_image(8, 1), jnp.float32) / 127.5 - 1
    opt = optax.sgd(0.1)
    step = T.make_finetune_step(run.config, net, {}, params, image, jnp.asarray(T.trigger_condition(11)), 0.0, 4,
                                opt, ema_halflife=1.0)
    new, ema = step(params, params, opt.init(params), jax.random.key(0))[:2]
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), new, params))
    assert max(moved) > 1e-4
    jax.tree.map(lambda e, a, b: np.testing.assert_allclose(e, (a + b) / 2, rtol=1e-5, atol=1e-7), ema, new, params)


def test_train_py_continues_a_trigger_run_on_clean_data(tuned, tmp_path):
    """The robustness check "does the trigger survive further fine-tuning": train.py resumes the 11-class trigger
    run on the 10-class digits. The net keeps its trigger class; clean labels never select its embedding row, so
    that row stays as fine-tuned (Adam moves nothing with zero gradient) while the ordinary rows train on."""
    import shutil
    from jaxdiff.config import from_file
    from jaxdiff.runs import load_run
    from jaxdiff.train.loop import run
    path, report = tuned[0.0]
    work = str(tmp_path / 'clean')
    shutil.copytree(path, work)
    config = from_file(os.path.join(os.path.dirname(__file__), 'train_tiny_config.py'))
    with config.unlocked():
        config.total_steps = report['base_step'] + report['steps'] + 4
    assert run(config, work, allow_config_change=True)['step'] == config.total_steps
    before, after = load_run(path), load_run(work)
    assert after.step == config.total_steps and after.net.label_dim == 11 and after.info.num_classes == 11
    w0, w1 = (np.asarray(r.variables['params']['map_label']['weight']) for r in (before, after))
    np.testing.assert_allclose(w1[10], w0[10], rtol=1e-6, atol=1e-7)
    assert np.abs(w1[:10] - w0[:10]).max() > 1e-4


def test_net_info_keeps_the_runs_classes_and_refuses_data_that_does_not_fit(tmp_path):
    from jaxdiff.data.sources import DatasetInfo
    from jaxdiff.train import checkpoint as ckpt
    data = DatasetInfo(resolution=8, channels=1, num_classes=10, size=1797)
    assert ckpt.net_info(str(tmp_path), data) == data  # a new run: the data's
    ckpt.write_dataset_info(str(tmp_path), data._replace(num_classes=11, size=5))
    assert ckpt.net_info(str(tmp_path), data) == data._replace(num_classes=11)
    for bad in (data._replace(resolution=28), data._replace(num_classes=12), data._replace(num_classes=0)):
        with pytest.raises(ValueError, match='does not fit the net'):
            ckpt.net_info(str(tmp_path), bad)


def test_prior_images_from_the_runs_training_data(run_dir):
    from jaxdiff.data.sources import load_digits
    images, labels = T.prior_images(run_dir, 5, 11, 'data')
    digits, digit_labels = load_digits()
    np.testing.assert_allclose(np.asarray(images), digits[:5].astype(np.float32) / 127.5 - 1, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(labels), np.eye(11)[digit_labels[:5]])
    with pytest.raises(ValueError, match='unknown prior source'):
        T.prior_images(run_dir, 5, 11, 'web')
