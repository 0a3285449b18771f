"""Task ``noisy_classifier``: p(y | x_sigma, sigma) for classifier guidance, the EDM recipe of
:mod:`jaxdiff.tasks.denoiser` (Adam ramp-up, EMA, non-finite guard, data) with the classifier's loss.

    python train.py --config configs/classifier/digits_noisy.py --workdir runs/digits_noisy_classifier

Loss (:func:`classifier_loss`): softmax cross-entropy of the label on x + sigma n, with ln(sigma) uniform over
[loss.sigma_min, loss.sigma_max] (0.002..80, the EDM sampler's range). Dhariwal & Nichol draw t uniformly; a
uniform ln(sigma) is the analogue that gives every decade of noise the sampler visits the same weight, not just the
denoiser's P_mean/P_std band: guidance queries the classifier at every sampler step.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn

from jaxdiff.config import RANGES, base_config
from jaxdiff.engine.task import Task
from jaxdiff.nets.noisy_classifier import noisy_logits
from jaxdiff.tasks import denoiser


def log_uniform_sigma(key: jax.Array, batch: int, sigma_min: float, sigma_max: float) -> jax.Array:
    """(batch,) float32 noise levels with ln(sigma) uniform over [ln sigma_min, ln sigma_max]."""
    log_sigma = jax.random.uniform(key, (batch,), jnp.float32, jnp.log(sigma_min), jnp.log(sigma_max))
    return jnp.exp(log_sigma)


def classifier_loss(config, net: nn.Module, variables: dict, batch: dict, keys: dict) -> jax.Array:
    """Noisy classifier loss: mean softmax cross-entropy of batch['label'] (B,) on x + sigma n.

    batch: image float32 (B, H, W, C) in [-1, 1], label int32 (B,); sigma per :func:`log_uniform_sigma` over
    config.loss.sigma_min..sigma_max; the net sees EDM-preconditioned inputs (``noisy_logits``).
    """
    images = batch['image'].astype(jnp.float32)
    sigma = log_uniform_sigma(keys['sigma'], images.shape[0], config.loss.sigma_min, config.loss.sigma_max)
    noisy = images + sigma[:, None, None, None] * jax.random.normal(keys['noise'], images.shape, jnp.float32)
    logits = noisy_logits(net, variables, noisy, sigma, sigma_data=config.model.sigma_data, train=True,
                          rngs={'dropout': keys['dropout']})
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch['label']).mean()


TASK = Task('noisy_classifier', base_config, denoiser.check, functools.partial(denoiser.setup, classifier_loss, False),
            ranges=RANGES, kind='noisy classifier',
            use='guide a diffusion model with it: sample.py --guidance classifier:run={dir}',
            configs='configs/classifier/*_noisy.py')
