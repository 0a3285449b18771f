"""WideResNet / PreAct ResNet classifiers for adversarial training: reference parameter counts, shapes, BatchNorm
modes, input standardisation, jit, determinism, and sharded == unsharded logits on 8 fake CPU devices."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import xla_flags
from jaxdiff import parallel
from jaxdiff.nets.preact_resnet import PreActResNet, PreActResNet18, PreActResNet34
from jaxdiff.nets.wide_resnet import (CIFAR10_MEAN, CIFAR10_STD, WideResNet, dataset_stats, logits_fn, normalize,
                                      wrn_16_4, wrn_28_10, wrn_34_10, wrn_70_16)

EIGHT_DEVICES = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=xla_flags(8))
DIGITS = dataset_stats('digits')


def tiny_wrn(**kw):
    """WRN-10-2 (one block per group) on 8x8 digits: the fast net for behaviour tests."""
    return WideResNet(**dict(dict(num_classes=10, depth=10, width=2, mean=DIGITS[0], std=DIGITS[1]), **kw))


def init(net, x, seed=0):
    """The module's own (jitted) init: only where the init scheme itself is tested. An 'rbg' key: same
    initializers, but compiling threefry for every parameter takes seconds on a loaded 2-core CPU."""
    return jax.jit(net.init)(jax.random.key(seed, impl='rbg'), x)


def fake_variables(net, shape, seed=0):
    """Variables of the right tree and shapes without compiling init: He-normal kernels, BN scale / running var
    near 1, biases / running means near 0 (non-trivial, so eval mode really uses the running statistics)."""
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = path[-1].key
        if name == 'kernel':
            value = rng.normal(0, np.sqrt(2 / np.prod(leaf.shape[:-1])), leaf.shape)
        elif name in ('scale', 'var'):
            value = rng.uniform(0.8, 1.2, leaf.shape)
        else:
            value = rng.normal(0, 0.1, leaf.shape)
        return jnp.asarray(value, leaf.dtype)
    return jax.tree_util.tree_map_with_path(fill, abstract_variables(net, shape))


def apply(net, *args, **kwargs):
    """Jitted ``net.apply`` (train / mutable / capture_intermediates are static)."""
    return jax.jit(lambda v, x: net.apply(v, x, **kwargs))(*args)


def images(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).uniform(size=shape), jnp.float32)


def abstract_variables(net, shape):
    return jax.eval_shape(lambda: net.init(jax.random.key(0), jnp.zeros(shape)))


def n_params(tree):
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


# -- independent counts from the reference architectures ------------------------------------------------------------

def block_params(cin, cout, shortcut):
    """BN(cin) affine + 3x3 conv + BN(cout) affine + 3x3 conv (no biases) [+ 1x1 shortcut conv]."""
    return 2 * cin + 9 * cin * cout + 2 * cout + 9 * cout * cout + (cin * cout if shortcut else 0)


def reference_wrn_count(depth, width, num_classes=10, channels=3):
    n, widths = (depth - 4) // 6, (16 * width, 32 * width, 64 * width)
    total, cin = 9 * channels * 16, 16
    for cout in widths:
        for i in range(n):
            c = cin if i == 0 else cout
            total += block_params(c, cout, shortcut=c != cout)
        cin = cout
    return total + 2 * widths[-1] + widths[-1] * num_classes + num_classes


def reference_preact_count(num_blocks, num_classes=10, channels=3):
    total, cin = 9 * channels * 64, 64
    for stage, (blocks, cout) in enumerate(zip(num_blocks, (64, 128, 256, 512))):
        for i in range(blocks):
            c = cin if i == 0 else cout
            total += block_params(c, cout, shortcut=(stage > 0 and i == 0) or c != cout)
        cin = cout
    return total + 2 * 512 + 512 * num_classes + num_classes


def test_reference_counts_by_formula():
    # WRN-28-10 and WRN-34-10 agree with the published 36.5M / 46.2M; PreAct ResNet-18 with the final BN of the
    # reference (kuangliu's variant without it has 11,171,146 = this - 2 * 512).
    assert reference_wrn_count(28, 10) == 36_479_194
    assert reference_wrn_count(34, 10) == 46_160_474
    assert reference_wrn_count(70, 16) == 266_796_506
    assert reference_preact_count((2, 2, 2, 2)) == 11_172_170


@pytest.mark.parametrize('make, want', [
    (wrn_28_10, 36_479_194), (wrn_70_16, 266_796_506), (wrn_34_10, 46_160_474),
    (PreActResNet18, 11_172_170), (PreActResNet34, 21_280_330)])
def test_param_counts_match_reference(make, want):
    variables = abstract_variables(make(num_classes=10), (1, 32, 32, 3))
    assert n_params(variables['params']) == want
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(variables))


@pytest.mark.parametrize('net, shape, want', [
    (wrn_28_10(num_classes=100), (1, 32, 32, 3), reference_wrn_count(28, 10, num_classes=100)),
    (wrn_16_4(mean=DIGITS[0], std=DIGITS[1]), (1, 8, 8, 1), reference_wrn_count(16, 4, channels=1)),
    (wrn_16_4(mean=(0.286,), std=(0.353,)), (1, 28, 28, 1), reference_wrn_count(16, 4, channels=1)),
    (PreActResNet18(), (1, 28, 28, 1), reference_preact_count((2, 2, 2, 2), channels=1))])
def test_param_counts_other_configs(net, shape, want):
    variables = abstract_variables(net, shape)
    assert n_params(variables['params']) == want
    # running mean + var for every BN: as many as the BN affine parameters
    bn_affine = sum(int(np.prod(leaf.shape)) for path, leaf in jax.tree_util.tree_leaves_with_path(variables['params'])
                    if 'batchnorm' in jax.tree_util.keystr(path) or "'bn" in jax.tree_util.keystr(path))
    assert n_params(variables['batch_stats']) == bn_affine


def test_wrn_structure_follows_reference():
    params = abstract_variables(wrn_28_10(), (1, 32, 32, 3))['params']
    assert params['init_conv']['kernel'].shape == (3, 3, 3, 16) and 'bias' not in params['init_conv']
    for g, (cin, cout) in enumerate(((16, 160), (160, 320), (320, 640))):
        assert params[f'group{g}_block0']['shortcut']['kernel'].shape == (1, 1, cin, cout)
        assert params[f'group{g}_block0']['batchnorm_0']['scale'].shape == (cin,)
        assert all('shortcut' not in params[f'group{g}_block{i}'] for i in (1, 2, 3))
    assert 'group0_block4' not in params
    assert params['logits']['kernel'].shape == (640, 10) and params['logits']['bias'].shape == (10,)
    pre = abstract_variables(PreActResNet18(), (1, 32, 32, 3))['params']
    assert pre['layer1_0'].keys() == {'bn1', 'conv1', 'bn2', 'conv2'}
    assert pre['layer2_0']['shortcut']['kernel'].shape == (1, 1, 64, 128)


@pytest.mark.parametrize('net, shape', [
    (wrn_16_4(mean=DIGITS[0], std=DIGITS[1]), (4, 8, 8, 1)),
    (wrn_16_4(mean=(0.286,), std=(0.353,)), (4, 28, 28, 1)),
    (wrn_16_4(mean=(0.286,), std=(0.353,)), (4, 32, 32, 1)),
    (wrn_28_10(num_classes=100), (4, 32, 32, 3)),
    (wrn_28_10(padding=2), (4, 28, 28, 3)),
    (PreActResNet18(), (4, 32, 32, 3)),
    (PreActResNet18(num_classes=7, mean=DIGITS[0], std=DIGITS[1]), (4, 8, 8, 1)),
    (tiny_wrn(dtype=jnp.bfloat16), (4, 7, 7, 1))])
def test_output_shapes(net, shape):
    variables = abstract_variables(net, shape)
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    out = jax.eval_shape(lambda v, x: net.apply(v, x), variables, x)
    assert out.shape == (shape[0], net.num_classes) and out.dtype == jnp.float32
    out, upd = jax.eval_shape(lambda v, x: net.apply(v, x, train=True, mutable=['batch_stats']), variables, x)
    assert out.shape == (shape[0], net.num_classes)
    assert jax.tree.map(lambda a: a.shape, upd['batch_stats']) == jax.tree.map(lambda a: a.shape,
                                                                               variables['batch_stats'])


def test_small_nets_run_on_small_inputs():
    for net, shape in ((tiny_wrn(), (3, 8, 8, 1)), (tiny_wrn(mean=0.286, std=0.353), (3, 28, 28, 1)),
                       (tiny_wrn(activation='relu', mean=CIFAR10_MEAN, std=CIFAR10_STD), (3, 32, 32, 3)),
                       (PreActResNet(num_blocks=(1, 1), widths=(8, 16), mean=DIGITS[0], std=DIGITS[1]), (3, 8, 8, 1))):
        out = apply(net, fake_variables(net, shape), images(shape))
        assert out.shape == (3, 10) and bool(jnp.all(jnp.isfinite(out)))


def test_init_scheme():
    params = init(tiny_wrn(), jnp.zeros((1, 8, 8, 1)), seed=1)['params']
    kernel = params['group2_block0']['conv_1']['kernel']  # 3x3x128x128: He normal on fan-out, untruncated
    assert kernel.shape == (3, 3, 128, 128)
    np.testing.assert_allclose(float(jnp.std(kernel)), np.sqrt(2 / (9 * 128)), rtol=0.02)
    assert float(jnp.max(jnp.abs(kernel))) * np.sqrt(9 * 128 / 2) > 3.5
    assert bool(jnp.all(params['group1_block0']['batchnorm_0']['scale'] == 1))
    assert bool(jnp.all(params['group1_block0']['batchnorm_0']['bias'] == 0))
    assert bool(jnp.all(params['logits']['bias'] == 0))
    assert 0.9 / np.sqrt(128) < float(jnp.max(jnp.abs(params['logits']['kernel']))) <= 1 / np.sqrt(128)
    pre = init(PreActResNet(num_blocks=(1, 1), widths=(8, 64)), jnp.zeros((1, 8, 8, 3)))['params']
    kernel = pre['layer2_0']['conv2']['kernel']
    assert 0.99 / np.sqrt(9 * 64) < float(jnp.max(jnp.abs(kernel))) <= 1 / np.sqrt(9 * 64)
    bias = float(jnp.max(jnp.abs(pre['linear']['bias'])))
    assert 0 < bias <= 1 / np.sqrt(64)


@pytest.mark.parametrize('net', [tiny_wrn(), PreActResNet(num_blocks=(1, 1), widths=(8, 16), mean=DIGITS[0],
                                                          std=DIGITS[1])], ids=['wrn', 'preact'])
def test_batch_stats_update_only_in_train_mode(net):
    x = images((8, 8, 8, 1))
    variables = fake_variables(net, x.shape)
    stem = 'init_conv' if isinstance(net, WideResNet) else 'conv1'
    first_bn = ('group0_block0', 'batchnorm_0') if isinstance(net, WideResNet) else ('layer1_0', 'bn1')

    def fn(v, x):
        eval_out = net.apply(v, x, mutable=['batch_stats'])
        train_out = net.apply(v, x, train=True, mutable=['batch_stats'],
                              capture_intermediates=lambda m, _: m.name == stem)
        eval_after = net.apply(dict(v, batch_stats=train_out[1]['batch_stats']), x)  # uses the new running stats
        return eval_out, train_out, eval_after
    (logits_eval, upd_eval), (logits_train, upd), logits_after = jax.jit(fn)(variables, x)
    assert not np.allclose(logits_after, logits_eval, atol=1e-6)
    jax.tree.map(np.testing.assert_array_equal, upd_eval['batch_stats'], variables['batch_stats'])
    changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), upd['batch_stats'], variables['batch_stats'])
    assert all(jax.tree.leaves(changed))
    assert not np.allclose(logits_train, logits_eval, atol=1e-3)
    # flax momentum = 1 - torch momentum: running = m * running + (1 - m) * batch mean (m = 0.99 WRN, 0.9 PreAct)
    stem_out = upd['intermediates'][stem]['__call__'][0]
    m = net.bn_momentum
    old = variables['batch_stats'][first_bn[0]][first_bn[1]]['mean']
    np.testing.assert_allclose(upd['batch_stats'][first_bn[0]][first_bn[1]]['mean'],
                               m * old + (1 - m) * jnp.mean(stem_out, axis=(0, 1, 2)), rtol=1e-5, atol=1e-6)
    assert m == (0.99 if isinstance(net, WideResNet) else 0.9) and net.bn_eps == 1e-5


def test_input_normalisation():
    mean, std = (0.1, 0.5, 0.9), (0.2, 0.3, 0.4)
    x = jnp.broadcast_to(jnp.asarray(mean), (2, 4, 4, 3))
    np.testing.assert_allclose(normalize(x, mean, std), 0, atol=1e-7)
    np.testing.assert_allclose(normalize(jnp.ones((1, 2, 2, 3)), mean, std)[0, 0, 0], [4.5, 5 / 3, 0.25], rtol=1e-6)
    np.testing.assert_array_equal(normalize(x, None, None), x)
    # model level: the stem conv has no bias, so the mean image (row 0) gives an all-zero stem output; row 1 not
    batch = jnp.concatenate([x[:1], x[:1] + 0.05])
    digits = jnp.concatenate([jnp.full((1, 4, 4, 1), DIGITS[0][0]), jnp.full((1, 4, 4, 1), 0.5)])
    for net, xs in ((tiny_wrn(mean=mean, std=std), batch), (tiny_wrn(), digits),
                    (PreActResNet(num_blocks=(1, 1), widths=(8, 16), mean=mean, std=std), batch)):
        stem = 'init_conv' if isinstance(net, WideResNet) else 'conv1'
        _, inter = apply(net, fake_variables(net, xs.shape), xs, capture_intermediates=lambda m, _: m.name == stem)
        out = inter['intermediates'][stem]['__call__'][0]
        np.testing.assert_allclose(out[0], 0, atol=1e-6)
        assert float(jnp.max(jnp.abs(out[1]))) > 1e-3


def test_bad_inputs_fail_clearly():
    with pytest.raises(ValueError, match='depth=12'):
        tiny_wrn(depth=12).init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
    with pytest.raises(ValueError, match='mean has 3 entries'):
        wrn_16_4().init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
    with pytest.raises(ValueError, match=r'\(B, H, W, C\)'):
        tiny_wrn().init(jax.random.key(0), jnp.zeros((8, 8, 1)))
    with pytest.raises(ValueError, match='activation'):
        tiny_wrn(activation='gelu').init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
    with pytest.raises(ValueError, match='num_blocks'):
        PreActResNet(num_blocks=(1, 1)).init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
    with pytest.raises(ValueError, match='no mean/std'):
        dataset_stats('imagenet')


def test_jit_compiles_once_and_eval_is_deterministic():
    net = tiny_wrn()
    variables = fake_variables(net, (4, 8, 8, 1))
    traces = []

    @jax.jit
    def forward(v, x):
        traces.append(1)
        return net.apply(v, x)

    a, b = images((4, 8, 8, 1), seed=1), images((4, 8, 8, 1), seed=2)
    out_a = forward(variables, a)
    forward(variables, b)
    np.testing.assert_array_equal(forward(variables, a), out_a)
    # eval mode does not depend on the rest of the batch
    mixed = forward(variables, jnp.concatenate([a[:2], b[:2]]))
    assert len(traces) == 1
    np.testing.assert_allclose(mixed[:2], out_a[:2], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(jax.jit(logits_fn(net, variables))(a), out_a, rtol=1e-5, atol=1e-6)


# -- sharding: 8 fake CPU devices in a subprocess vs this process ---------------------------------------------------

def _forward_all(net, variables, x, in_shardings=None):
    """(eval logits, train logits, train batch stats) from one jit, optionally with input shardings."""
    def fn(v, x):
        logits = net.apply(v, x)
        train_logits, upd = net.apply(v, x, train=True, mutable=['batch_stats'])
        return logits, train_logits, upd['batch_stats']
    return jax.jit(fn, in_shardings=in_shardings)(variables, x)


def _sharding_case():
    net = tiny_wrn()
    x = images((16, 8, 8, 1), seed=3)
    return net, fake_variables(net, x.shape, seed=4), x


def _eight_device_main(out):
    assert jax.device_count() == 8
    net, variables, x = _sharding_case()
    results = {}
    for fsdp in (1, 2):
        mesh = parallel.make_mesh(fsdp)
        shardings = (parallel.fsdp_shardings(mesh, variables), parallel.batch_sharding(mesh))
        x_sharded = jax.device_put(x, shardings[1])
        assert len(x_sharded.sharding.device_set) == 8
        logits, train_logits, stats = _forward_all(net, jax.device_put(variables, shardings[0]), x_sharded, shardings)
        results[f'fsdp{fsdp}_logits'] = np.asarray(logits)
        results[f'fsdp{fsdp}_train_logits'] = np.asarray(train_logits)
        for i, leaf in enumerate(jax.tree.leaves(stats)):
            results[f'fsdp{fsdp}_stats{i}'] = np.asarray(leaf)
    np.savez(out, **results)


def test_sharded_batch_gives_same_logits(tmp_path):
    out = tmp_path / 'sharded.npz'
    code = (f'import sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); import test_robust_nets as t; '
            f't._eight_device_main({str(out)!r})')
    proc = subprocess.Popen([sys.executable, '-c', code], env=EIGHT_DEVICES, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    net, variables, x = _sharding_case()
    logits, train_logits, stats = _forward_all(net, variables, x)
    log, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, log[-3000:]
    got = np.load(out)
    for fsdp in (1, 2):
        np.testing.assert_allclose(got[f'fsdp{fsdp}_logits'], logits, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got[f'fsdp{fsdp}_train_logits'], train_logits, rtol=1e-5, atol=1e-5)
        for i, leaf in enumerate(jax.tree.leaves(stats)):
            np.testing.assert_allclose(got[f'fsdp{fsdp}_stats{i}'], leaf, rtol=1e-5, atol=1e-6)
