"""Task ``autoencoder`` (jaxdiff.tasks.autoencoder): LDM's loss against numpy formulas, the adaptive GAN weight and
the one-pullback gradients against plain autodiff, the discriminator losses on fixed logits, the perceptual
distance's invariants, a tiny digits run through the engine that trains, previews, evaluates and loads, and the
config errors."""
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import runs
from jaxdiff.data.sources import DatasetInfo
from jaxdiff.engine import checkpoint as ckpt
from jaxdiff.nets.from_config import build_autoencoder
from jaxdiff.nets.autoencoder_kl import AutoencoderKL
from jaxdiff.nets.classifier import SmallCNN
from jaxdiff.tasks import autoencoder as ae
from jaxdiff.tasks import registry

TINY_MODEL = dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, latent_channels=2,
                  mid_block_add_attention=False)
INFO = DatasetInfo(resolution=8, channels=1, num_classes=0, size=1)


def tiny_config(**loss):
    c = ae.autoencoder_config()
    c.batch_size = 16
    c.total_steps = 60
    c.log_every = 20
    c.checkpoint_every = 60
    c.sample_every = 60
    c.optim.lr = 3e-3
    c.sampling.num_images = 8
    c.eval.num_images = 64
    c.model.update(TINY_MODEL)
    c.loss.update(loss)
    return c


# ------------------------------------------------------------------------------------------------ loss terms

def test_nll_kl_and_loss_equal_a_numpy_computation():
    rng = np.random.default_rng(0)
    x, x_rec = rng.uniform(-1, 1, (3, 4, 4, 2)), rng.uniform(-1, 1, (3, 4, 4, 2))
    mean, post_logvar = rng.normal(size=(3, 2, 2, 4)), rng.normal(size=(3, 2, 2, 4))
    logvar, kl_weight = 0.3, 1e-2
    nll, rec = ae.reconstruction_nll(jnp.asarray(x, jnp.float32), jnp.asarray(x_rec, jnp.float32),
                                     jnp.float32(logvar))
    kl = ae.kl_to_standard_normal(jnp.asarray(mean, jnp.float32), jnp.asarray(post_logvar, jnp.float32))
    # LDM: nll = sum(|x - x'| / e^s + s) / B; KL of N(m, e^v) to N(0, 1) summed over latent dims, then / B
    want_nll = np.sum(np.abs(x - x_rec) / np.exp(logvar) + logvar) / 3
    want_kl = np.array([0.5 * np.sum(m ** 2 + np.exp(v) - 1 - v) for m, v in zip(mean, post_logvar)])
    np.testing.assert_allclose(rec, np.abs(x - x_rec), rtol=1e-6)
    np.testing.assert_allclose(nll, want_nll, rtol=1e-5)
    np.testing.assert_allclose(kl, want_kl, rtol=1e-5)
    np.testing.assert_allclose(nll + kl_weight * jnp.mean(kl), want_nll + kl_weight * want_kl.mean(), rtol=1e-5)
    # a perceptual distance p (B,) adds p * weight to every pixel's rec, so H * W * C times to the per-image sum
    p = np.array([0.1, 0.2, 0.3])
    nll_p, _ = ae.reconstruction_nll(jnp.asarray(x, jnp.float32), jnp.asarray(x_rec, jnp.float32),
                                     jnp.float32(logvar), jnp.asarray(p, jnp.float32), 0.5)
    np.testing.assert_allclose(nll_p, want_nll + 0.5 * p.sum() * 32 / np.exp(logvar) / 3, rtol=1e-5)


def test_discriminator_losses_on_fixed_logits():
    real, fake = jnp.array([2.0, 0.5, -1.0]), jnp.array([-2.0, 0.0, 0.5, 1.5])
    # hinge: 0.5 (mean relu(1 - real) + mean relu(1 + fake)) = 0.5 ((0 + .5 + 2) / 3 + (0 + 1 + 1.5 + 2.5) / 4)
    np.testing.assert_allclose(ae.hinge_d_loss(real, fake), 0.5 * (2.5 / 3 + 5.0 / 4), rtol=1e-6)
    softplus = lambda v: np.log1p(np.exp(v))  # noqa: E731
    want = 0.5 * (softplus(-np.asarray(real)).mean() + softplus(np.asarray(fake)).mean())
    np.testing.assert_allclose(ae.vanilla_d_loss(real, fake), want, rtol=1e-6)


def test_adaptive_weight_and_gradients_equal_plain_autodiff():
    """The step's one-pullback gradients and its adaptive weight against jax.grad of each loss over all params."""
    config = tiny_config(disc_start=5, disc_num_layers=1, disc_channels=4, disc_weight=0.5, kl_weight=0.1)
    config.model.block_out_channels = (8,)
    vae, disc = build_autoencoder(config, INFO), ae.NLayerDiscriminator(4, 1)
    parts = ae.Parts(vae, disc, None)
    state = jax.jit(lambda k: ae.init_state(config, parts, INFO, k))(jax.random.key(1))
    state = dict(state, logvar=jnp.float32(-0.4), step=jnp.int32(5))
    x = jax.random.uniform(jax.random.key(2), (4, 8, 8, 1), minval=-1, maxval=1)
    key = jax.random.key(3)
    step = jax.jit(lambda s: ae.loss_gradients(config, parts, s, x, key))
    grads, g_logvar, _, metrics = step(state)

    @jax.jit
    def by_hand(params, logvar):
        def forward(params):
            return vae.apply({'params': params}, x, key)

        def nll(params, logvar):
            return ae.reconstruction_nll(x, forward(params)[0], logvar)[0]

        def g_loss(params):  # the discriminator in training mode, as in the step
            logits, _ = disc.apply({'params': state['disc']['params'], 'batch_stats': state['disc']['batch_stats']},
                                   forward(params)[0], mutable=['batch_stats'])
            return -jnp.mean(logits)

        def kl(params):
            return jnp.mean(ae.kl_to_standard_normal(*forward(params)[1:]))
        return (jax.grad(nll, argnums=(0, 1))(params, logvar), jax.value_and_grad(g_loss)(params),
                jax.grad(kl)(params))

    (g_nll, g_nll_logvar), (g_value, g_g), g_kl = jax.tree.map(np.asarray, by_hand(state['params'], state['logvar']))
    last = lambda tree: tree['decoder']['conv_out']['weight']  # noqa: E731
    ratio = np.linalg.norm(last(g_nll)) / (np.linalg.norm(last(g_g)) + 1e-4)
    np.testing.assert_allclose(metrics['d_weight'], min(max(ratio, 0), 1e4) * 0.5, rtol=1e-4)
    np.testing.assert_allclose(metrics['g_loss'], g_value, rtol=1e-5)
    d = float(metrics['d_weight'])
    want = jax.tree.map(lambda a, b, c: a + 0.1 * c + d * b, g_nll, g_g, g_kl)
    for got, ref in zip(jax.tree.leaves(grads), jax.tree.leaves(want)):
        np.testing.assert_allclose(got, ref, rtol=2e-4, atol=1e-6)
    np.testing.assert_allclose(g_logvar, g_nll_logvar, rtol=1e-5)
    # before disc_start the GAN is skipped: no generator term, the discriminator's Adam sees zero gradients
    early = step(dict(state, step=jnp.int32(4)))
    assert float(early[3]['d_weight']) == 0.0 and float(early[3]['d_loss']) == 0.0
    for a, b in zip(jax.tree.leaves(early[2]['params']), jax.tree.leaves(state['disc']['params'])):
        np.testing.assert_array_equal(a, b)


def test_perceptual_distance_is_lpips_shaped_and_adapts_the_resolution():
    net = SmallCNN(num_classes=10, channels=(4, 8))
    variables = net.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
    perceptual = ae.Perceptual(net, variables, 8, 1, '')
    x, y = (jax.random.uniform(k, (2, 8, 8, 1), minval=-1, maxval=1) for k in jax.random.split(jax.random.key(1)))
    distance = jax.jit(functools.partial(ae.perceptual_distance, perceptual))
    d = distance(x, y)
    assert d.shape == (2,) and bool(jnp.all(d > 0))
    np.testing.assert_allclose(distance(y, x), d, rtol=1e-6)
    np.testing.assert_allclose(distance(x, x), 0.0, atol=1e-7)
    up = lambda v: jnp.repeat(jnp.repeat(v, 2, axis=1), 2, axis=2)  # noqa: E731  # data.resolution 16 from 8
    np.testing.assert_allclose(distance(up(x), up(y)), d, rtol=1e-5)
    padded = lambda v: jnp.pad(v, ((0, 0), (1, 2), (1, 2), (0, 0)), constant_values=-1)  # noqa: E731  # 8 -> 11
    np.testing.assert_allclose(distance(padded(x), padded(y)), d, rtol=1e-5)
    blank = -jnp.ones((2, 8, 8, 1))  # dead ReLUs everywhere: the gradient stays finite
    assert bool(jnp.all(jnp.isfinite(jax.jit(jax.grad(lambda v: distance(v, x).sum()))(blank))))


# ------------------------------------------------------------------------------------------------ a tiny run

@pytest.fixture(scope='module')
def tiny_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp('ae') / 'run')
    config = tiny_config()
    config.ema.halflife_img = 500   # an EMA, so load_run's choice between EMA and params shows
    summary = registry.run(config, workdir)
    return workdir, summary


def test_tiny_run_trains_previews_evaluates_and_loads(tiny_run):
    workdir, summary = tiny_run
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
        rows = [json.loads(line) for line in f]
    assert rows[-1]['step'] == 60 and rows[-1]['rec'] < 0.8 * rows[0]['rec'] and rows[-1]['loss'] < rows[0]['loss']
    assert rows[-1]['psnr'] > rows[0]['psnr'] and rows[-1]['recon_l1'] == pytest.approx(summary['recon_l1'])
    assert os.path.isfile(summary['last_preview']) and summary['recon_psnr'] > 10
    run, raw = runs.load_run(workdir), runs.load_run(workdir, use_ema=False)
    assert run.task == 'autoencoder' and isinstance(run.net, AutoencoderKL) and set(run.variables) == {'params'}
    state = ckpt.load_arrays(workdir)
    for got, want in zip(jax.tree.leaves(run.variables), jax.tree.leaves(state['ema'])):
        np.testing.assert_array_equal(got, want)
    for got, want in zip(jax.tree.leaves(raw.variables), jax.tree.leaves(state['params'])):
        np.testing.assert_array_equal(got, want)
    assert any(np.any(a != b) for a, b in zip(jax.tree.leaves(raw.variables), jax.tree.leaves(run.variables)))
    x = jnp.zeros((2, 8, 8, 1))
    mean, logvar = run.net.apply(run.variables, x, method=run.net.encode)
    assert mean.shape == logvar.shape == (2, 4, 4, 2)
    assert run.net.apply(run.variables, mean, method=run.net.decode).shape == (2, 8, 8, 1)


def test_an_autoencoder_run_is_refused_where_another_kind_is_needed(tiny_run):
    workdir, _ = tiny_run
    with pytest.raises(ValueError, match=r'is an autoencoder run, not a diffusion model run'):
        runs.load_run(workdir, want='denoiser')
    with pytest.raises(ValueError, match=r'is an autoencoder run, not a feature classifier run'):
        ae.load_perceptual(workdir, 1, 8)


# ------------------------------------------------------------------------------------------------ check

@pytest.mark.parametrize('change, message', [
    (dict(model=dict(norm_num_groups=3)), 'model.norm_num_groups=3 does not divide the widths [8, 16]'),
    (dict(data=dict(resolution=9)), 'data.resolution=9 is not divisible by the downsampling factor 2'),
    (dict(loss=dict(perceptual_weight=1.0)), 'loss.perceptual_weight=1.0 needs loss.perceptual_run'),
    (dict(loss=dict(disc_start=0), data=dict(resolution=16)), 'loss.disc_num_layers=3 leaves no PatchGAN logits'),
    (dict(eval=dict(split='test')), "data.source=digits has one split; set eval.split=''"),
])
def test_check_refuses_impossible_settings(change, message):
    config = tiny_config()
    for group, values in change.items():
        config[group].update(values)
    with pytest.raises(ValueError, match=message.replace('[', r'\[').replace(']', r'\]')):
        ae.check(config)
    ae.check(tiny_config())
