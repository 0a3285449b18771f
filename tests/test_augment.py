"""EDM's non-leaky augmentation: identity at p=0, flips, resampling, label layout, EDM golden values, jit once."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.data import AUGMENT_DIM, augment_pipe, resample
from jaxdiff.data.augment import _augment, rotate2d, scale2d, translate2d

GEOMETRIC_OFF = dict(scale=0, rotate_frac=0, aniso=0, translate_frac=0)
ONLY = {  # label columns each transform may set
    'xflip': [0], 'yflip': [1], 'scale': [2], 'rotate_frac': [3, 4], 'aniso': [5, 6], 'translate_frac': [7, 8]}


def images(shape=(8, 16, 16, 3), seed=0):
    """Random float32 images in [-1, 1]."""
    return jnp.asarray(np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32))


def only(name):
    """Probability multipliers enabling ``name`` alone (with weight 1)."""
    return {other: float(other == name) for other in ONLY}


def test_p0_is_identity():
    x = images()
    out, labels = augment_pipe(jax.random.key(0), x, 0.0)
    np.testing.assert_array_equal(out, x)
    assert labels.shape == (8, AUGMENT_DIM) and labels.dtype == jnp.float32 and not labels.any()


def test_xflip_only_flips_exactly():
    x = images((64, 4, 6, 2))
    out, labels = augment_pipe(jax.random.key(1), x, 1.0, **only('xflip'))
    flipped = labels[:, 0] == 1
    assert 10 < flipped.sum() < 54 and set(np.unique(labels[:, 0])) == {0.0, 1.0} and not labels[:, 1:].any()
    np.testing.assert_array_equal(out[flipped], x[flipped][:, :, ::-1])
    np.testing.assert_array_equal(out[~flipped], x[~flipped])


def test_yflip_only_flips_exactly():
    x = images((32, 5, 5, 1))
    out, labels = augment_pipe(jax.random.key(2), x, 1.0, **only('yflip'))
    flipped = labels[:, 1] == 1
    np.testing.assert_array_equal(out[flipped], x[flipped][:, ::-1])
    np.testing.assert_array_equal(out[~flipped], x[~flipped])


@pytest.mark.parametrize('tx, ty', [(2, -3), (0, 5), (-4, 1)])
def test_integer_translation_is_a_reflect_padded_shift(tx, ty):
    x = images((2, 12, 10, 3))
    out = resample(x, translate2d(jnp.full(2, -tx), jnp.full(2, -ty)))
    pad = 6
    padded = np.pad(np.asarray(x), ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode='reflect')
    expected = padded[:, pad - ty:pad - ty + 12, pad - tx:pad - tx + 10]
    np.testing.assert_allclose(out, expected, atol=2e-6)


def test_resample_identity():
    x = images((3, 8, 8, 1))
    np.testing.assert_allclose(resample(x, jnp.broadcast_to(jnp.eye(3), (3, 3, 3))), x, atol=1e-6)


@pytest.mark.parametrize('name', sorted(ONLY))
def test_label_layout(name):
    _, labels = augment_pipe(jax.random.key(3), images((64, 8, 8, 1)), 1.0, **only(name))
    others = [c for c in range(AUGMENT_DIM) if c not in ONLY[name]]
    assert not labels[:, others].any() and labels[:, ONLY[name]].any()
    if name == 'rotate_frac':  # cos(theta) - 1, sin(theta)
        np.testing.assert_allclose((labels[:, 3] + 1) ** 2 + labels[:, 4] ** 2, 1, atol=1e-5)


def test_probabilities_match_edm():
    _, labels = augment_pipe(jax.random.key(4), images((4000, 4, 4, 1)), 0.5)
    fired = np.asarray(labels != 0)
    rates = [fired[:, 0].mean(), fired[:, 1].mean()] + [fired[:, ONLY[n]].any(1).mean() for n in
                                                         ('scale', 'rotate_frac', 'aniso', 'translate_frac')]
    # xflip multiplier 1e8: always gated in, a fair coin; yflip: gate p=0.5 then a coin; the others fire with p.
    np.testing.assert_allclose(rates, [0.5, 0.25, 0.5, 0.5, 0.5, 0.5], atol=0.04)


def test_output_finite_any_shape():
    for shape in [(2, 8, 12, 1), (3, 5, 7, 4)]:
        out, labels = augment_pipe(jax.random.key(5), images(shape), 1.0)
        assert out.shape == shape and out.dtype == jnp.float32 and labels.shape == (shape[0], AUGMENT_DIM)
        assert jnp.isfinite(out).all() and jnp.isfinite(labels).all()


def test_deterministic_and_jits_once():
    x = images()
    augment_pipe(jax.random.key(6), x, 0.12)
    before = _augment._cache_size()
    first = augment_pipe(jax.random.key(7), x, 0.3)
    again = augment_pipe(jax.random.key(7), x, 0.3)
    assert _augment._cache_size() == before
    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_array_equal(first[1], again[1])


def test_inside_an_outer_jit():
    x = images((2, 8, 8, 3))
    out, labels = jax.jit(lambda key, x, p: augment_pipe(key, x, p))(jax.random.key(8), x, 0.5)
    direct = augment_pipe(jax.random.key(8), x, 0.5)
    np.testing.assert_allclose(out, direct[0], atol=1e-6)
    np.testing.assert_array_equal(labels, direct[1])


def test_unknown_setting():
    with pytest.raises(ValueError, match='unknown augment settings'):
        augment_pipe(jax.random.key(0), images(), 0.1, lumaflip=1)


# Golden values from NVlabs/edm's PyTorch AugmentPipe(p=1, xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1,
# translate_frac=1, aniso_rotate_prob=0) on the two images of golden_input(): its labels and output images.
GOLDEN_LABELS = [
    [0.0, 0.0, 0.04618244990706444, -1.942620038986206, -0.3338676691055298, 0.11463188380002975, 0.0,
     0.41921865940093994, 0.9264108538627625],
    [0.0, 0.0, -1.3682591915130615, -0.03235292434692383, -0.2523077130317688, -0.6321689486503601, 0.0,
     -0.0798543244600296, 0.8156775236129761]]
GOLDEN_OUTPUT = [
    [[0.685368, 0.068717, -0.588278, -0.970505, -0.867969, -0.451892, 0.279182, -0.231589],
     [0.940196, 0.695304, 0.045354, -0.623309, -0.965661, -0.636748, 0.333768, 0.555770],
     [0.663962, 0.981179, 0.321599, -0.605918, -0.968551, -0.445731, 0.451866, 0.924755],
     [0.617838, 0.895102, 0.132539, -0.728566, -0.964223, -0.391421, 0.508036, 0.994818],
     [0.883740, 0.798723, 0.086388, -0.758580, -0.939670, -0.324261, 0.586553, 0.984644],
     [0.956481, 0.786443, -0.003906, -0.806775, -0.920122, -0.246428, 0.629571, 1.013198],
     [0.668382, 0.807308, -0.071194, -0.855349, -0.885726, -0.175114, 0.663344, 1.026458],
     [0.028732, 0.631360, -0.055476, -0.909753, -0.867336, -0.111465, 0.730948, 0.976580]],
    [[0.816206, 0.954945, 0.902130, 0.948969, 0.996725, 1.021330, 0.994021, 0.949866],
     [0.935029, 0.852031, 0.950386, 0.855319, 0.642087, 0.504153, 0.485438, 0.504725],
     [0.318384, 0.188949, 0.613176, 0.965148, 0.841431, 0.356856, -0.204659, -0.330139],
     [-0.576029, -0.632108, -0.080176, 0.535369, 0.935384, 0.987101, 0.542992, 0.282519],
     [-0.973107, -0.966887, -0.737944, -0.197168, 0.426838, 0.874872, 0.967154, 0.962766],
     [-0.577592, -0.711762, -0.983986, -0.802766, -0.304891, 0.317576, 0.809155, 0.759813],
     [0.401402, -0.041267, -0.693675, -1.011625, -0.891431, -0.417709, 0.072410, -0.067216],
     [0.514974, 0.427808, 0.068197, -0.469780, -0.899425, -0.921272, -0.767557, -0.860031]]]


def golden_input():
    """Two smooth 8x8 one-channel images, (2, 8, 8, 1)."""
    yy, xx = np.mgrid[0:8, 0:8]
    return np.stack([np.sin(xx * 0.9 + yy * 0.4), np.cos(xx * 0.3 - yy * 0.8)])[..., None].astype(np.float32)


def test_resample_matches_edm_golden_values():
    labels = np.asarray(GOLDEN_LABELS, np.float32)
    s, a = 2 ** (0.2 * labels[:, 2]), 2 ** (0.2 * labels[:, 5])  # r = 0: aniso label is (w, 0)
    theta = np.arctan2(labels[:, 4], labels[:, 3] + 1)
    shift = labels[:, 7:9] * 8 * 0.125
    G_inv = scale2d(1 / s, 1 / s) @ rotate2d(theta) @ scale2d(1 / a, a) @ translate2d(-shift[:, 0], -shift[:, 1])
    out = resample(jnp.asarray(golden_input()), G_inv)
    np.testing.assert_allclose(out[..., 0], GOLDEN_OUTPUT, atol=2e-5)
