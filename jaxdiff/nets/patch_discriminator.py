"""taming-transformers' PatchGAN discriminator (pix2pix's ``NLayerDiscriminator``), the adversarial term of
latent diffusion's autoencoder loss (:mod:`jaxdiff.tasks.autoencoder`). Flax linen, NHWC."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import linen as nn

from jaxdiff.nets.layers import initializer


def _torch_conv_bias(fan_in: int):
    """torch's default Conv2d bias init, uniform in +-1/sqrt(fan_in) (taming's weights_init leaves biases)."""
    return initializer('kaiming_uniform', math.sqrt(1 / 3), fan_in, 1)


def _bn_scale(key, shape, dtype=jnp.float32):
    """taming's weights_init for BatchNorm scales: N(1, 0.02)."""
    return 1.0 + 0.02 * jax.random.normal(key, shape, dtype)


class NLayerDiscriminator(nn.Module):
    """taming-transformers' PatchGAN (pix2pix's): x (B, H, W, C) -> logits (B, h, w, 1), h = H / 2^num_layers - 2.

    4x4 convs with padding 1: ``channels`` (stride 2) -> LeakyReLU(0.2), then for n = 1..num_layers a conv to
    channels * min(2^n, 8) (stride 2, the last stride 1; no bias) -> BatchNorm -> LeakyReLU(0.2), then a conv to 1
    channel. Conv weights N(0, 0.02), BatchNorm scale N(1, 0.02) (taming's weights_init); BatchNorm momentum 0.1
    (flax 0.9) and eps 1e-5 as torch. ``train``: batch statistics (running ones updated; mutable 'batch_stats').
    """

    channels: int = 64
    num_layers: int = 3

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
        def conv(width: int, stride: int, bias: bool, h: jax.Array) -> jax.Array:
            return nn.Conv(width, (4, 4), stride, padding=((1, 1), (1, 1)), use_bias=bias,
                           kernel_init=nn.initializers.normal(0.02),
                           bias_init=_torch_conv_bias(16 * h.shape[-1]))(h)

        x = nn.leaky_relu(conv(self.channels, 2, True, x.astype(jnp.float32)), 0.2)
        for n in range(1, self.num_layers + 1):
            x = conv(self.channels * min(2 ** n, 8), 2 if n < self.num_layers else 1, False, x)
            x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, scale_init=_bn_scale)(x)
            x = nn.leaky_relu(x, 0.2)
        return conv(1, 1, True, x)
