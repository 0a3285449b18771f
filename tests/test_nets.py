"""Tests for jaxdiff.nets: exact EDM parameter counts, torch-style naming, options, dropout, dtypes, tracing.

Numerical parity with the torch reference is checked by hand (see the nets report); these tests stay torch-free.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from jaxdiff.nets import DhariwalUNet, SongUNet

B = 2
TINY = dict(img_resolution=8, in_channels=3, out_channels=2, label_dim=4, augment_dim=2, model_channels=8,
            channel_mult=(1, 2), num_blocks=1, attn_resolutions=(4,))
SONG_OPTIONS = {
    'ddpmpp': dict(embedding_type='positional', encoder_type='standard', decoder_type='standard',
                   resample_filter=(1, 1)),
    'ncsnpp': dict(embedding_type='fourier', channel_mult_noise=2, encoder_type='residual',
                   decoder_type='standard', resample_filter=(1, 3, 3, 1)),
    'skip_skip': dict(embedding_type='positional', encoder_type='skip', decoder_type='skip',
                      resample_filter=(1, 3, 3, 1)),
    'residual_skip': dict(embedding_type='fourier', encoder_type='residual', decoder_type='skip',
                          resample_filter=(1, 1)),
}
# 32 channels -> no attention heads at 8x8, 64 -> one head at 4x4 (EDM's 64 channels per head).
TINY_ADM = dict(TINY, model_channels=32, attn_resolutions=(8, 4))

DDPMPP_CIFAR = dict(img_resolution=32, in_channels=3, out_channels=3, model_channels=128, channel_mult=(2, 2, 2),
                    channel_mult_emb=4, num_blocks=4, attn_resolutions=(16,), dropout=0.13,
                    embedding_type='positional', channel_mult_noise=1, encoder_type='standard',
                    decoder_type='standard', resample_filter=(1, 1))
NCSNPP_CIFAR = dict(DDPMPP_CIFAR, embedding_type='fourier', channel_mult_noise=2, encoder_type='residual',
                    resample_filter=(1, 3, 3, 1))


def inputs(net, seed=0):
    """Random (x, noise_labels, class_labels, augment_labels) for ``net`` with batch B."""
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(k1, (B, net.img_resolution, net.img_resolution, net.in_channels))
    labels = jax.nn.one_hot(jnp.arange(B) % max(net.label_dim, 1), net.label_dim) if net.label_dim else None
    augment = jax.random.normal(k3, (B, net.augment_dim)) if net.augment_dim else None
    return x, jax.random.normal(k2, (B,)), labels, augment


def abstract_variables(net):
    """Variable shapes of ``net`` without allocating them."""
    return jax.eval_shape(lambda: net.init(jax.random.key(0), *inputs(net)))


def count(tree) -> int:
    """Number of scalars in a pytree of arrays or shape structs."""
    return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(tree))


@pytest.mark.parametrize('net, expected', [
    (SongUNet(label_dim=10, augment_dim=9, **DDPMPP_CIFAR), 55_735_299),
    (SongUNet(**DDPMPP_CIFAR), 55_732_739),
    (SongUNet(label_dim=10, **DDPMPP_CIFAR), 55_734_147),
    (SongUNet(**NCSNPP_CIFAR), 56_395_523),
    (DhariwalUNet(img_resolution=64, in_channels=3, out_channels=3, label_dim=1000, model_channels=192,
                  channel_mult=(1, 2, 3, 4), num_blocks=3, attn_resolutions=(32, 16, 8)), 295_899_267),
], ids=['ddpmpp_cond', 'ddpmpp_uncond', 'ddpmpp_label', 'ncsnpp_uncond', 'adm_imagenet64_cond'])
def test_parameter_count_matches_reference(net, expected):
    assert count(abstract_variables(net)['params']) == expected


def test_torch_style_names_and_layouts():
    net = SongUNet(**TINY, **SONG_OPTIONS['ncsnpp'])
    variables = abstract_variables(net)
    flat = {'.'.join(path): leaf.shape for path, leaf in traverse_util.flatten_dict(variables['params']).items()}
    assert {key.rsplit('.', 1)[1] for key in flat} == {'weight', 'bias'}
    assert flat['map_layer0.weight'] == (16, 32)                  # linear: (in, out)
    assert flat['enc.8x8_conv.weight'] == (3, 3, 3, 8)            # conv: HWIO
    assert flat['enc.4x4_aux_residual.weight'] == (3, 3, 3, 8)  # from the image's 3 channels
    assert flat['enc.4x4_down.skip.weight'] == (1, 1, 8, 8)       # resample_proj=True in SongUNet
    assert flat['dec.4x4_in0.qkv.weight'] == (1, 1, 16, 48)
    assert flat['dec.8x8_aux_norm.bias'] == (8,)
    assert flat['dec.8x8_aux_conv.weight'] == (3, 3, 8, 2)
    assert 'map_label.bias' in flat and 'map_augment.bias' not in flat
    assert not any('map_noise' in key or 'resample_filter' in key for key in flat)
    assert jax.tree_util.tree_map(lambda leaf: leaf.shape, variables['buffers']) == {'map_noise': {'freqs': (8,)}}


@pytest.mark.parametrize('options', SONG_OPTIONS.values(), ids=SONG_OPTIONS.keys())
def test_song_unet_runs_every_option(options):
    net = SongUNet(**TINY, **options)
    args = inputs(net)
    y = jax.jit(net.apply)(random_variables(net), *args)
    assert y.shape == (B, 8, 8, 2) and y.dtype == jnp.float32
    assert bool(jnp.isfinite(y).all())


def test_dhariwal_unet_runs_and_drops_attention_below_64_channels():
    net = DhariwalUNet(**TINY_ADM)
    names = {'.'.join(path) for path in traverse_util.flatten_dict(abstract_variables(net)['params'])}
    assert 'enc.4x4_block0.qkv.weight' in names and 'enc.8x8_block0.qkv.weight' not in names
    y = jax.jit(net.apply)(random_variables(net), *inputs(net))
    assert y.shape == (B, 8, 8, 2) and y.dtype == jnp.float32
    assert bool(jnp.isfinite(y).all())


def test_init_gives_float32_params_and_adm_starts_at_zero():
    # One level only: init's per-parameter RNG makes it slow to compile on CPU.
    net = DhariwalUNet(**dict(TINY_ADM, channel_mult=(1,), model_channels=64))
    args = inputs(net)
    variables = jax.jit(net.init)(jax.random.key(0), *args)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(variables))
    # out_conv is zero-initialised, so a fresh ADM outputs exactly zero.
    assert float(jnp.abs(jax.jit(net.apply)(variables, *args)).max()) == 0.0


def random_variables(net, seed=1):
    """Non-degenerate variables of the right shapes, without running init (EDM zero-inits some layers, which
    would hide bugs, and init is slow to compile on CPU)."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda leaf: jnp.asarray(0.3 * rng.standard_normal(leaf.shape), jnp.float32),
                                  abstract_variables(net))


@pytest.mark.parametrize('cls, extra', [(SongUNet, SONG_OPTIONS['ddpmpp']), (DhariwalUNet, {})],
                         ids=['song', 'dhariwal'])
def test_label_dropout_one_equals_zero_labels(cls, extra):
    config = dict(TINY_ADM if cls is DhariwalUNet else TINY, **extra)
    net = cls(**config, dropout=0.0, label_dropout=1.0)
    x, noise, labels, augment = inputs(net)
    variables = random_variables(net)
    apply = jax.jit(net.apply, static_argnames='train')
    dropped = apply(variables, x, noise, labels, augment, train=True, rngs={'dropout': jax.random.key(3)})
    zeros = apply(variables, x, noise, jnp.zeros_like(labels), augment, train=False)
    kept = apply(variables, x, noise, labels, augment, train=False)
    np.testing.assert_allclose(dropped, zeros, atol=1e-5)
    assert float(jnp.abs(kept - zeros).max()) > 1e-3


def test_train_false_is_deterministic_and_train_true_is_not():
    net = SongUNet(**TINY, **SONG_OPTIONS['ddpmpp'], dropout=0.5, label_dropout=0.5)
    args = inputs(net)
    variables = random_variables(net)
    apply = jax.jit(net.apply, static_argnames='train')
    eval_a = apply(variables, *args, train=False, rngs={'dropout': jax.random.key(1)})
    eval_b = apply(variables, *args, train=False, rngs={'dropout': jax.random.key(2)})
    np.testing.assert_array_equal(eval_a, eval_b)
    train_a = apply(variables, *args, train=True, rngs={'dropout': jax.random.key(1)})
    train_b = apply(variables, *args, train=True, rngs={'dropout': jax.random.key(2)})
    assert float(jnp.abs(train_a - train_b).max()) > 1e-3


def test_bfloat16_compute_keeps_float32_params():
    config = dict(TINY, **SONG_OPTIONS['ncsnpp'])
    net16 = SongUNet(**config, dtype=jnp.bfloat16)
    args = inputs(net16)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(abstract_variables(net16)))
    variables = random_variables(net16)
    y16 = jax.jit(net16.apply)(variables, *args)
    y32 = jax.jit(SongUNet(**config).apply)(variables, *args)
    assert y16.dtype == jnp.bfloat16
    rel = float(jnp.abs(y16.astype(jnp.float32) - y32).max() / jnp.abs(y32).max())
    assert rel < 0.05, rel


def test_jits_once_per_shape():
    net = SongUNet(**TINY, **SONG_OPTIONS['skip_skip'])
    variables = random_variables(net)
    traces = []

    @jax.jit
    def forward(variables, x, noise, labels, augment):
        traces.append(x.shape)
        return net.apply(variables, x, noise, labels, augment)

    forward(variables, *inputs(net, seed=1))
    forward(variables, *inputs(net, seed=2))
    assert len(traces) == 1
    x, noise, labels, augment = inputs(net, seed=3)
    forward(variables, x[:1], noise[:1], labels[:1], augment[:1])
    assert len(traces) == 2


def test_bad_inputs_raise_clear_errors():
    net = SongUNet(**TINY)
    x, noise, labels, augment = inputs(net)
    with pytest.raises(ValueError, match='class_labels is None'):
        jax.eval_shape(lambda: net.init(jax.random.key(0), x, noise, None, augment))
    with pytest.raises(ValueError, match='NHWC'):
        jax.eval_shape(lambda: net.init(jax.random.key(0), x.transpose(0, 3, 1, 2), noise, labels, augment))
    with pytest.raises(ValueError, match='encoder_type'):
        bad = SongUNet(**TINY, encoder_type='progressive')
        jax.eval_shape(lambda: bad.init(jax.random.key(0), x, noise, labels, augment))
