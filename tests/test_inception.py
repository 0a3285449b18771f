"""FID Inception-v3: shapes, size against pytorch-fid's network, weight-file round trip, errors, preprocessing.

No torch: the weights file is written in torch.save's zip and legacy formats by tests/edm_pickle_writer.py. Parity with
pytorch-fid itself (torch features on the same random weights) was checked by hand, as the module docstring says;
the constants below that come from torch say how they were obtained.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from edm_pickle_writer import Global, dumps, legacy_save, tensors, torch_zip
from jaxdiff.metrics.inception import (WEIGHTS_FILE, FIDInceptionV3, from_torch_state_dict, inception_features,
                                       load_fid_inception, preprocess, to_torch_state_dict)
from jaxdiff.nets.safe_unpickle import UnsafePickleError

# From torch 2.13 / torchvision 0.28 / pytorch-fid 0.3.0: pytorch_fid.inception.fid_inception_v3() with the
# weight download patched out; sum(p.numel() for p in net.parameters()), the numel of its BN running_mean and
# running_var buffers, len(net.state_dict()) (566, of which 94 are num_batches_tracked), and a few key shapes.
TORCH_PARAMETERS = 23_850_960
TORCH_RUNNING_STATS = 34_432
TORCH_KEYS = 566 - 94
TORCH_SHAPES = {'Conv2d_1a_3x3.conv.weight': (32, 3, 3, 3), 'Mixed_6b.branch7x7_2.conv.weight': (128, 128, 1, 7),
                'Mixed_7c.branch3x3dbl_3b.conv.weight': (384, 384, 3, 1),
                'Mixed_7c.branch_pool.conv.weight': (192, 2048, 1, 1), 'fc.weight': (1008, 2048)}


@pytest.fixture(scope='module')
def abstract():
    return jax.eval_shape(FIDInceptionV3().init, jax.random.key(0), jnp.zeros((1, 299, 299, 3)))


def random_variables(abstract, seed: int = 0) -> dict:
    """Random values in every leaf of the network's abstract variables, BN statistics included, scaled so
    activations stay O(1); drawn in numpy (a Flax init would compile the whole 299x299 network first)."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name, shape = path[-1].key, leaf.shape
        if name == 'weight' and len(shape) > 1:  # conv HWIO / fc (in, out): He scale on the fan-in
            value = rng.standard_normal(shape) * math.sqrt(2 / math.prod(shape[:-1]))
        elif name in ('weight', 'running_var'):
            value = rng.uniform(0.5, 1.5, shape)
        else:
            value = rng.normal(0, 0.1, shape)
        return value.astype(np.float32)
    return jax.tree_util.tree_map_with_path(draw, abstract)


@pytest.fixture(scope='module')
def variables(abstract):
    return random_variables(abstract)


@pytest.fixture(scope='module')
def images():
    return np.random.default_rng(1).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)


@pytest.fixture(scope='module')
def features(variables, images):
    return inception_features(variables, images)


def test_output_shapes(abstract, features):
    for shape in ((2, 32, 32, 3), (2, 28, 28, 1)):
        out = jax.eval_shape(inception_features, abstract, jax.ShapeDtypeStruct(shape, jnp.uint8))
        assert {k: (v.shape, v.dtype) for k, v in out.items()} == {
            'pool': ((2, 2048), jnp.float32), 'logits': ((2, 1008), jnp.float32)}
    assert features['pool'].shape == (2, 2048) and features['logits'].shape == (2, 1008)
    assert np.isfinite(features['pool']).all() and np.isfinite(features['logits']).all()
    assert (features['pool'] >= 0).all()  # a mean of ReLU outputs


def test_size_and_keys_match_pytorch_fid(abstract):
    assert sum(leaf.size for leaf in jax.tree.leaves(abstract['params'])) == TORCH_PARAMETERS
    assert sum(leaf.size for leaf in jax.tree.leaves(abstract['batch_stats'])) == TORCH_RUNNING_STATS
    sd = to_torch_state_dict(jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract))
    assert len(sd) == TORCH_KEYS
    assert {k: sd[k].shape for k in TORCH_SHAPES} == TORCH_SHAPES


def write_torch_legacy(path, state_dict):
    """torch.save(state_dict, path, _use_new_zipfile_serialization=False), the format of pytorch-fid's file."""
    path.write_bytes(legacy_save(tensors(state_dict)))


def write_torch_zip(path, state_dict):
    """torch.save(state_dict, path) in the zip format."""
    torch_zip(tensors(state_dict), path)


@pytest.mark.parametrize('write', [write_torch_zip, write_torch_legacy])
def test_weights_file_round_trip(tmp_path, variables, images, features, write):
    sd = to_torch_state_dict(variables)
    # the real file also carries BN step counters: 0-d int64 tensors that must be ignored
    counters = {k.replace('running_mean', 'num_batches_tracked'): np.array(0, np.int64)
                for k in sd if k.endswith('running_mean')}
    path = tmp_path / WEIGHTS_FILE
    write(path, {**sd, **counters})
    loaded = load_fid_inception(path)
    assert jax.tree.structure(loaded) == jax.tree.structure(variables)
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(variables)):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)
    out = inception_features(loaded, images)
    for key in ('pool', 'logits'):
        np.testing.assert_array_equal(out[key], features[key])


def test_mismatched_state_dicts_raise_one_error_naming_keys(variables):
    sd = to_torch_state_dict(variables)
    missing = {k: v for k, v in sd.items() if k != 'Mixed_6e.branch_pool.bn.running_var'}
    with pytest.raises(ValueError, match=r'1 missing: Mixed_6e\.branch_pool\.bn\.running_var.*' + WEIGHTS_FILE):
        from_torch_state_dict(missing)
    with pytest.raises(ValueError, match=r'1 mis-shaped: fc\.weight \(2048, 1008\) \(expected \(1008, 2048\)\)'):
        from_torch_state_dict({**sd, 'fc.weight': sd['fc.weight'].T})
    with pytest.raises(ValueError, match=r'1 unexpected: AuxLogits\.fc\.weight'):
        from_torch_state_dict({**sd, 'AuxLogits.fc.weight': np.zeros((1008, 768), np.float32)})
    with pytest.raises(ValueError, match=r'472 missing: \S+, \S+, \S+, \S+ and 468 more'):
        from_torch_state_dict({})


def test_unreadable_weights_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=WEIGHTS_FILE):
        load_fid_inception(tmp_path / 'absent.pth')
    garbage = tmp_path / 'garbage.pth'
    garbage.write_bytes(b'\x80\x02not a pickle')
    with pytest.raises(ValueError, match='not a readable torch state dict'):
        load_fid_inception(garbage)
    evil = tmp_path / 'evil.pth'
    evil.write_bytes(dumps({'fc.weight': Global('os', 'system')}, protocol=2))
    with pytest.raises(UnsafePickleError, match='os.system'):
        load_fid_inception(evil)


def torch_bilinear(x, size):
    """Independent float64 reference of torch's F.interpolate(bilinear, align_corners=False): (B, H, W, C)."""
    def taps(n):
        src = np.maximum((np.arange(size) + 0.5) * n / size - 0.5, 0)
        lo = np.minimum(np.floor(src).astype(int), n - 1)
        return lo, np.minimum(lo + 1, n - 1), src - lo
    (y0, y1, wy), (x0, x1, wx) = taps(x.shape[1]), taps(x.shape[2])
    wy, wx = wy[None, :, None, None], wx[None, None, :, None]
    rows = [(1 - wx) * r[:, :, x0] + wx * r[:, :, x1] for r in (x[:, y0], x[:, y1])]
    return (1 - wy) * rows[0] + wy * rows[1]


# A float32 source index is off from this float64 reference by up to ~n * 2^-24 pixels, as torch's is; the
# 311 -> 299 downscale is therefore checked loosely here, its float32 rounding by the test below.
@pytest.mark.parametrize('shape, atol', [((2, 8, 8, 3), 1e-6), ((1, 5, 7, 3), 1e-6), ((1, 1, 1, 3), 1e-6),
                                         ((1, 300, 311, 1), 2e-4)])
def test_preprocess_matches_torch_formula(shape, atol):
    img = np.random.default_rng(2).integers(0, 256, shape, dtype=np.uint8)
    expected = 2 * torch_bilinear(img / 255, 299) - 1
    expected = np.broadcast_to(expected, (*expected.shape[:3], 3))
    got = np.asarray(preprocess(img))
    assert got.shape == (shape[0], 299, 299, 3) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=0, atol=atol)


def test_preprocess_rounds_like_torch():
    # torch 2.13 CPU: (F.interpolate(row / 255, (299, 299), mode='bilinear') * 2 - 1) of an alternating 0/255
    # row of 512 pixels, at columns whose float32 source index differs with and without a fused multiply-add.
    torch_values = {2: -0.5618729591369629, 9: -0.5351161956787109, 37: -0.42809295654296875}
    row = np.where(np.arange(512) % 2, 255, 0).astype(np.uint8).reshape(1, 1, 512, 1)
    got = np.asarray(preprocess(row))[0, 0, list(torch_values), 0]
    np.testing.assert_allclose(got, list(torch_values.values()), rtol=0, atol=2e-7)


def test_preprocess_grey_and_dtype():
    grey = np.random.default_rng(3).integers(0, 256, (2, 6, 6, 1), dtype=np.uint8)
    np.testing.assert_array_equal(preprocess(grey), preprocess(np.repeat(grey, 3, axis=-1)))
    with pytest.raises(ValueError, match='uint8 images'):
        preprocess(grey.astype(np.float32))
    with pytest.raises(ValueError, match='uint8 images'):
        preprocess(np.zeros((2, 6, 6, 4), np.uint8))
