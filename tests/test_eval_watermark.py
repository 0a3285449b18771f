"""python -m eval.watermark: bit scores and perturbations by hand, weight noise statistics, the decode mode on a
codec whose decoder is known (a random-init codec's own encoder output), and one-line errors."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eval import watermark as W_cli
from jaxdiff.evaluation import watermark as W
from jaxdiff.tasks import watermark_codec as wc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bit_scores_by_hand():
    logits = np.array([[1.0, -1.0, 2.0], [-1.0, -1.0, 2.0], [1.0, 1.0, -2.0]])
    scores = W.bit_scores(logits, np.array([1, 0, 1]))
    assert scores['bit_acc'] == pytest.approx((1 + 2 / 3 + 1 / 3) / 3)
    assert scores['all_bits'] == pytest.approx(1 / 3) and scores['n'] == 3
    assert scores['bit_acc_std'] == pytest.approx(np.std([1, 2 / 3, 1 / 3]))


def test_perturbations_do_what_they_say():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (64, 8, 8, 1)).astype(np.uint8)
    out = {name: fn(images, np.random.default_rng(1)) for name, fn in W.perturbations()}
    assert np.array_equal(out['none'], images)
    assert all(v.dtype == np.uint8 and v.shape == images.shape for v in out.values())
    assert set(np.unique(out['quantise 4 levels'])) <= {0, 85, 170, 255}
    diff = out['noise std 0.1'].astype(float) - images
    assert 0.08 * 255 < diff.std() < 0.1 * 255  # clipping at 0 / 255 only shrinks it
    # blurring keeps the mean (reflecting borders) and lowers the pixel variance
    assert abs(out['blur sigma 1'].mean() - images.mean()) < 1.0 and out['blur sigma 1'].std() < images.std() / 2


def test_weight_noise_has_the_requested_std():
    variables = {'params': {'a': jnp.zeros((200, 100)), 'b': {'c': jnp.ones((5000,))}}, 'buffers': {'f': jnp.ones(3)}}
    noisy = W.add_weight_noise(variables, 0.3, jax.random.key(0))
    assert np.std(np.asarray(noisy['params']['a'])) == pytest.approx(0.3, rel=0.02)
    assert np.mean(np.asarray(noisy['params']['b']['c'])) == pytest.approx(1.0, abs=0.02)
    assert noisy['buffers'] is variables['buffers']
    zero = W.add_weight_noise(variables, 0.0, jax.random.key(0))
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(zero), jax.tree.leaves(variables)))


@pytest.fixture(scope='module')
def codec_run(tmp_path_factory):
    """A random-init 8-bit digits codec saved as a codec run at step 0 with the engine's checkpointer (decoding
    needs no training to be checked)."""
    from jaxdiff.data.sources import DatasetInfo
    from jaxdiff.engine import checkpoint as ckpt
    from jaxdiff.watermark.codec import codec_from_config
    workdir = str(tmp_path_factory.mktemp('codec'))
    config = wc.codec_config()
    config.num_bits = 8
    config.model.encoder_widths = (8, 8, 16, 16)
    config.model.decoder_widths = (8,) * 7
    config.model.decoder_strides = (1, 1, 2, 1, 2, 2, 2)
    config.model.decoder_hidden = 16
    config = wc.locked(config)
    info = DatasetInfo(resolution=8, channels=1, num_classes=10, size=1797)
    ckpt.check_config(workdir, config, False)
    ckpt.write_dataset_info(workdir, info)
    saver = ckpt.Checkpointer(workdir, 1, use_async=False)
    saver.save(wc.init_state(config, codec_from_config(config), info), ckpt.gather_data_states({}), config)
    saver.close()
    return workdir


def test_decode_mode_reads_the_decoders_bits(codec_run, tmp_path, capsys):
    # Images whose decoded bits are known: decode them once, then claim exactly those bits were embedded.
    images = np.random.default_rng(0).integers(0, 256, (40, 8, 8, 1)).astype(np.uint8)
    logits = W.decode(wc.load_codec(codec_run))(images)
    bits = (logits[0] > 0).astype(int)
    np.savez(tmp_path / 'set.npz', images=images)
    result = W_cli.main(['--decoder', codec_run, '--samples', str(tmp_path / 'set.npz'), '--perturb',
                     '--bits', ''.join(map(str, bits)), '--json', str(tmp_path / 'out.json')])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result
    assert result == json.load(open(tmp_path / 'out.json'))
    assert result['bit_acc'] == pytest.approx(np.mean((logits > 0) == bits)) and result['n'] == 40
    assert result['all_bits'] == pytest.approx(np.mean(np.all((logits > 0) == bits, axis=1)))
    assert [r['perturbation'] for r in result['rows']][:2] == ['none', 'noise std 0.02']
    assert len(result['rows']) == 1 + len(W.NOISE_STDS) + len(W.BLUR_SIGMAS) + len(W.QUANT_LEVELS)


def test_embedded_json_supplies_the_bits(tmp_path):
    path = tmp_path / 'watermarked.json'
    path.write_text(json.dumps({'bits': '1010'}))
    np.testing.assert_array_equal(W.read_bits(None, str(path), 4), [1, 0, 1, 0])
    with pytest.raises(ValueError, match='one of them'):
        W.read_bits('1010', str(path), 4)


@pytest.mark.parametrize('args, message', [
    ([], 'choose one mode'),
    (['--samples', 'digits'], 'needs --decoder'),
    (['--decoder', 'x', '--weight_noise', '0,0.1'], 'needs --workdir'),
    (['--decoder', 'x', '--workdir', 'y', '--weight_noise', 'a'], 'comma list'),
])
def test_command_line_errors_are_one_line(args, message):
    proc = subprocess.run([sys.executable, '-m', 'eval.watermark', *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_missing_codec_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, '-m', 'eval.watermark', '--decoder', str(tmp_path / 'none'), '--samples',
                           'digits', '--bits', '1010'], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and 'codec run not found' in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
