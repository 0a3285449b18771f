"""DiT: parameter counts, the fixed tables, a float64 numpy transcription of the reference forward, labels,
the checkpoint converter, and ADM's discrete preconditioning."""
import argparse
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from edm_pickle_writer import tensors, torch_zip
from jaxdiff import precond, schedules
from jaxdiff.config import base_config
from jaxdiff.data.sources import DatasetInfo
from jaxdiff.nets.convert_dit import from_dit, load_dit, to_dit
from jaxdiff.denoiser import GridDenoiser
from jaxdiff.nets.dit import DiT, dit, pos_embed_2d, timestep_features
from jaxdiff.nets.from_config import build_net, denoiser_fn

TINY = dict(img_resolution=4, in_channels=3, label_dim=5, patch_size=2, hidden_size=32, depth=2, num_heads=4)


def params_of(net, res, channels, label_dim):
    init = lambda key: net.init(key, jnp.zeros((1, res, res, channels)), jnp.zeros((1,)),
                                jnp.zeros((1, label_dim)) if label_dim else None)
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(jax.eval_shape(init, jax.random.key(0))))


@pytest.mark.parametrize('name, reference', [('XL/2', 675_129_632), ('S/8', 33_148_160)])
def test_parameter_counts_equal_the_reference(name, reference):
    # The reference's sum(p.numel() for p in model.parameters()) at input_size 32, 4 channels, 1000 classes
    # (measured on facebookresearch/DiT models.py); it includes the frozen pos_embed, which DiT rebuilds in code.
    net = dit(name, img_resolution=32, in_channels=4, label_dim=1000)
    tokens = (32 // net.patch_size) ** 2
    assert params_of(net, 32, 4, 1000) + tokens * net.hidden_size == reference


def test_position_table_and_timestep_features_by_their_formulas():
    dim, grid = 16, 3
    table = pos_embed_2d(dim, grid)
    omega = [10000 ** (-k / 4) for k in range(4)]
    for row in range(grid):
        for col in range(grid):
            want = ([math.sin(col * w) for w in omega] + [math.cos(col * w) for w in omega]
                    + [math.sin(row * w) for w in omega] + [math.cos(row * w) for w in omega])
            np.testing.assert_allclose(table[row * grid + col], want, rtol=0, atol=1e-6)
    t = jnp.array([0.0, 3.0])
    feats = np.asarray(timestep_features(t, dim=8))
    freqs = [math.exp(-math.log(10000) * k / 4) for k in range(4)]
    np.testing.assert_allclose(feats[1], [math.cos(3 * f) for f in freqs] + [math.sin(3 * f) for f in freqs],
                               atol=1e-6)
    np.testing.assert_array_equal(feats[0], [1, 1, 1, 1, 0, 0, 0, 0])


def _reference_forward(sd, x, t, y, p, heads, learn_sigma):
    """models.py's DiT.forward in float64 numpy, NCHW and torch layouts (an independent transcription)."""
    f = lambda k: sd[k].astype(np.float64)
    lin = lambda h, k: h @ f(k + '.weight').T + f(k + '.bias')
    silu = lambda h: h / (1 + np.exp(-h))
    ln = lambda h: (h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True) + 1e-6)
    mod = lambda h, shift, scale: h * (1 + scale[:, None]) + shift[:, None]
    n, c, hh, _ = x.shape
    w = f('x_embedder.proj.weight')                                   # (D, C, p, p)
    g = hh // p
    patches = x.reshape(n, c, g, p, g, p).transpose(0, 2, 4, 1, 3, 5).reshape(n, g * g, c * p * p)
    tok = patches @ w.reshape(w.shape[0], -1).T + f('x_embedder.proj.bias') + f('pos_embed')
    half = 128
    freqs = np.exp(-math.log(10000) * np.arange(half) / half)
    args = t[:, None] * freqs[None]
    temb = lin(silu(lin(np.concatenate([np.cos(args), np.sin(args)], -1), 't_embedder.mlp.0')), 't_embedder.mlp.2')
    cond = temb + f('y_embedder.embedding_table.weight')[y]
    d = tok.shape[-1]
    for i in range(len({k.split('.')[1] for k in sd if k.startswith('blocks.')})):
        b = f'blocks.{i}.'
        m = lin(silu(cond), b + 'adaLN_modulation.1').reshape(n, 6, d)
        h = mod(ln(tok), m[:, 0], m[:, 1])
        qkv = lin(h, b + 'attn.qkv').reshape(n, -1, 3, heads, d // heads).transpose(2, 0, 3, 1, 4)
        logits = qkv[0] @ qkv[1].transpose(0, 1, 3, 2) / math.sqrt(d // heads)
        att = np.exp(logits - logits.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        tok = tok + m[:, 2][:, None] * lin((att @ qkv[2]).transpose(0, 2, 1, 3).reshape(n, -1, d), b + 'attn.proj')
        h = lin(mod(ln(tok), m[:, 3], m[:, 4]), b + 'mlp.fc1')
        h = 0.5 * h * (1 + np.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h ** 3)))
        tok = tok + m[:, 5][:, None] * lin(h, b + 'mlp.fc2')
    m = lin(silu(cond), 'final_layer.adaLN_modulation.1').reshape(n, 2, d)
    out = lin(mod(ln(tok), m[:, 0], m[:, 1]), 'final_layer.linear')
    co = c * (2 if learn_sigma else 1)
    return out.reshape(n, g, g, p, p, co).transpose(0, 5, 1, 3, 2, 4).reshape(n, co, hh, hh)


@pytest.fixture(scope='module')
def tiny():
    """The tiny DiT with random weights everywhere (the zero-initialised adaLN and output layers too)."""
    net = DiT(**TINY)
    shapes = jax.eval_shape(net.init, jax.random.key(0), jnp.zeros((1, 4, 4, 3)), jnp.zeros((1,)), jnp.zeros((1, 5)))
    rng = np.random.default_rng(1)
    return net, jax.tree.map(lambda a: jnp.asarray(0.3 * rng.standard_normal(a.shape), jnp.float32), shapes)


def test_forward_matches_a_float64_transcription_of_the_reference(tiny):
    net, variables = tiny
    sd = to_dit(variables, net)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 3, 4, 4))
    t = np.array([0.0, 7.0, 250.0, 999.0])
    y = np.array([0, 4, 5, 2])                                        # 5 = the null class
    ref = _reference_forward(sd, x, t, y, p=2, heads=4, learn_sigma=True)
    labels = np.eye(6)[y][:, :5]                                      # the null class is an all-zero row
    with jax.default_matmul_precision('highest'):
        out = net.apply(variables, jnp.asarray(x.transpose(0, 2, 3, 1), jnp.float32), jnp.asarray(t, jnp.float32),
                        jnp.asarray(labels, jnp.float32))
    assert out.shape == (4, 4, 4, 6)
    np.testing.assert_allclose(np.asarray(out).transpose(0, 3, 1, 2), ref, rtol=0, atol=2e-5 * np.abs(ref).max())


def test_label_dropout_gives_the_null_class_and_no_null_row_without_dropout(tiny):
    net, variables = tiny
    x, t = jnp.ones((2, 4, 4, 3)), jnp.array([5.0, 5.0])
    labels = jax.nn.one_hot(jnp.array([1, 3]), 5)
    dropped = net.clone(label_dropout=1.0).apply(variables, x, t, labels, train=True,
                                                   rngs={'dropout': jax.random.key(0)})
    np.testing.assert_allclose(dropped, net.apply(variables, x, t, jnp.zeros((2, 5))), atol=1e-6)
    assert not np.allclose(dropped, net.apply(variables, x, t, labels), atol=1e-3)
    plain = net.clone(label_dropout=0.0)
    table = jax.eval_shape(plain.init, jax.random.key(0), x, t, labels)['params']['y_embedder']['embedding_table']
    assert table['weight'].shape == (5, 32)
    uncond = net.clone(label_dim=0)
    assert uncond.apply(uncond.init(jax.random.key(0), x, t), x, t).shape == (2, 4, 4, 6)


def test_converter_round_trip_errors_and_checkpoint_files(tiny, tmp_path):
    net, variables = tiny
    sd = to_dit(variables, net)
    assert sd['y_embedder.embedding_table.weight'].shape == (6, 32) and sd['pos_embed'].shape == (1, 4, 32)
    jax.tree.map(np.testing.assert_array_equal, from_dit(sd, net), jax.tree.map(np.asarray, variables))
    jax.tree.map(np.testing.assert_array_equal, from_dit({f'module.{k}': a for k, a in sd.items()}, net),
                 from_dit(sd, net))

    bad = dict(sd)
    del bad['t_embedder.mlp.0.bias']
    bad['blocks.0.attn.qkv.weight'] = bad['blocks.0.attn.qkv.weight'][:, :16]
    bad['blocks.9.attn.qkv.weight'] = np.zeros(3, np.float32)
    bad['pos_embed'] = bad['pos_embed'][:, ::-1]
    with pytest.raises(ValueError) as err:
        from_dit(bad, net)
    msg = str(err.value)
    assert msg.splitlines()[0].startswith('state dict does not match DiT: 1 missing, 1 unexpected, 1 mis-shaped, '
                                          '1 wrong constant')
    for line in ('missing: t_embedder.mlp.0.bias expected (32,)', 'unexpected: blocks.9.attn.qkv.weight (3,)',
                 'mis-shaped: blocks.0.attn.qkv.weight expected (96, 32), got (96, 16)', 'wrong constant: pos_embed'):
        assert line in msg

    torch_zip(tensors(sd), tmp_path / 'DiT-tiny.pt')                  # a released checkpoint: the state dict
    torch_zip(dict(model={}, ema=tensors(sd), args=argparse.Namespace(model='DiT-S/2')), tmp_path / '0000100.pt')
    for name in ('DiT-tiny.pt', '0000100.pt'):
        jax.tree.map(np.testing.assert_array_equal, load_dit(str(tmp_path / name), net), from_dit(sd, net))


def test_ddpm_preconditioning_on_an_exact_gaussian_eps_predictor():
    grid = schedules.ddpm_linear_sigmas()
    betas = np.linspace(1e-4, 0.02, 1000)
    np.testing.assert_allclose(grid[[0, 1]], [math.sqrt(betas[0] / (1 - betas[0])),
                                              math.sqrt(1 / ((1 - betas[0]) * (1 - betas[1])) - 1)], rtol=1e-12)
    # Data N(0, s_d^2 I): at x_t = sqrt(abar)(x0 + sigma eps) the exact eps prediction is sigma x / (s_d^2 + sigma^2)
    # with x = x_t / sqrt(abar). F gets only c_in x and the timestep index, so D is exact only if both are right.
    s_d, g32 = 0.7, precond.ddpm_grid()

    def raw(x_in, t, cond):
        sigma = jnp.asarray(g32)[t.astype(jnp.int32)][:, None, None, None]
        return sigma * jnp.sqrt(sigma ** 2 + 1) * x_in / (s_d ** 2 + sigma ** 2)

    den = GridDenoiser(precond.precondition(raw, precond.ddpm_coeffs), g32)
    x = jax.random.normal(jax.random.key(0), (3, 2, 2, 1))
    sigma = jnp.asarray(g32[[0, 500, 999]])
    want = s_d ** 2 / (s_d ** 2 + sigma ** 2)[:, None, None, None] * x
    np.testing.assert_allclose(den(x, sigma), want, rtol=2e-5, atol=1e-6)
    _, _, _, c_noise = precond.ddpm_coeffs(jnp.asarray([g32[0] * 1.001, g32[731] * 0.9999]))
    np.testing.assert_array_equal(c_noise, [0.0, 731.0])


def test_config_arch_dit_builds_a_denoiser_and_refuses_augmentation():
    config = base_config()
    config.model.update(arch='dit', patch_size=2, hidden_size=32, depth=1, num_heads=4, label_dropout=0.1)
    config.loss.augment_p = 0.0
    info = DatasetInfo(resolution=8, channels=1, num_classes=10, size=100)
    net = build_net(config, info)
    assert isinstance(net, DiT) and not net.learn_sigma and net.label_dim == 10
    x, labels = jnp.ones((2, 8, 8, 1)), jax.nn.one_hot(jnp.array([1, 2]), 10)
    variables = net.init(jax.random.key(0), x, jnp.zeros((2,)), labels)
    assert denoiser_fn(config, net, variables)(x, jnp.array([0.5, 2.0]), labels).shape == (2, 8, 8, 1)
    config.loss.augment_p = 0.12
    with pytest.raises(ValueError, match='augment_p=0.12: DiT takes no augmentation labels'):
        build_net(config, info)
    config.loss.augment_p, config.model.patch_size = 0.0, 3
    with pytest.raises(ValueError, match=r'data.resolution \(8\) divisible by patch_size \(3\)'):
        build_net(config, info)
