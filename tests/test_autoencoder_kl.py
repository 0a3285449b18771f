"""AutoencoderKL (SD's VAE) and its diffusers converter.

The independent truth is a float64 numpy re-implementation of diffusers' encoder and decoder below, written from
torch semantics (NCHW, OIHW convs, (out, in) linears) and fed the torch-layout state dict directly. Parity with
diffusers itself was checked by hand (outside the test suite, which has no torch).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from edm_pickle_writer import Storage, Tensor, tensors, torch_zip
from jaxdiff.nets.autoencoder_kl import AutoencoderKL, latent_sample
from jaxdiff.nets.convert_autoencoder import abstract_params, from_diffusers, read_state_dict, to_diffusers

SMALL = dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, latent_channels=4)
ATTN = 'encoder.mid_block.attentions.0.'


@pytest.fixture(scope='module')
def net():
    return AutoencoderKL(**SMALL)


@pytest.fixture(scope='module')
def state_dict(net):
    """Random torch-layout weights at a scale where every layer matters: weights N(0, 1/fan_in), GroupNorm
    scales 1 + 0.1 N, biases 0.1 N."""
    rng = np.random.default_rng(0)
    shapes = to_diffusers(jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract_params(net)))
    out = {}
    for key, a in shapes.items():
        if key.endswith('bias'):
            out[key] = 0.1 * rng.standard_normal(a.shape)
        elif 'norm' in key:
            out[key] = 1 + 0.1 * rng.standard_normal(a.shape)
        else:
            out[key] = rng.standard_normal(a.shape) / np.sqrt(np.prod(a.shape[1:]))
    return {k: v.astype(np.float32) for k, v in out.items()}


@pytest.fixture(scope='module')
def variables(net, state_dict):
    return from_diffusers(state_dict, net)


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def max_rel(a, b):
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


# ---------------------------------------------------------------- numpy reference (NCHW, float64)

def conv(sd, name, x, pad=1, stride=1):
    """torch conv2d; ``pad`` an int (symmetric) or ((top, bottom), (left, right))."""
    w, b = sd[name + '.weight'].astype(np.float64), sd[name + '.bias'].astype(np.float64)
    pads = ((pad, pad), (pad, pad)) if isinstance(pad, int) else pad
    x = np.pad(x, ((0, 0), (0, 0), *pads))
    k = w.shape[-1]
    ho, wo = (x.shape[2] - k) // stride + 1, (x.shape[3] - k) // stride + 1
    out = sum(np.einsum('bchw,oc->bohw', x[:, :, i:i + stride * (ho - 1) + 1:stride,
                                         j:j + stride * (wo - 1) + 1:stride], w[:, :, i, j])
              for i in range(k) for j in range(k))
    return out + b[None, :, None, None]


def group_norm(sd, name, x, groups):
    g = x.reshape(x.shape[0], groups, -1)
    g = (g - g.mean(-1, keepdims=True)) / np.sqrt(g.var(-1, keepdims=True) + 1e-6)
    return g.reshape(x.shape) * sd[name + '.weight'][None, :, None, None] + sd[name + '.bias'][None, :, None, None]


def silu(x):
    return x / (1 + np.exp(-x))


def resnet(sd, p, x, groups):
    h = conv(sd, p + 'conv1', silu(group_norm(sd, p + 'norm1', x, groups)))
    h = conv(sd, p + 'conv2', silu(group_norm(sd, p + 'norm2', h, groups)))
    return (conv(sd, p + 'conv_shortcut', x, pad=0) if p + 'conv_shortcut.weight' in sd else x) + h


def attention(sd, p, x, groups):
    b, c, h, w = x.shape
    t = group_norm(sd, p + 'group_norm', x, groups).reshape(b, c, h * w).transpose(0, 2, 1)
    lin = lambda name, t: t @ sd[p + name + '.weight'].T + sd[p + name + '.bias']
    q, k, v = lin('to_q', t), lin('to_k', t), lin('to_v', t)
    logits = q @ k.transpose(0, 2, 1) / np.sqrt(c)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    return x + lin('to_out.0', weights @ v).transpose(0, 2, 1).reshape(b, c, h, w)


def mid_block(sd, p, x, groups):
    x = resnet(sd, p + 'resnets.0.', x, groups)
    return resnet(sd, p + 'resnets.1.', attention(sd, p + 'attentions.0.', x, groups), groups)


def ref_encode(sd, x, levels, layers, groups, latent):
    x = conv(sd, 'encoder.conv_in', x)
    for i in range(levels):
        for j in range(layers):
            x = resnet(sd, f'encoder.down_blocks.{i}.resnets.{j}.', x, groups)
        if i < levels - 1:  # pad right and bottom only, then a stride-2 valid conv
            x = conv(sd, f'encoder.down_blocks.{i}.downsamplers.0.conv', x, pad=((0, 1), (0, 1)), stride=2)
    x = mid_block(sd, 'encoder.mid_block.', x, groups)
    x = conv(sd, 'encoder.conv_out', silu(group_norm(sd, 'encoder.conv_norm_out', x, groups)))
    x = conv(sd, 'quant_conv', x, pad=0)
    return x[:, :latent], np.clip(x[:, latent:], -30, 20)


def ref_decode(sd, z, levels, layers, groups):
    x = conv(sd, 'decoder.conv_in', conv(sd, 'post_quant_conv', z, pad=0))
    x = mid_block(sd, 'decoder.mid_block.', x, groups)
    for i in range(levels):
        for j in range(layers + 1):
            x = resnet(sd, f'decoder.up_blocks.{i}.resnets.{j}.', x, groups)
        if i < levels - 1:
            x = conv(sd, f'decoder.up_blocks.{i}.upsamplers.0.conv', x.repeat(2, axis=2).repeat(2, axis=3))
    return conv(sd, 'decoder.conv_out', silu(group_norm(sd, 'decoder.conv_norm_out', x, groups)))


# ---------------------------------------------------------------- network

def test_sd_config_matches_diffusers_parameter_count_and_names():
    abstract = abstract_params(AutoencoderKL())
    assert sum(int(np.prod(s.shape)) for s in jax.tree.leaves(abstract)) == 83_653_863
    shapes = {k: v.shape for k, v in to_diffusers(jax.tree.map(lambda s: np.zeros(s.shape, np.bool_),
                                                               abstract)).items()}
    assert len(shapes) == 248  # diffusers' state_dict has 248 entries
    assert shapes['encoder.conv_in.weight'] == (128, 3, 3, 3)
    assert shapes['encoder.down_blocks.0.resnets.0.norm1.weight'] == (128,)
    assert shapes['encoder.down_blocks.1.resnets.0.conv_shortcut.weight'] == (256, 128, 1, 1)
    assert shapes['encoder.down_blocks.0.downsamplers.0.conv.bias'] == (128,)
    assert 'encoder.down_blocks.3.downsamplers.0.conv.bias' not in shapes
    assert shapes[ATTN + 'to_q.weight'] == shapes[ATTN + 'to_out.0.weight'] == (512, 512)
    assert shapes[ATTN + 'group_norm.weight'] == (512,)
    assert shapes['encoder.mid_block.resnets.1.conv2.weight'] == (512, 512, 3, 3)
    assert shapes['encoder.conv_norm_out.weight'] == (512,)
    assert shapes['encoder.conv_out.weight'] == (8, 512, 3, 3)
    assert shapes['quant_conv.weight'] == (8, 8, 1, 1) and shapes['post_quant_conv.bias'] == (4,)
    assert shapes['decoder.conv_in.weight'] == (512, 4, 3, 3)
    assert shapes['decoder.up_blocks.0.upsamplers.0.conv.weight'] == (512, 512, 3, 3)
    assert shapes['decoder.up_blocks.3.resnets.2.conv2.weight'] == (128, 128, 3, 3)
    assert 'decoder.up_blocks.3.upsamplers.0.conv.weight' not in shapes
    assert shapes['decoder.conv_out.weight'] == (3, 128, 3, 3)


def test_small_config_shapes_sampling_and_logvar_clamp(net, variables):
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 28, 28, 3)), jnp.float32)
    encode = jax.jit(lambda v, x: net.apply(v, x, method=net.encode))
    decode = jax.jit(lambda v, z: net.apply(v, z, method=net.decode))
    mean, logvar = encode(variables, x)
    assert mean.shape == logvar.shape == (2, 14, 14, 4) and mean.dtype == jnp.float32
    assert decode(variables, mean).shape == (2, 28, 28, 3)

    key = jax.random.key(3)
    recon, mean2, logvar2 = jax.jit(lambda v, x, k: net.apply(v, x, k))(variables, x, key)
    np.testing.assert_allclose(mean2, mean, rtol=1e-5, atol=1e-5)
    z = latent_sample(mean, logvar, key)
    np.testing.assert_allclose(recon, decode(variables, z), rtol=1e-4, atol=1e-4)
    assert not np.allclose(z, mean)
    for kwargs in (dict(), dict(key=key, sample_posterior=False)):  # no key, or no sampling: the mean is decoded
        np.testing.assert_allclose(net.apply(variables, x, **kwargs)[0], decode(variables, mean), rtol=1e-4,
                                   atol=1e-4)

    for bias, bound in ((1e4, 20.0), (-1e4, -30.0)):
        params = jax.tree.map(np.array, variables['params'])  # a copy
        params['quant_conv']['bias'][4:] = bias  # the logvar half
        _, clamped = encode({'params': params}, x)
        np.testing.assert_array_equal(clamped, bound)


def test_odd_sizes_round_down():
    deep = AutoencoderKL(**{**SMALL, 'block_out_channels': (32, 64, 64)})
    x = jnp.zeros((1, 30, 30, 3))
    mean, _ = jax.eval_shape(lambda: deep.apply(deep.init(jax.random.key(0), x), x, method=deep.encode))
    assert mean.shape == (1, 7, 7, 4)  # 30 -> 15 -> 7


def test_groups_must_divide_widths():
    with pytest.raises(ValueError, match='norm_num_groups=16 does not divide the widths \\[24\\]'):
        abstract_params(AutoencoderKL(block_out_channels=(32, 24), norm_num_groups=16))


def test_matches_numpy_reference(net, state_dict, variables):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 3, 15, 12))  # odd and non-square: the one-sided downsampling pad matters
    z = rng.standard_normal((2, 4, 5, 6))
    levels, layers, groups = 2, SMALL['layers_per_block'], SMALL['norm_num_groups']
    ref_mean, ref_logvar = ref_encode(state_dict, x, levels, layers, groups, 4)
    ref_x = ref_decode(state_dict, z, levels, layers, groups)

    nhwc = lambda a: jnp.asarray(a.transpose(0, 2, 3, 1), jnp.float32)
    mean, logvar = net.apply(variables, nhwc(x), method=net.encode)
    decoded = net.apply(variables, nhwc(z), method=net.decode)
    assert mean.shape == (2, 7, 6, 4) and decoded.shape == (2, 10, 12, 3)
    assert max_rel(mean, ref_mean.transpose(0, 2, 3, 1)) < 1e-4
    assert max_rel(logvar, ref_logvar.transpose(0, 2, 3, 1)) < 1e-4
    assert max_rel(decoded, ref_x.transpose(0, 2, 3, 1)) < 1e-4


# ---------------------------------------------------------------- converter

def test_round_trip(net, state_dict, variables):
    back = to_diffusers(variables)
    assert back.keys() == state_dict.keys()
    for k, v in state_dict.items():
        np.testing.assert_array_equal(back[k], v)
    assert_trees_equal(from_diffusers(back, net), variables)
    assert variables['params']['encoder']['conv_in']['weight'].shape == (3, 3, 3, 32)  # HWIO
    np.testing.assert_array_equal(variables['params']['encoder']['mid_block']['attentions']['0']['to_q']['weight'],
                                  state_dict[ATTN + 'to_q.weight'].T)


def _old_style(state_dict, conv_shaped):
    """diffusers < 0.14 names for the mid-block attention; optionally 1x1-conv (q/k/v) and conv1d (proj_attn)
    shaped weights."""
    old = {}
    for key, value in state_dict.items():
        for new, name in (('to_q', 'query'), ('to_k', 'key'), ('to_v', 'value'), ('to_out.0', 'proj_attn')):
            if f'.attentions.0.{new}.' in key:
                key = key.replace(f'.{new}.', f'.{name}.')
                if conv_shaped and key.endswith('weight'):
                    value = value[:, :, None] if name == 'proj_attn' else value[:, :, None, None]
        old[key] = value
    return old


@pytest.mark.parametrize('conv_shaped', [False, True])
def test_old_attention_names_load(net, state_dict, variables, conv_shaped):
    old = _old_style(state_dict, conv_shaped)
    assert ATTN + 'query.weight' in old and ATTN + 'to_q.weight' not in old
    assert_trees_equal(from_diffusers(old, net), variables)


def _compvis(state_dict, levels):
    """CompVis/ldm names (as in SD's .ckpt files), written out from ldm's module tree."""
    out = {}
    for key, value in state_dict.items():
        half, *rest = key.split('.')
        path = '.'.join(rest)
        if rest[0] in ('down_blocks', 'up_blocks'):
            i = int(rest[1]) if half == 'encoder' else levels - 1 - int(rest[1])
            kind = {'resnets': 'block', 'downsamplers': 'downsample', 'upsamplers': 'upsample'}[rest[2]]
            tail = rest[4:] if kind != 'block' else rest[3:]
            path = '.'.join([rest[0][:-len('_blocks')], str(i), kind, *tail])
        elif rest[0] == 'mid_block' and rest[1] == 'resnets':
            path = '.'.join(['mid', f'block_{int(rest[2]) + 1}', *rest[3:]])
        elif rest[0] == 'mid_block':
            name = {'group_norm': 'norm', 'to_q': 'q', 'to_k': 'k', 'to_v': 'v', 'to_out': 'proj_out'}[rest[3]]
            path = '.'.join(['mid', 'attn_1', name, rest[-1]])
            value = value[:, :, None, None] if value.ndim == 2 else value
        elif rest and rest[0] == 'conv_norm_out':
            path = '.'.join(['norm_out', *rest[1:]])
        out['.'.join([half, path]).replace('.conv_shortcut.', '.nin_shortcut.')] = value
    return out


def test_compvis_names_load(net, state_dict, variables):
    ldm = _compvis(state_dict, levels=2)
    assert 'decoder.up.1.upsample.conv.weight' in ldm and 'encoder.mid.attn_1.proj_out.weight' in ldm
    assert 'encoder.down.1.block.0.nin_shortcut.weight' in ldm
    assert_trees_equal(from_diffusers(ldm, net), variables)


def test_mismatch_lists_every_key_in_one_error(net, state_dict):
    broken = dict(state_dict)
    del broken['decoder.conv_out.bias']
    broken['encoder.extra.weight'] = np.zeros((2, 2), np.float32)
    broken[ATTN + 'to_k.weight'] = np.zeros((64, 32), np.float32)
    with pytest.raises(ValueError) as err:
        from_diffusers(broken, net)
    head, *lines = str(err.value).splitlines()
    assert '1 missing, 1 unexpected, 1 mis-shaped' in head and 'config.json' in head
    assert lines == ['  missing: decoder.conv_out.bias expected (3,)',
                     '  unexpected: encoder.extra.weight (2, 2)',
                     f'  mis-shaped: {ATTN}to_k.weight expected (64, 64), got (64, 32)']


def test_read_safetensors(tmp_path, net, state_dict, variables):
    safetensors_numpy = pytest.importorskip('safetensors.numpy')
    path = tmp_path / 'diffusion_pytorch_model.safetensors'
    safetensors_numpy.save_file(state_dict, str(path))
    loaded = read_state_dict(path)
    assert loaded.keys() == state_dict.keys()
    assert_trees_equal(from_diffusers(loaded, net), variables)


def test_read_torch_bin_and_compvis_ckpt(tmp_path, net, state_dict, variables):
    path = tmp_path / 'diffusion_pytorch_model.bin'
    torch_zip(tensors(_old_style(state_dict, conv_shaped=True)), path)
    assert_trees_equal(from_diffusers(read_state_dict(path), net), variables)

    # An SD checkpoint: the VAE under 'state_dict' with the first_stage_model. prefix, next to other weights.
    weights = {**tensors(_compvis(state_dict, levels=2), 'first_stage_model.'),
               'model.diffusion_model.out.2.bias': Tensor(np.zeros(4, np.float32), storage=Storage(
                   np.zeros(4, np.float32), key='unet'))}
    path = tmp_path / 'sd.ckpt'
    torch_zip({'global_step': 7, 'state_dict': weights}, path)
    loaded = read_state_dict(path)
    assert 'encoder.mid.attn_1.q.weight' in loaded and not any(k.startswith('model.') for k in loaded)
    assert_trees_equal(from_diffusers(loaded, net), variables)
