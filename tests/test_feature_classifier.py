"""Feature classifiers: the engine task feature_classifier (config, data order, resume), the cache of trained runs,
input-size handling and the Fashion-MNIST entry."""
import json
import os
import shutil
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.data.sources import FASHION_MNIST_DIR, fit_resolution
from jaxdiff.engine.checkpoint import load_arrays
from jaxdiff.engine.log import read_metrics
from jaxdiff.metrics import feature_classifier as fc
from jaxdiff.nets.classifier import SmallCNN
from jaxdiff.runs import load_run
from jaxdiff.tasks import feature_classifier as task

DIGITS = 'digits_classifier'
FASHION = 'fashion_mnist_classifier'


class Log(list):
    """Collects log lines (callable like print)."""

    def __call__(self, line):
        self.append(line)


@pytest.fixture(scope='module')
def digits_cache(tmp_path_factory):
    """A cache folder holding a digits classifier trained once for this module (next to files of the msgpack cache
    of earlier versions, which must be ignored), and its training log."""
    folder = tmp_path_factory.mktemp('cache')
    (folder / 'classifiers').mkdir()
    for suffix in ('.msgpack', '.json'):
        (folder / 'classifiers' / (DIGITS + suffix)).write_bytes(b'an earlier version\'s cache')
    log = Log()
    net = task.load_or_train(DIGITS, cache_dir=str(folder), log=log)
    return folder, net, log


def params(run) -> list:
    """The params of a run's newest checkpoint, as a list of numpy arrays."""
    return jax.tree.leaves(load_arrays(str(run))['params'])


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
        task.load_or_train('cifar_classifier')


def test_config_takes_the_registry_recipe_and_rejects_bad_values():
    assert task.recipe(task.feature_classifier_config()) == (64, 20, 3e-3)
    fashion = task.classifier_config(FASHION)
    assert (fashion.batch_size, fashion.epochs, fashion.optim.lr) == (128, 2, 3e-3)  # written out, not 0
    custom = task.feature_classifier_config()
    custom.classifier, custom.epochs = FASHION, 1
    assert task.recipe(custom) == (128, 1, 3e-3)
    custom.epochs = -1
    with pytest.raises(ValueError, match=r'config.epochs=-1 must be >= 0'):
        task.check(custom)
    custom.epochs, custom.classifier = 1, 'cifar_classifier'
    with pytest.raises(ValueError, match='digits_classifier, fashion_mnist_classifier'):
        task.check(custom)
    custom.classifier, custom.learning_rate = FASHION, 1e-3  # a misplaced field (the lr is optim.lr)
    with pytest.raises(ValueError, match=r"field\(s\) \['learning_rate'\]"):
        task.check(custom)


def test_batches_follow_the_seeded_epoch_permutations(monkeypatch):
    images, labels = fc.dataset_split(DIGITS, 'train')
    data = task.EpochBatches(images, labels, 64, 0, 'fingerprint')
    rng = np.random.default_rng(0)  # the replaced loop: a fresh permutation per epoch, the remainder dropped
    expected = [order[i * 64:(i + 1) * 64] for order in (rng.permutation(1078) for _ in range(3)) for i in range(16)]
    for step in (40, 0, 17, 16, 47):  # any order of access (a resumed run starts anywhere)
        np.testing.assert_array_equal(data.batch(step)['label'], labels[expected[step]])
        np.testing.assert_array_equal(data.batch(step)['image'], images[expected[step]])
    monkeypatch.setattr(jax, 'process_count', lambda: 2)
    monkeypatch.setattr(jax, 'process_index', lambda: 1)
    second = task.EpochBatches(images, labels, 64, 0, 'fingerprint').batch(17)  # process 1 of 2: rows 32..63
    np.testing.assert_array_equal(second['label'], labels[expected[17][32:]])
    assert data.set_state(data.get_state()) == '' and 'warning' in data.set_state({'data_fingerprint': 'other'})


def test_digits_trains_caches_and_reloads(digits_cache, monkeypatch):
    folder, net, log = digits_cache
    assert net.accuracy >= 0.95
    assert any('training it' in line for line in log)
    assert any(line.startswith('step 320/320') for line in log)  # the engine's progress lines go to log
    run = folder / 'classifiers' / DIGITS
    record = json.loads((run / 'classifier.json').read_text())
    assert (run / 'checkpoints' / '320').is_dir() and (run / 'config.json').is_file()
    assert record['accuracy'] == net.accuracy and record['seed'] == 0 and record['step'] == 320
    assert record['data_fingerprint'] and record['jaxdiff_version']
    assert read_metrics(str(run / 'metrics.jsonl'))[-1]['heldout_accuracy'] == pytest.approx(net.accuracy, rel=1e-6)
    assert not [name for _, _, names in os.walk(run) for name in names if '.tmp' in name]
    # the earlier versions' msgpack cache is neither read nor touched
    assert (folder / 'classifiers' / f'{DIGITS}.msgpack').read_bytes() == b"an earlier version's cache"
    # $JAXDIFF_CACHE is the default cache folder; the second call loads without training.
    monkeypatch.setenv('JAXDIFF_CACHE', str(folder))
    again_log = Log()
    again = task.load_or_train(DIGITS, log=again_log)
    assert again_log == [] and again.accuracy == net.accuracy
    images = fc.dataset_split(DIGITS, 'heldout')[0][:16]
    assert outputs_equal(net.apply(images), again.apply(images))
    # the run also loads like any other train.py run: its SmallCNN scores the recorded held-out accuracy
    loaded = load_run(str(run))
    assert (loaded.task, loaded.step, loaded.info.num_classes, loaded.info.resolution) == ('feature_classifier', 320,
                                                                                            10, 8)
    images, labels = fc.dataset_split(DIGITS, 'heldout')
    logits = loaded.net.apply(loaded.variables, jnp.asarray(images, jnp.float32) / 127.5 - 1)['logits']
    assert float(np.mean(np.argmax(logits, -1) == labels)) == pytest.approx(net.accuracy, abs=1e-6)


def test_corrupt_cache_is_retrained(digits_cache, tmp_path):
    folder, net, _ = digits_cache
    original, copy = folder / 'classifiers' / DIGITS, tmp_path / 'classifiers' / DIGITS
    shutil.copytree(original, copy)
    for path in (copy / 'checkpoints' / '320' / 'state').rglob('*'):
        if path.is_file() and path.stat().st_size > 1000:  # the stored arrays
            path.write_bytes(b'\x93not really an array' * 64)
    log = Log()
    retrained = task.load_or_train(DIGITS, cache_dir=str(tmp_path), log=log)
    assert any(line.startswith('warning:') and 'unusable' in line for line in log)
    # Same recipe and seed, so the retrained weights reproduce the original outputs exactly (determinism).
    images = fc.dataset_split(DIGITS, 'heldout')[0][:16]
    assert outputs_equal(net.apply(images), retrained.apply(images))
    assert all(a.tobytes() == b.tobytes() for a, b in zip(params(original), params(copy)))
    assert task.load_or_train(DIGITS, cache_dir=str(tmp_path), log=Log()).accuracy == net.accuracy


def test_interrupted_training_resumes_to_the_same_weights(digits_cache, tmp_path, monkeypatch):
    folder, net, _ = digits_cache
    batch = task.EpochBatches.batch

    def sigterm_at_step_100(self, step):
        if step == 100:
            signal.raise_signal(signal.SIGTERM)  # the engine saves the step it is on and stops
        return batch(self, step)

    monkeypatch.setattr(task.EpochBatches, 'batch', sigterm_at_step_100)
    with pytest.raises(RuntimeError, match='stopped by a signal at step 101'):
        task.load_or_train(DIGITS, cache_dir=str(tmp_path), log=Log())
    monkeypatch.setattr(task.EpochBatches, 'batch', batch)
    run = tmp_path / 'classifiers' / DIGITS
    assert not (run / 'classifier.json').exists()
    log = Log()
    resumed = task.load_or_train(DIGITS, cache_dir=str(tmp_path), log=log)
    assert any('resuming its interrupted training' in line for line in log)
    assert 'resuming from step 101' in log
    assert resumed.accuracy == net.accuracy
    assert all(a.tobytes() == b.tobytes() for a, b in zip(params(folder / 'classifiers' / DIGITS), params(run)))


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


class TestInBackground:
    """Tests whose computation is the suite's background job (tests/conftest.py): a class of their own, so that
    pytest-xdist's loadscope schedules them as their own unit, last, and not with this module's other tests."""

    @pytest.mark.slow
    @pytest.mark.background('fashion_mnist_classifier')
    @pytest.mark.skipif(not os.path.isdir(FASHION_MNIST_DIR), reason="Debian's dataset-fashion-mnist is not installed")
    def test_fashion_mnist_classifier_trains_to_about_90_percent(self, background):
        # Two epochs over 60k images: ~2 minutes on one core, trained by the suite's background job (tests/conftest.py)
        # with load_or_train into the `background` folder while the other tests run; here the cache is read back.
        log = Log()
        net = task.load_or_train(FASHION, cache_dir=background, log=log)
        assert not any('training' in line for line in log), log  # the background job's run, not a new one
        assert net.accuracy >= 0.89
