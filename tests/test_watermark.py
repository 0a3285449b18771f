"""Watermark codec (Zhao et al. 2023): shapes at the three data resolutions, the l2 ramp, the metrics, a short
digits training run by the engine (bits learnt; bitwise resume and 8 devices == 1 are tests/test_tasks.py's, on
tests/tiny/watermark_codec.py), the NaN stop, embedding a dataset, old runs refused, and the CLI's one-line
errors."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.config import from_file
from jaxdiff.engine import checkpoint as ckpt
from jaxdiff.tasks import registry
from jaxdiff.tasks import watermark_codec as wc
from jaxdiff.watermark import bits as bitlib
from jaxdiff.watermark.codec import WatermarkCodec, bitmap_side, unet_levels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize('shape', [(8, 8, 1), (28, 28, 1), (32, 32, 3)])
def test_codec_shapes_and_range(shape):
    codec = WatermarkCodec(num_bits=12, encoder_widths=(8, 8, 16, 16, 16), decoder_widths=(8,) * 7,
                           decoder_hidden=32)
    bits = jnp.asarray(np.random.default_rng(0).integers(0, 2, (3, 12)), jnp.float32)
    image = jnp.asarray(np.random.default_rng(1).uniform(size=(3,) + shape), jnp.float32)
    params = codec.init(jax.random.PRNGKey(0), bits, image)
    watermarked, logits = codec.apply(params, bits, image)
    assert watermarked.shape == (3,) + shape and logits.shape == (3, 12)
    assert float(watermarked.min()) >= 0.0 and float(watermarked.max()) <= 1.0
    assert params['params']['encoder']['bits_dense']['kernel'].shape == (12, bitmap_side(shape[0]) ** 2 * shape[2])
    np.testing.assert_allclose(codec.apply(params, watermarked, method='decode'), logits, rtol=1e-5, atol=1e-5)


def test_resolution_rules():
    assert [unet_levels(s) for s in (8, 16, 28, 32, 64)] == [3, 4, 4, 4, 4]
    assert [bitmap_side(s) for s in (8, 28, 32)] == [8, 16, 16]


def test_l2_ramp_state_machine():
    l2_max, wait, ramp, start = 10.0, 2, 4, 0.9
    accuracies = [0.5, 0.9, 0.95, 0.3, 0.2, 0.99, 0.99, 0.99, 0.99, 0.99, 0.99]
    since, weights, counters = -1, [], []
    for acc in accuracies:  # weight used in a step comes from the counter before it; the step's accuracy updates it
        weights.append(wc.l2_weight(since, l2_max, wait, ramp))
        since = wc.update_ramp(since, acc, start)
        counters.append(since)
    # 0.9 is not > 0.9; 0.95 starts the counter; later low accuracies do not stop it
    assert counters == [-1, -1, 0, 1, 2, 3, 4, 5, 6, 7, 8]
    assert weights == [0, 0, 0, 0, 0, 0, 2.5, 5.0, 7.5, 10.0, 10.0]
    # the traced versions (used inside the jitted step) agree
    since = jnp.int32(-1)
    for acc, want_w, want_c in zip(accuracies, weights, counters):
        assert float(wc.l2_weight(since, l2_max, wait, ramp)) == pytest.approx(want_w)
        since = wc.update_ramp(since, jnp.float32(acc), start)
        assert int(since) == want_c


def test_bit_metrics_and_psnr_by_hand():
    logits = np.array([[2.0, -1.0, 0.5, -3.0], [-2.0, -1.0, 0.0, 4.0]])
    bits = np.array([1, 0, 0, 0])
    np.testing.assert_allclose(bitlib.bit_accuracy(logits, bits), [0.75, 0.5])  # logit 0 reads as 0
    np.testing.assert_array_equal(bitlib.all_match(logits, bits), [False, False])
    np.testing.assert_array_equal(bitlib.all_match(logits[:1], [1, 0, 1, 0]), [True])
    a = np.zeros((2, 2, 2, 1), np.uint8)
    b = a.copy()
    b[0, 0, 0, 0] = 255                     # MSE = 1/4 -> 10 log10 4
    b[1] = 51                               # MSE = 0.2^2 = 0.04 -> 10 log10 25
    np.testing.assert_allclose(bitlib.psnr(a, b), [10 * np.log10(4), 10 * np.log10(25)], rtol=1e-9)
    np.testing.assert_allclose(bitlib.psnr(a, b.astype(np.float32) / 255), bitlib.psnr(a, b), rtol=1e-6)
    assert bitlib.mean_psnr(a, b) == pytest.approx((10 * np.log10(4) + 10 * np.log10(25)) / 2)


def test_bit_strings():
    np.testing.assert_array_equal(bitlib.parse_bits('0110'), [0, 1, 1, 0])
    assert bitlib.bits_to_str(bitlib.fixed_bits(16, 3)) == bitlib.bits_to_str(bitlib.make_bits(16, seed=3))
    assert bitlib.bits_to_str(bitlib.fixed_bits(16, 3)) != bitlib.bits_to_str(bitlib.fixed_bits(16, 4))
    for bad, words in (('01x1', 'only 0 and 1'), ('', 'empty'), ('010', 'codec encodes 4')):
        with pytest.raises(ValueError, match=words):
            bitlib.parse_bits(bad, 4)


# configs/watermark/digits.py shrunk to a codec that learns its 8 bits in 240 steps
SMALL = {'num_bits': 8, 'total_steps': 240, 'log_every': 60, 'checkpoint_every': 120, 'l2_wait': 40, 'l2_ramp': 80,
         'model.encoder_widths': (16, 16, 32, 32), 'model.decoder_widths': (16, 16, 32, 32, 32, 64, 64),
         'model.decoder_hidden': 128}


@pytest.fixture(scope='module')
def trained_run(tmp_path_factory, env):
    """The small digits codec trained by ``watermark.py train_codec`` (the engine's run); (workdir, stdout lines)."""
    workdir = str(tmp_path_factory.mktemp('codec'))
    out = subprocess.run([sys.executable, os.path.join(ROOT, 'watermark.py'), 'train_codec', '--config',
                          os.path.join(ROOT, 'configs', 'watermark', 'digits.py'), '--workdir', workdir]
                         + [f'--config.{key}={value}' for key, value in SMALL.items()],
                         env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    return workdir, out.stdout.strip().splitlines()


def test_training_learns_bits(trained_run):
    from jaxdiff.watermark.embed import load_images
    workdir, lines = trained_run
    assert 'starting from step 0' in lines and lines[-1] == f'done: step 240, codec in {workdir}'
    rows = [json.loads(r) for r in open(os.path.join(workdir, 'metrics.jsonl'))]
    assert [r['step'] for r in rows] == [60, 120, 180, 240]
    assert {'bit_acc', 'psnr', 'l2', 'bce', 'mse'} <= set(rows[-1])
    # decoded on 512 digits with fresh random bits: clearly above chance (0.5; std of the mean ~0.008)
    run = wc.load_codec(workdir)
    assert run.step == 240 and (run.info.resolution, run.info.channels) == (8, 1)
    images, _, _ = load_images(run.config.data)
    x = jnp.asarray(images[:512], jnp.float32) / 255
    bits = jax.random.bernoulli(jax.random.PRNGKey(7), 0.5, (512, run.config.num_bits)).astype(jnp.float32)
    _, logits = run.net.apply(run.variables, bits, x)
    assert bitlib.bit_accuracy(np.asarray(logits), np.asarray(bits)).mean() > 0.65


def test_embed_writes_a_source_readable_npz(trained_run, tmp_path):
    from jaxdiff.data.sources import load_digits, make_source
    from jaxdiff.watermark.embed import embed
    workdir, *_ = trained_run
    report = embed(workdir, str(tmp_path), bits='01101001', print_fn=lambda s: None)
    assert report['bits'] == '01101001' and report['num_images'] == 1797
    assert 0.0 <= report['bit_acc_mean'] <= 1.0 and report['psnr_min'] <= report['psnr_mean']
    data = from_file(os.path.join(ROOT, 'configs', 'diffusion', 'digits.py')).data
    data.unlock()
    data.source, data.path = 'npz', report['npz']
    source, info = make_source(data)
    _, labels = load_digits()
    assert (info.size, info.resolution, info.channels, info.num_classes) == (1797, 8, 1, 10)
    assert [int(source[i]['label']) for i in (0, 1, 1796)] == [int(labels[i]) for i in (0, 1, 1796)]
    with np.load(report['npz']) as npz:
        np.testing.assert_array_equal(npz['labels'], labels)
        images = npz['images']
    assert images.dtype == np.uint8 and images.shape == (1797, 8, 8, 1)
    # the JSON's numbers describe the uint8 set as written
    assert bitlib.psnr(images, load_digits()[0]).min() == pytest.approx(report['psnr_min'])
    assert json.load(open(os.path.join(str(tmp_path), 'watermarked.json'))) == report
    with pytest.raises(ValueError, match='only 0 and 1'):
        embed(workdir, str(tmp_path / 'bad'), bits='0110x001')
    with pytest.raises(ValueError, match='codec encodes 8'):
        embed(workdir, str(tmp_path / 'bad'), bits='0110')
    with pytest.raises(FileNotFoundError, match='codec run not found'):
        embed(str(tmp_path / 'nothing'), str(tmp_path / 'bad'))


def test_nan_loss_stops_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    """A loss that turns NaN after step 2 ends the run in one line; the step-2 checkpoint stays, intact, the last."""
    workdir = str(tmp_path)
    config = from_file(os.path.join(ROOT, 'tests', 'tiny', 'watermark_codec.py'))
    config.unlock()
    config.total_steps, config.checkpoint_every, config.log_every = 4, 2, 2
    step = wc.train_step

    def nan_from_step_2(config, codec, state, batch, key):
        new_state, metrics = step(config, codec, state, batch, key)
        return new_state, dict(metrics, loss=jnp.where(state['step'] >= 2, jnp.nan, metrics['loss']))

    monkeypatch.setattr(wc, 'train_step', nan_from_step_2)
    with pytest.raises(ValueError, match=r'loss is nan by step 4: .*the last checkpoint \(step 2\) is kept'):
        registry.run(config, workdir)
    assert ckpt.verify(workdir) == {2: None}


def test_old_msgpack_run_is_refused_in_one_line(tmp_path):
    """A codec run of the trainer before the engine (config.json without a task, checkpoint.msgpack)."""
    (tmp_path / 'config.json').write_text(json.dumps({'num_bits': 8, 'lr': 1e-3, 'seed': 0}))
    (tmp_path / 'checkpoint.msgpack').write_bytes(b'\x80')
    with pytest.raises(ValueError, match='checkpoint.msgpack: a watermark codec written by an older jaxdiff; '
                                         'retrain with python train.py'):
        wc.load_codec(str(tmp_path))


def test_cli_embed_and_errors(trained_run, tmp_path, env):
    workdir, *_ = trained_run
    cli = [sys.executable, os.path.join(ROOT, 'watermark.py')]
    out = subprocess.run(cli + ['embed', '--codec', workdir, '--out', str(tmp_path), '--bits_seed', '3'],
                         env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report['bits'] == bitlib.bits_to_str(bitlib.fixed_bits(8, 3))
    bad = subprocess.run(cli + ['embed', '--codec', workdir, '--out', str(tmp_path), '--bits', '01x'],
                         env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and bad.stderr.strip().count('\n') == 0
    assert bad.stderr.startswith('watermark.py: error: bad bit string')
    usage = subprocess.run(cli + ['embed', '--codec', workdir, '--out', str(tmp_path), '--config.num_bits=3'],
                           env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert usage.returncode == 2 and 'only --config.data.*' in usage.stderr
