"""The training state: one pytree holding everything a step reads and writes (and a checkpoint saves)."""
from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
from flax import linen as nn

from jaxdiff.train.model import is_classifier
from jaxdiff.train.optimizer import make_optimizer


class TrainState(flax.struct.PyTreeNode):
    """step: int32 () optimizer steps taken; params: float32 net params; ema: EMA of params (same tree);
    opt_state: optax Adam state; buffers: the net's non-trained variables ({} if none; NCSN++'s Fourier
    frequencies); nonfinite: int32 () count of steps whose gradients held a NaN or inf."""

    step: jax.Array
    params: dict
    ema: dict
    opt_state: object
    buffers: dict
    nonfinite: jax.Array

    def variables(self, params=None) -> dict:
        """The net's variables {'params': params (default self.params), **buffers-collection} for net.apply."""
        out = {'params': self.params if params is None else params}
        if self.buffers:
            out['buffers'] = self.buffers
        return out


def dummy_inputs(net: nn.Module, info) -> tuple:
    """Batch-1 zero inputs (x (1,res,res,C), noise_labels (1,), class_labels, augment_labels) for net.init."""
    x = jnp.zeros((1, info.resolution, info.resolution, info.channels), jnp.float32)
    labels = jnp.zeros((1, net.label_dim), jnp.float32) if net.label_dim else None
    augment = jnp.zeros((1, net.augment_dim), jnp.float32) if net.augment_dim else None
    return x, jnp.zeros((1,), jnp.float32), labels, augment


def init_variables(config, net: nn.Module, info, key: jax.Array) -> dict:
    """net.init on batch-1 zero inputs: (x, noise_labels) for the noisy classifier, :func:`dummy_inputs` else."""
    if is_classifier(config):
        x = jnp.zeros((1, info.resolution, info.resolution, info.channels), jnp.float32)
        return net.init({'params': key}, x, jnp.zeros((1,), jnp.float32))
    x, noise, labels, augment = dummy_inputs(net, info)
    return net.init({'params': key}, x, noise, labels, augment_labels=augment)


def init_state(config, net: nn.Module, info, key: jax.Array) -> TrainState:
    """Fresh state: params (and buffers) from net.init with ``key``, ema = params, Adam state, step 0."""
    variables = jax.jit(lambda k: init_variables(config, net, info, k))(key)
    params = variables['params']
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema=jax.tree.map(jnp.copy, params),
                      opt_state=make_optimizer(config).init(params), buffers=variables.get('buffers', {}),
                      nonfinite=jnp.zeros((), jnp.int32))
