"""Feature classifiers: digits training, the weight cache, input-size handling and the Fashion-MNIST entry."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.data.sources import FASHION_MNIST_DIR, fit_resolution
from jaxdiff.metrics import feature_classifier as fc
from jaxdiff.nets.classifier import SmallCNN

DIGITS = 'digits_classifier'
FASHION = 'fashion_mnist_classifier'


class Log(list):
    """Collects log lines (callable like print)."""

    def __call__(self, line):
        self.append(line)


@pytest.fixture(scope='module')
def digits_cache(tmp_path_factory):
    """A cache folder holding a digits classifier trained once for this module, and its training log."""
    folder = tmp_path_factory.mktemp('cache')
    log = Log()
    net = fc.load_or_train(DIGITS, cache_dir=str(folder), log=log)
    return folder, net, log


def outputs_equal(a, b):
    return all(np.array_equal(np.asarray(a[key]), np.asarray(b[key])) for key in ('features', 'logits'))


def test_small_cnn_shapes_at_8_and_28():
    net = SmallCNN(num_classes=7, channels=(8, 16), feature_dim=12)
    for side in (8, 28):
        x = jnp.zeros((3, side, side, 1))
        out = net.apply(net.init(jax.random.key(0), x), x)
        assert out['features'].shape == (3, 12) and out['logits'].shape == (3, 7)


def test_digits_split_is_fixed_and_disjoint():
    from jaxdiff.data.sources import load_digits
    train_images, train_labels = fc.dataset_split(DIGITS, 'train')
    ref_images, _ = fc.dataset_split(DIGITS, 'ref')
    held_images, held_labels = fc.dataset_split(DIGITS, 'heldout')
    assert train_images.shape == (1078, 8, 8, 1) and ref_images.shape == (359, 8, 8, 1)
    assert held_images.shape == (360, 8, 8, 1)
    assert train_images.dtype == np.uint8 and held_labels.dtype == np.int32
    np.testing.assert_array_equal(fc.dataset_split(DIGITS, 'heldout')[0], held_images)
    assert set(np.unique(train_labels)) == set(range(10))
    # the three splits partition the dataset
    together = np.concatenate([train_images, ref_images, held_images]).reshape(1797, -1)
    everything = load_digits()[0].reshape(1797, -1)
    assert sorted(map(bytes, together)) == sorted(map(bytes, everything))
    with pytest.raises(ValueError, match="train, ref, heldout"):
        fc.dataset_split(DIGITS, 'test')


def test_unknown_name_lists_known_ones():
    with pytest.raises(ValueError, match='digits_classifier, fashion_mnist_classifier'):
        fc.load_or_train('cifar_classifier')


def test_digits_trains_caches_and_reloads(digits_cache, monkeypatch):
    folder, net, log = digits_cache
    assert net.accuracy >= 0.95
    assert any('training it' in line for line in log)
    weights = folder / 'classifiers' / f'{DIGITS}.msgpack'
    sidecar = json.loads((folder / 'classifiers' / f'{DIGITS}.json').read_text())
    assert weights.is_file() and sidecar['accuracy'] == net.accuracy and sidecar['seed'] == 0
    assert sidecar['data_fingerprint'] and sidecar['jaxdiff_version']
    assert not [name for name in os.listdir(folder / 'classifiers') if name.endswith('.tmp')]
    # $JAXDIFF_CACHE is the default cache folder; the second call loads without training.
    monkeypatch.setenv('JAXDIFF_CACHE', str(folder))
    again_log = Log()
    again = fc.load_or_train(DIGITS, log=again_log)
    assert again_log == [] and again.accuracy == net.accuracy
    images = fc.dataset_split(DIGITS, 'heldout')[0][:16]
    assert outputs_equal(net.apply(images), again.apply(images))


def test_corrupt_cache_is_retrained(digits_cache, tmp_path):
    folder, net, _ = digits_cache
    classifiers = tmp_path / 'classifiers'
    classifiers.mkdir()
    for suffix in ('.msgpack', '.json'):
        name = DIGITS + suffix
        (classifiers / name).write_bytes((folder / 'classifiers' / name).read_bytes())
    (classifiers / f'{DIGITS}.msgpack').write_bytes(b'\x93not really msgpack')
    log = Log()
    retrained = fc.load_or_train(DIGITS, cache_dir=str(tmp_path), log=log)
    assert any(line.startswith('warning:') and 'unusable' in line for line in log)
    # Same recipe and seed, so the retrained weights reproduce the original outputs exactly (determinism).
    images = fc.dataset_split(DIGITS, 'heldout')[0][:16]
    assert outputs_equal(net.apply(images), retrained.apply(images))
    original = (folder / 'classifiers' / f'{DIGITS}.msgpack').read_bytes()
    assert (classifiers / f'{DIGITS}.msgpack').read_bytes() == original
    assert fc.load_or_train(DIGITS, cache_dir=str(tmp_path), log=Log()).accuracy == net.accuracy


def test_padded_and_upsampled_inputs_match_native(digits_cache):
    net = digits_cache[1]
    images = fc.dataset_split(DIGITS, 'heldout')[0][:10]
    native = net.apply(images)
    assert native['features'].shape == (10, 128) and native['logits'].shape == (10, 10)
    assert native['features'].dtype == jnp.float32
    for side in (16, 32, 11, 13):  # multiples upsample, other sides centre-pad (as the training pipeline does)
        resized = np.stack([fit_resolution(image, side) for image in images])
        assert outputs_equal(native, net.apply(resized)), side


def test_apply_is_jittable_and_rejects_wrong_inputs(digits_cache):
    net = digits_cache[1]
    images = fc.dataset_split(DIGITS, 'heldout')[0][:4]
    probs = jax.jit(lambda x: jax.nn.softmax(net.apply(x)['logits']))(images)
    np.testing.assert_allclose(np.asarray(probs).sum(axis=1), 1, rtol=1e-5)
    with pytest.raises(ValueError, match=r'\(B, 8, 8, 1\)'):
        net.apply(np.zeros((2, 6, 6, 1), np.uint8))
    with pytest.raises(ValueError, match='8x9'):
        net.apply(np.zeros((2, 8, 9, 1), np.uint8))
    with pytest.raises(ValueError, match='1-channel'):
        net.apply(np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match='uint8'):
        net.apply(np.zeros((2, 8, 8, 1), np.float32))


def test_fashion_mnist_entry_and_shapes():
    spec = fc.CLASSIFIERS[FASHION]
    assert (spec.resolution, spec.channels, spec.num_classes) == (28, 1, 10)
    module = SmallCNN(num_classes=10, channels=spec.net_channels, feature_dim=spec.feature_dim)
    variables = module.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
    net = fc.make_feature_net(FASHION, variables)
    images = np.random.default_rng(0).integers(0, 256, (3, 28, 28, 1), dtype=np.uint8)
    native = net.apply(images)
    assert native['features'].shape == (3, spec.feature_dim) and native['logits'].shape == (3, 10)
    padded = np.stack([fit_resolution(image, 32) for image in images])  # the fashion_mnist config trains at 32
    assert outputs_equal(native, net.apply(padded))
    with pytest.raises(ValueError, match=r'\(B, 28, 28, 1\)'):
        net.apply(np.zeros((1, 16, 16, 1), np.uint8))


@pytest.mark.skipif(not os.path.isdir(FASHION_MNIST_DIR), reason="Debian's dataset-fashion-mnist is not installed")
def test_fashion_mnist_splits():
    train_images, train_labels = fc.dataset_split(FASHION, 'train')
    ref_images, _ = fc.dataset_split(FASHION, 'ref')
    held_images, held_labels = fc.dataset_split(FASHION, 'heldout')
    assert train_images.shape == (60000, 28, 28, 1) and held_images.shape == (5000, 28, 28, 1)
    assert ref_images.shape == (5000, 28, 28, 1) and not np.array_equal(ref_images[:10], held_images[:10])
    assert train_labels.shape == (60000,) and held_labels.dtype == np.int32


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(FASHION_MNIST_DIR), reason="Debian's dataset-fashion-mnist is not installed")
def test_fashion_mnist_classifier_trains_to_about_90_percent(tmp_path):
    # About 1.5 minutes on 2 CPU cores (2 epochs over 60k images).
    net = fc.load_or_train(FASHION, cache_dir=str(tmp_path), log=Log())
    assert net.accuracy >= 0.89
