"""jaxdiff.data sources and the grain pipeline: shapes, dtypes, ranges, sharding, determinism, resume, errors."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from jaxdiff.config import base_config
from jaxdiff.data import make_iterator, make_source, write_array_record
from jaxdiff.data.sources import FASHION_MNIST_DIR

HAS_FASHION = os.path.exists(os.path.join(FASHION_MNIST_DIR, 'train-images-idx3-ubyte.gz'))


def data_config(**overrides):
    """config.data with ``overrides``."""
    config = base_config().data
    config.update(overrides)
    return config


def index_npz(tmp_path, n=50, side=2):
    """An npz whose image i is filled with the value i (so batches reveal which images they hold)."""
    images = np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None], (n, side, side)).copy()
    path = str(tmp_path / 'index.npz')
    np.savez(path, images=images, labels=np.arange(n) % 7)
    return path


def indices(batch):
    """The image indices held by a batch of :func:`index_npz` images."""
    return np.round((batch['image'][:, 0, 0, 0] + 1) * 127.5).astype(int)


def take(iterator, k):
    """The next ``k`` batches."""
    return [next(iterator) for _ in range(k)]


def assert_batch(batch, size, shape):
    """image float32 (size, *shape) in [-1, 1], label int32 (size,)."""
    assert batch['image'].shape == (size, *shape) and batch['image'].dtype == np.float32
    assert -1 <= batch['image'].min() and batch['image'].max() <= 1
    assert batch['label'].shape == (size,) and batch['label'].dtype == np.int32


# ---- sources ---------------------------------------------------------------------------------------------------

def test_digits_source():
    source, info = make_source(data_config(source='digits'))
    assert info == (8, 1, 10, 1797) and len(source) == 1797
    images = np.stack([source[i]['image'] for i in range(len(source))])
    labels = np.array([source[i]['label'] for i in range(len(source))])
    assert images.dtype == np.uint8 and images.shape == (1797, 8, 8, 1) and images.max() == 255
    assert labels.dtype == np.int32 and set(labels) == set(range(10))


@pytest.mark.parametrize('resolution', [16, 12])
def test_digits_resolution(resolution):
    native, _ = make_source(data_config(source='digits'))
    source, info = make_source(data_config(source='digits', resolution=resolution))
    image, original = source[3]['image'], native[3]['image']
    assert info.resolution == resolution and image.shape == (resolution, resolution, 1)
    if resolution == 16:  # integer multiple: nearest upsampling
        np.testing.assert_array_equal(image[::2, ::2], original)
        np.testing.assert_array_equal(image[1::2, 1::2], original)
    else:  # otherwise: zero padding to the centre
        np.testing.assert_array_equal(image[2:10, 2:10], original)
        assert image.sum() == original.sum()


@pytest.mark.parametrize('resolution', [4, -1])
def test_bad_resolution(resolution):
    with pytest.raises(ValueError, match='data.resolution'):
        make_source(data_config(source='digits', resolution=resolution))


def test_unlabelled_when_use_labels_false():
    source, info = make_source(data_config(source='digits', use_labels=False))
    assert info.num_classes == 0 and all(source[i]['label'] == 0 for i in range(20))


def write_idx(path, array):
    """A plain (not gzipped) idx file of unsigned bytes."""
    header = bytes([0, 0, 8, array.ndim]) + np.asarray(array.shape, '>i4').tobytes()
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_from_path(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (6, 28, 28), dtype=np.uint8)
    write_idx(tmp_path / 't10k-images-idx3-ubyte', images)
    write_idx(tmp_path / 't10k-labels-idx1-ubyte', np.arange(6) % 10)
    source, info = make_source(data_config(source='fashion_mnist', path=str(tmp_path), split='test', resolution=32))
    assert info == (32, 1, 6, 6)
    np.testing.assert_array_equal(source[4]['image'][2:30, 2:30, 0], images[4])
    assert source[4]['image'].sum() == images[4].sum() and source[4]['label'] == 4


def test_fashion_mnist_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match='apt-get install dataset-fashion-mnist'):
        make_source(data_config(source='fashion_mnist', path=str(tmp_path)))


@pytest.mark.skipif(not HAS_FASHION, reason='Debian package dataset-fashion-mnist not installed '
                                            '(apt-get install dataset-fashion-mnist)')
def test_fashion_mnist_debian():
    source, info = make_source(data_config(source='fashion_mnist', resolution=32))
    assert info == (32, 1, 10, 60000)
    image = source[0]['image']
    assert image.shape == (32, 32, 1) and image.dtype == np.uint8 and image[:2].max() == 0 and image.max() > 0
    _, test_info = make_source(data_config(source='fashion_mnist', split='test'))
    assert test_info == (28, 1, 10, 10000)


def test_npz_source(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (5, 4, 4, 3), dtype=np.uint8)
    np.savez(tmp_path / 'rgb.npz', images=images, labels=[0, 1, 2, 1, 0])
    source, info = make_source(data_config(source='npz', path=str(tmp_path / 'rgb.npz')))
    assert info == (4, 3, 3, 5)
    np.testing.assert_array_equal(source[2]['image'], images[2])
    _, info = make_source(data_config(source='npz', path=index_npz(tmp_path)))
    assert info == (2, 1, 7, 50)


def test_npz_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match='npz file not found'):
        make_source(data_config(source='npz', path=str(tmp_path / 'missing.npz')))
    np.savez(tmp_path / 'float.npz', images=np.zeros((2, 4, 4), np.float32))
    with pytest.raises(ValueError, match='uint8'):
        make_source(data_config(source='npz', path=str(tmp_path / 'float.npz')))
    np.savez(tmp_path / 'wide.npz', images=np.zeros((2, 4, 6), np.uint8))
    with pytest.raises(ValueError, match='square'):
        make_source(data_config(source='npz', path=str(tmp_path / 'wide.npz')))


def write_folder(folder, images, labels):
    """PNG files in two subfolders plus an EDM-style dataset.json; returns their relative paths."""
    names = [f'{i % 2:05d}/img{i:08d}.png' for i in range(len(images))]
    for name, image in zip(names, images):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / name)
    (folder / 'dataset.json').write_text(json.dumps({'labels': [[n, int(l)] for n, l in zip(names, labels)]}))
    return names


def test_folder_source(tmp_path):
    images = np.random.default_rng(1).integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
    names = write_folder(tmp_path, images, [5, 4, 3, 2, 1, 0])
    source, info = make_source(data_config(source='folder', path=str(tmp_path)))
    assert info == (8, 3, 6, 6)
    for index, name in enumerate(sorted(names)):
        original = names.index(name)
        np.testing.assert_array_equal(source[index]['image'], images[original])
        assert source[index]['label'] == 5 - original


def test_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match='image folder not found'):
        make_source(data_config(source='folder', path=str(tmp_path / 'missing')))
    with pytest.raises(ValueError, match='holds no'):
        make_source(data_config(source='folder', path=str(tmp_path)))
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / 'a.png')
    Image.fromarray(np.zeros((6, 6, 3), np.uint8)).save(tmp_path / 'b.png')
    with pytest.raises(ValueError, match='b.png .* 6x6 RGB but a.png is 8x8 RGB'):
        make_source(data_config(source='folder', path=str(tmp_path)))


def test_array_record_source(tmp_path):
    images = np.random.default_rng(2).integers(0, 256, (7, 8, 8, 3), dtype=np.uint8)
    labels = np.arange(7) % 3
    write_array_record(str(tmp_path / 'a.array_record'), images[:4], labels[:4])
    write_array_record(str(tmp_path / 'b.array_record'), images[4:], labels[4:])
    source, info = make_source(data_config(source='array_record', path=str(tmp_path)))
    assert info == (8, 3, 3, 7)
    for index in range(7):
        np.testing.assert_array_equal(source[index]['image'], images[index])
        assert source[index]['label'] == labels[index]
    gray = images[:3, :, :, 0]
    write_array_record(str(tmp_path / 'gray.ar'), gray)
    source, info = make_source(data_config(source='array_record', path=str(tmp_path / 'gray.ar'), resolution=16))
    assert info == (16, 1, 0, 3)
    np.testing.assert_array_equal(source[1]['image'][::2, ::2, 0], gray[1])


def test_array_record_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match='no array_record files'):
        make_source(data_config(source='array_record', path=str(tmp_path)))


def test_unknown_source():
    with pytest.raises(ValueError, match="unknown data.source 'mnist'"):
        make_source(data_config(source='mnist'))


# ---- TFDS (array_record, no TensorFlow) --------------------------------------------------------------------------

TFDS_IMAGES = np.random.default_rng(3).integers(0, 256, (10, 8, 8, 3), dtype=np.uint8)


@pytest.fixture(scope='module')
def tfds_dir(tmp_path_factory):
    """A prepared array_record TFDS dataset 'jaxdiff_tiny' (10 RGB 8x8 images, 3 classes) built from numpy."""
    tfds = pytest.importorskip('tensorflow_datasets', reason='tensorflow-datasets not installed (pip install ".[tfds]")')

    class JaxdiffTiny(tfds.core.GeneratorBasedBuilder):  # pylint: disable=abstract-method
        """Ten random images; images are given as PIL so that TFDS encodes them without TensorFlow."""
        VERSION = tfds.core.Version('1.0.0')

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                'image': tfds.features.Image(shape=(8, 8, 3)), 'label': tfds.features.ClassLabel(num_classes=3)}))

        def _split_generators(self, dl_manager):
            return {'train': self._generate_examples()}

        def _generate_examples(self):
            for index, image in enumerate(TFDS_IMAGES):
                yield index, {'image': Image.fromarray(image), 'label': index % 3}

    folder = tmp_path_factory.mktemp('tfds')
    JaxdiffTiny(data_dir=str(folder), file_format='array_record').download_and_prepare()
    return str(folder)


def test_tfds_source(tfds_dir):
    config = data_config(source='tfds', tfds_name='jaxdiff_tiny', path=tfds_dir)
    source, info = make_source(config)
    assert info == (8, 3, 3, 10)
    items = [source[i] for i in range(len(source))]
    assert all(item['image'].dtype == np.uint8 and item['label'].dtype == np.int32 for item in items)
    got = sorted((int(item['label']), item['image'].tobytes()) for item in items)
    assert got == sorted((i % 3, image.tobytes()) for i, image in enumerate(TFDS_IMAGES))
    iterator, _ = make_iterator(config, global_batch_size=4, seed=0)
    assert_batch(next(iterator), 4, (8, 8, 3))


def test_tfds_errors(tfds_dir, tmp_path):
    with pytest.raises(ValueError, match="TFDS dataset 'jaxdiff_nope' not found"):
        make_source(data_config(source='tfds', tfds_name='jaxdiff_nope', path=tfds_dir))
    with pytest.raises(ValueError, match="TFDS dataset 'mnist' is not prepared .*tfds build mnist"):
        make_source(data_config(source='tfds', tfds_name='mnist', path=str(tmp_path)))
    with pytest.raises(ValueError, match="no split 'test'"):
        make_source(data_config(source='tfds', tfds_name='jaxdiff_tiny', path=tfds_dir, split='test'))


def test_tfds_not_installed(monkeypatch):
    monkeypatch.setitem(__import__('sys').modules, 'tensorflow_datasets', None)
    with pytest.raises(ValueError, match=r"pip install 'jaxdiff\[tfds\]'"):
        make_source(data_config(source='tfds', tfds_name='cifar10'))


# ---- pipeline ----------------------------------------------------------------------------------------------------

def test_iterator_digits():
    iterator, info = make_iterator(data_config(source='digits', resolution=16), global_batch_size=32, seed=0)
    assert info == (16, 1, 10, 1797)
    for batch in take(iterator, 3):
        assert_batch(batch, 32, (16, 16, 1))
        assert batch['image'].min() == -1 and batch['label'].max() <= 9


def global_batches(config, batch, seed, processes, steps, state=None):
    """The global batches of ``steps`` steps read by ``processes`` hosts (their slices side by side)."""
    iterators = [make_iterator(config, global_batch_size=batch, seed=seed, process_index=p,
                               process_count=processes)[0] for p in range(processes)]
    for iterator in iterators:
        if state is not None:
            iterator.set_state(state)
    return [np.concatenate([indices(next(it)) for it in iterators]) for _ in range(steps)]


def test_global_batches_do_not_depend_on_the_process_count(tmp_path):
    config = data_config(source='npz', path=index_npz(tmp_path))
    one = global_batches(config, 10, 3, 1, 10)  # 50 images, 5 global batches an epoch
    for processes in (2, 5):
        for want, got in zip(one, global_batches(config, 10, 3, processes, 10)):
            np.testing.assert_array_equal(got, want)
    seen = np.concatenate(one)
    assert sorted(seen[:50]) == sorted(seen[50:]) == list(range(50))  # each epoch covers the data once ...
    assert not np.array_equal(seen[:50], seen[50:])                      # ... reshuffled


def test_resume_on_another_process_count(tmp_path):
    config = data_config(source='npz', path=index_npz(tmp_path), xflip=True)
    iterator, _ = make_iterator(config, global_batch_size=8, seed=5)
    take(iterator, 7)
    state = json.loads(json.dumps(iterator.get_state()))
    want = [indices(b) for b in take(iterator, 12)]
    for got, expected in zip(global_batches(config, 8, 5, 4, 12, state), want):
        np.testing.assert_array_equal(got, expected)


def test_deterministic_given_seed(tmp_path):
    config = data_config(source='npz', path=index_npz(tmp_path))
    order = lambda seed: np.concatenate([indices(b) for b in take(make_iterator(config, global_batch_size=10, seed=seed)[0], 5)])
    np.testing.assert_array_equal(order(0), order(0))
    assert not np.array_equal(order(0), order(1))
    config.shuffle_seed = 7  # overrides the top-level seed
    np.testing.assert_array_equal(order(0), order(1))


def test_resume_from_state(tmp_path):
    config = data_config(source='npz', path=index_npz(tmp_path), xflip=True)
    iterator, _ = make_iterator(config, global_batch_size=8, seed=5)
    take(iterator, 7)
    state = json.loads(json.dumps(iterator.get_state()))
    expected = take(iterator, 20)
    resumed, _ = make_iterator(config, global_batch_size=8, seed=5)
    resumed.set_state(state)
    for want, got in zip(expected, take(resumed, 20)):
        np.testing.assert_array_equal(want['image'], got['image'])
        np.testing.assert_array_equal(want['label'], got['label'])


def test_xflip_doubles_the_data(tmp_path):
    images = np.random.default_rng(4).integers(0, 256, (6, 4, 4), dtype=np.uint8)
    np.savez(tmp_path / 'x.npz', images=images)
    iterator, info = make_iterator(data_config(source='npz', path=str(tmp_path / 'x.npz'), xflip=True),
                                   global_batch_size=12, seed=0)
    epoch = np.round((next(iterator)['image'][..., 0] + 1) * 127.5).astype(np.uint8)
    expected = np.concatenate([images, images[:, :, ::-1]])
    assert info.size == 6 and sorted(map(bytes, epoch)) == sorted(map(bytes, expected))


def test_batch_must_divide_by_process_count():
    with pytest.raises(ValueError, match='multiple of the process count'):
        make_iterator(data_config(), global_batch_size=10, seed=0, process_count=3)


def test_worker_processes_give_the_same_batches(tmp_path):
    config = data_config(source='npz', path=index_npz(tmp_path))
    plain = take(make_iterator(config, global_batch_size=10, seed=2)[0], 6)
    config.worker_count = 2
    workers = take(make_iterator(config, global_batch_size=10, seed=2)[0], 6)
    for want, got in zip(plain, workers):
        np.testing.assert_array_equal(want['image'], got['image'])


def test_sample_shards_read_on_demand_equal_the_loaded_folder(tmp_path):
    from jaxdiff.data.sample_shards import ShardImages
    from jaxdiff.sampling import shards
    rng = np.random.default_rng(0)
    for k, n in enumerate((5, 7, 3)):  # shards of unequal length, as a filtered folder has
        shards.write_shard(str(tmp_path), k, rng.integers(0, 256, (n, 4, 4, 3), dtype=np.uint8),
                           rng.integers(0, 10, n), np.arange(n) + 100 * k, 10)
    loaded = shards.load_samples(str(tmp_path), allow_incomplete=True)  # shards written by hand: no manifest
    reader = ShardImages(str(tmp_path))
    picks = rng.integers(0, 15, 40)
    np.testing.assert_array_equal(reader[picks], loaded['images'][picks])
    np.testing.assert_array_equal(reader.labels, loaded['labels'])
    assert len(reader) == 15 and reader.shape == (4, 4, 3) and reader[[]].shape == (0, 4, 4, 3)
    with pytest.raises(IndexError, match='out of range'):
        reader[[15]]
    reader.close()
    compressed = tmp_path / 'compressed'
    compressed.mkdir()
    np.savez_compressed(compressed / 'shard-00000.npz', images=np.zeros((2, 4, 4, 3), np.uint8),
                        labels=np.zeros(2, np.int32), seeds=np.arange(2))
    with pytest.raises(ValueError, match='compressed; random access needs np.savez'):
        ShardImages(str(compressed))
