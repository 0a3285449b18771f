"""The training step: EDM loss normalisation, lr ramp-up, EMA, non-finite guard, determinism (one device).

The multi-device equivalence (1 vs 8 fake CPU devices, fsdp meshes) is in test_parallel.py, reusing the helpers
here. Steps compile with FAST (XLA's cheap optimisation level) to keep the file quick on 2 CPU cores.
"""
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import losses, parallel
from jaxdiff.config import base_config
from jaxdiff.engine.ema import ema_beta
from jaxdiff.engine.optim import learning_rate
from jaxdiff.nets.from_config import build_net, denoiser_fn
from jaxdiff.tasks.denoiser import init_sharded_state, make_train_step
from jaxdiff.tasks.denoiser import class_labels, noise_levels, step_keys

BATCH, RES, STEPS = 8, 8, 3
INFO = types.SimpleNamespace(resolution=RES, channels=1, num_classes=10, size=64)
FAST = {'xla_backend_optimization_level': 0, 'xla_llvm_disable_expensive_passes': True}


def tiny_config(channel_mult=(1, 2)):
    """A tiny class-conditional DDPM++ with dropout and label dropout; lr ramps up over 2 steps."""
    c = base_config()
    c.seed, c.batch_size = 0, BATCH
    c.model.model_channels, c.model.channel_mult, c.model.num_blocks = 16, channel_mult, 1
    c.model.attn_resolutions, c.model.dropout, c.model.label_dropout = (), 0.1, 0.2
    c.loss.augment_p = 0.0
    c.optim.lr_rampup_img = 2 * BATCH
    c.ema.halflife_img, c.ema.rampup_ratio = 4 * BATCH, 0.5
    return c


def batches(n=STEPS, seed=1):
    """n host-side batches of images in [-1, 1] (B, RES, RES, 1) and int labels (B,)."""
    rng = np.random.default_rng(seed)
    return [dict(image=rng.uniform(-1, 1, (BATCH, RES, RES, 1)).astype(np.float32),
                 label=rng.integers(0, 10, BATCH).astype(np.int32)) for _ in range(n)]


def flat(tree):
    """{path string: numpy array} for every leaf of a pytree."""
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def run_steps(config, mesh, host_batches, step=None):
    """Init and train over host_batches on mesh (compiling the step unless given).

    Returns dict(step, init / init_buffers (numpy trees), params_seen (numpy params after each step), metrics, state).
    """
    net = build_net(config, INFO)
    key = jax.random.key(config.seed)
    state = init_sharded_state(config, net, INFO, key, mesh, compiler_options=FAST)
    step = step or make_train_step(config, net, mesh, compiler_options=FAST)
    out = dict(config=config, mesh=mesh, net=net, key=key, step=step, init=jax.tree.map(np.asarray, state.params),
               init_buffers=jax.tree.map(np.asarray, state.buffers), params_seen=[], metrics=[])
    for b in host_batches:
        state, m = step(state, parallel.host_to_global(b, mesh), key)
        out['params_seen'].append(jax.tree.map(np.asarray, state.params))
        out['metrics'].append({k: float(v) for k, v in m.items()})
    out['state'] = state
    return out


@pytest.fixture(scope='module')
def one_device_run():
    """Three steps of the tiny config on a single-device mesh."""
    return run_steps(tiny_config(), parallel.make_mesh(1, devices=jax.devices()[:1]), batches())


def test_lr_rampup_matches_reference_formula():
    c = tiny_config()
    c.optim.lr, c.optim.lr_rampup_img, c.batch_size = 1e-3, 10_000, 512
    for step in (0, 1, 7, 19, 20, 1000):
        want = 1e-3 * min(step * 512 / 10_000, 1)
        assert float(learning_rate(c, jnp.int32(step))) == pytest.approx(want, rel=1e-6, abs=1e-12)


def test_ema_beta_matches_reference_formula():
    c = tiny_config()
    c.batch_size, c.ema.halflife_img = 512, 500_000
    for ratio in (0.05, None):
        c.ema.rampup_ratio = ratio
        for step in (0, 1, 100, 20_000, 100_000):
            halflife = 500_000 if not ratio else min(500_000, step * 512 * ratio)
            want = 0.5 ** (512 / max(halflife, 1e-8))
            assert float(ema_beta(c, jnp.int32(step))) == pytest.approx(want, rel=1e-5, abs=1e-30)


def test_metrics_report_lr_and_beta(one_device_run):
    metrics = one_device_run['metrics']
    assert [m['lr'] for m in metrics] == pytest.approx([0.0, 0.5e-3, 1e-3], rel=1e-6)
    assert [m['ema_beta'] for m in metrics] == pytest.approx(
        [0.5 ** (BATCH / max(min(32, s * BATCH * 0.5), 1e-8)) for s in range(STEPS)], rel=1e-6)
    assert all(m['nonfinite'] == 0 for m in metrics) and int(one_device_run['state'].nonfinite) == 0


def test_ema_follows_reference_recursion(one_device_run):
    """ema_0 = params_0 (init); after step s: ema = p_s + beta_s (ema - p_s), computed here in float64 numpy."""
    run = one_device_run
    c = run['config']
    ema = jax.tree.map(lambda x: x.astype(np.float64), run['init'])
    for s, params in enumerate(run['params_seen']):
        halflife = min(c.ema.halflife_img, s * c.batch_size * c.ema.rampup_ratio)
        beta = 0.5 ** (c.batch_size / max(halflife, 1e-8))
        ema = jax.tree.map(lambda e, p: p + beta * (e - p), ema, params)
    got = jax.tree.map(np.asarray, run['state'].ema)
    diffs = jax.tree.leaves(jax.tree.map(lambda a, b: np.max(np.abs(a - b)), got, ema))
    assert max(diffs) < 1e-6


def test_loss_is_pixel_sum_batch_mean_of_weighted_error(one_device_run):
    run = one_device_run
    c, net, key = run['config'], run['net'], run['key']
    batch = batches()[0]

    def error(params, image, label):
        keys = step_keys(key, 0)
        denoise = denoiser_fn(c, net, {'params': params}, train=True, rngs={'dropout': keys['dropout']})
        levels = noise_levels(c)
        sigma = levels.sample(keys['sigma'], BATCH)
        noise = jax.random.normal(keys['noise'], (BATCH, RES, RES, 1), jnp.float32)
        return losses.weighted_error(denoise, image, sigma, noise, levels.weight, class_labels(net, label))

    per_element = jax.jit(error, compiler_options=FAST)(run['init'], batch['image'], batch['label'])
    want = np.asarray(per_element, np.float64).sum(axis=(1, 2, 3)).mean()
    assert run['metrics'][0]['loss'] == pytest.approx(want, rel=1e-5)


def test_same_seed_gives_bitwise_same_params(one_device_run):
    run = one_device_run
    again = run_steps(run['config'], run['mesh'], batches(), step=run['step'])
    assert again['metrics'] == run['metrics']
    for a, b in zip(jax.tree.leaves((again['state'].params, again['state'].ema)),
                    jax.tree.leaves((run['state'].params, run['state'].ema))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize('bad', [np.nan, np.inf])
def test_nonfinite_batch_does_not_poison_params(one_device_run, bad):
    run = one_device_run
    step, key = run['step'], run['key']
    state = jax.tree.map(jnp.copy, run['state'])          # the fixture's state is kept; the step donates its input
    poisoned = batches(1, seed=5)[0]
    poisoned['image'][0, 3, 3, 0] = bad
    state, m = step(state, parallel.host_to_global(poisoned, run['mesh']), key)
    assert m['nonfinite'] == 1 and int(state.nonfinite) == 1
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves((state.params, state.ema, state.opt_state)))
    before = jax.tree.map(np.asarray, state.params)
    state, m = step(state, parallel.host_to_global(batches(1, seed=6)[0], run['mesh']), key)
    assert m['nonfinite'] == 1 and int(state.nonfinite) == 1 and np.isfinite(m['loss'])  # the run's count: unchanged
    moved = max(np.max(np.abs(np.asarray(a) - b))
                for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(before)))
    assert 0 < moved < 0.1


def test_ncsnpp_bf16_ve_augmented_keeps_float32_params_and_buffers():
    """NCSN++ (a 'buffers' collection) computing in bfloat16 with VE preconditioning and loss, and EDM's
    augmentation feeding 9 augment labels: float32 params that train, Fourier frequencies untouched."""
    c = tiny_config()
    c.model.arch, c.model.precond, c.model.dtype, c.loss.augment_p = 'ncsnpp', 've', 'bfloat16', 0.5
    run = run_steps(c, parallel.make_mesh(1, devices=jax.devices()[:1]), batches(2))
    state = run['state']
    assert {x.dtype for x in jax.tree.leaves(state.params)} == {np.dtype('float32')}
    assert state.buffers['map_noise']['freqs'].shape == (16,) and 'map_augment' in state.params
    assert all(np.isfinite(m['loss']) for m in run['metrics'])
    first, second = (jax.tree.leaves(p) for p in run['params_seen'])
    assert max(float(np.max(np.abs(a - b))) for a, b in zip(first, second)) > 0
    np.testing.assert_array_equal(np.asarray(state.buffers['map_noise']['freqs']),
                                  run['init_buffers']['map_noise']['freqs'])
