"""The noise-conditional classifier: network shapes, its train.py task (loss falls, small-sigma accuracy beats
chance), the run-directory loader feeding classifier guidance through edm_sampler (alone and after CFG), and the
CLI end to end with resume and one-line config errors."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import parallel
from jaxdiff import transforms as G
from jaxdiff.config import base_config
from jaxdiff.data.sources import load_digits
from jaxdiff.nets.noisy_classifier import NoisyClassifier, noisy_logits
from jaxdiff.sampling import options
from jaxdiff.sampling.model import noisy_classifier_log_prob
from jaxdiff.solvers import edm_sampler
from jaxdiff.transforms.classifier import classifier_guidance
from jaxdiff.nets.from_config import build_net
from jaxdiff.tasks.denoiser import init_sharded_state, make_data, make_train_step
from jaxdiff.tasks.noisy_classifier import classifier_loss
from test_train_cli import assert_one_line_error

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CONFIG = os.path.join(ROOT, 'configs', 'classifier', 'digits_noisy.py')
FAST = {'xla_backend_optimization_level': 0, 'xla_llvm_disable_expensive_passes': True}
STEPS = 60
TINY_CLI = ['--config.batch_size=16', '--config.model.model_channels=8', '--config.model.channel_mult=(1,)',
            '--config.model.num_blocks=1', '--config.checkpoint_every=2', '--config.log_every=2']


def tiny_config():
    """A small digits classifier: 16 channels, 8x8 and 4x4 levels, lr 2e-3 after a 5-step ramp-up."""
    c = base_config()
    c.task, c.seed, c.batch_size, c.total_steps, c.sample_every = 'noisy_classifier', 0, 64, STEPS, 0
    c.data.source, c.data.use_labels = 'digits', True
    c.model.model_channels, c.model.channel_mult, c.model.num_blocks = 16, (1, 2), 1
    c.model.attn_resolutions, c.model.dropout, c.model.label_dropout = (), 0.0, 0.0
    c.loss.augment_p = 0.0
    c.optim.lr, c.optim.lr_rampup_img = 2e-3, 5 * 64
    c.ema.halflife_img = 640
    return c


@pytest.fixture(scope='module')
def trained():
    """STEPS steps of the tiny config on digits: dict(net, params (raw, after training), losses per step)."""
    config = tiny_config()
    mesh = parallel.make_mesh(1, devices=jax.devices()[:1])
    iterator, info = make_data(config)
    net = build_net(config, info)
    key = jax.random.key(0)
    state = init_sharded_state(config, net, info, key, mesh, compiler_options=FAST)
    step = make_train_step(config, net, mesh, compiler_options=FAST, loss_fn=classifier_loss)
    losses = []
    for _ in range(STEPS):
        state, metrics = step(state, parallel.host_to_global(next(iterator), mesh), key)
        losses.append(float(metrics['loss']))
    return dict(net=net, params=jax.device_get(state.params), losses=np.array(losses))


def test_network_maps_images_and_noise_labels_to_logits():
    net = NoisyClassifier(img_resolution=8, in_channels=3, num_classes=7, model_channels=8, channel_mult=(1, 2),
                          num_blocks=1, attn_resolutions=(4,))
    x = jnp.ones((5, 8, 8, 3))
    variables = net.init(jax.random.key(0), x, jnp.zeros((5,)))
    assert net.apply(variables, x, jnp.linspace(-1, 1, 5)).shape == (5, 7)
    assert noisy_logits(net, variables, x, jnp.float32(2.0)).shape == (5, 7)  # scalar sigma broadcasts
    with pytest.raises(ValueError, match='expected'):
        net.apply(variables, jnp.ones((5, 4, 4, 3)), jnp.zeros((5,)))


def test_training_lowers_the_cross_entropy(trained):
    first, last = trained['losses'][:10].mean(), trained['losses'][-10:].mean()
    assert first > 2.0  # ln 10 = 2.30 at initialisation
    assert last < first - 0.5, trained['losses']


def test_accuracy_at_small_sigma_beats_chance(trained):
    images, labels = load_digits()
    x = jnp.asarray(images[:512], jnp.float32) / 127.5 - 1
    n = jax.random.normal(jax.random.key(7), x.shape)
    net, variables = trained['net'], {'params': trained['params']}
    accuracy = {s: float(np.mean(np.argmax(noisy_logits(net, variables, x + s * n, jnp.float32(s)), -1)
                                 == labels[:512])) for s in (0.1, 20.0)}
    assert accuracy[0.1] > 0.6, accuracy  # chance is 0.1
    assert accuracy[20.0] < 0.3, accuracy  # sigma 20 drowns an image of std 0.5: the net cannot see the class


def test_log_prob_gradient_guides_edm_sampler_alone_and_after_cfg(trained):
    log_prob = noisy_classifier_log_prob((trained['net'], {'params': trained['params']}))
    x = jax.random.normal(jax.random.key(1), (4, 8, 8, 1))
    cond = jax.nn.one_hot(jnp.array([0, 3, 5, 9]), 10)
    assert log_prob(x, jnp.float32(1.0), cond).shape == (4,)
    grad = jax.grad(lambda z: log_prob(z, jnp.full((4,), 1.0), cond).sum())(x)
    assert grad.shape == x.shape and float(jnp.abs(grad).max()) > 0
    assert float(jnp.abs(jax.grad(lambda z: log_prob(z, 1.0, jnp.zeros_like(cond)).sum())(x)).max()) == 0

    def denoiser(x, sigma, c=None):  # shrinks to 0; the condition shifts the mean so CFG has something to amplify
        shift = 0.0 if c is None else 0.1 * c.sum(-1)[:, None, None, None]
        return x / (1 + jnp.reshape(sigma, (-1, 1, 1, 1)) ** 2) + shift

    z = jax.random.normal(jax.random.key(2), (4, 8, 8, 1))  # edm_sampler scales latents by sigma_max
    plain = edm_sampler(denoiser, z, cond=cond, num_steps=6)
    guided = edm_sampler(classifier_guidance(log_prob, 2.0)(denoiser), z, cond=cond, num_steps=6)
    both = edm_sampler(G.chain(G.cfg(2.0), classifier_guidance(log_prob, 2.0))(denoiser), z, cond=cond, num_steps=6)
    for out in (guided, both):
        assert out.shape == z.shape and bool(jnp.all(jnp.isfinite(out)))
        assert float(jnp.abs(out - plain).max()) > 1e-3
    assert float(jnp.abs(both - guided).max()) > 1e-3  # CFG's doubled shift is there too
    with pytest.raises(ValueError, match='cond of shape'):
        log_prob(x, 1.0, None)


def train(env, workdir, *extra):
    return subprocess.run([sys.executable, os.path.join(ROOT, 'train.py'), '--config', CONFIG, '--workdir',
                           str(workdir), *TINY_CLI, *extra], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_trained_run_feeds_guidance(tiny_runs):
    """The session's tiny noisy-classifier run (trained by the engine; its resume is tested in test_tasks.py) as
    sample.py's classifier guidance."""
    workdir, summary = tiny_runs('noisy_classifier')
    assert summary['step'] == 20 and not os.path.exists(os.path.join(workdir, 'samples'))
    tmp_path = workdir
    log_prob = noisy_classifier_log_prob(str(tmp_path))
    x = jnp.zeros((3, 8, 8, 1))
    out = log_prob(x, jnp.float32(0.5), jax.nn.one_hot(jnp.arange(3), 10))
    assert out.shape == (3,) and bool(jnp.all(out < 0))
    # sample.py's --guidance classifier:run=DIR (an unquoted path) builds the same guided denoiser.
    edm = options.resolve_solver('edm', {}, (0.002, 80.0))
    transform, _ = options.make_transform([f'classifier:run={tmp_path},scale=2'], 10, 'edm', edm, (0.002, 80.0))
    shrink = lambda x, sigma, c=None: x / (1 + jnp.reshape(sigma, (-1, 1, 1, 1)) ** 2)  # noqa: E731
    x, sigma, cond = jax.random.normal(jax.random.key(1), (3, 8, 8, 1)), jnp.full((3,), 0.5), jax.nn.one_hot(
        jnp.arange(3), 10)
    np.testing.assert_allclose(np.asarray(transform(shrink)(x, sigma, cond)),
                               np.asarray(classifier_guidance(log_prob, 2.0)(shrink)(x, sigma, cond)), rtol=1e-6)
    from jaxdiff.sampling.model import load_model
    with pytest.raises(ValueError, match=r'is a noisy classifier run, not a diffusion model run \(guide a diffusion '
                                         r'model with it: sample.py --guidance classifier:run='):
        load_model(str(tmp_path))


def test_classifier_without_labels_fails_in_one_line(env, tmp_path):
    result = train(env, tmp_path, '--config.data.use_labels=False', '--config.total_steps=2')
    assert_one_line_error(result, 1, 'use_labels=False')
    assert not os.path.exists(tmp_path / 'checkpoints')
