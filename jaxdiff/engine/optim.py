"""Adam with EDM's linear learning-rate ramp-up, counted in images.

lr(step) = lr * min(step * batch_size / lr_rampup_img, 1): the images seen *before* the step, so step 0 runs
with lr 0, as EDM's training loop.
"""
from __future__ import annotations

import jax.numpy as jnp
import optax


def learning_rate(config, step) -> jnp.ndarray:
    """lr for the update at ``step`` (int or int32 array ()); float32 ()."""
    cur_nimg = jnp.asarray(step, jnp.float32) * config.batch_size
    return config.optim.lr * jnp.minimum(cur_nimg / max(config.optim.lr_rampup_img, 1e-8), 1.0)


def make_optimizer(config) -> optax.GradientTransformation:
    """optax Adam(beta1, beta2, eps) whose step count drives :func:`learning_rate` (count = state.step)."""
    o = config.optim
    return optax.adam(lambda count: learning_rate(config, count), b1=o.beta1, b2=o.beta2, eps=o.eps)
