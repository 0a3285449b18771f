"""Pre-activation ResNets (He et al. 2016, "Identity mappings") for adversarial training, Flax linen, NHWC.

Follows DM-Improves-AT's ``core/models/preact_resnet.py`` (PreAct ResNet-18 / -34 with basic blocks), so
parameter counts and shapes match its checkpoints:

- stem: 3x3 conv to 64 channels, stride 1, padding 1, no bias (no BN / activation after it);
- four stages of basic blocks with 64, 128, 256, 512 channels, strides 1, 2, 2, 2 ([2, 2, 2, 2] blocks for
  ResNet-18, [3, 4, 6, 3] for ResNet-34). A block is BN -> act -> (shortcut) -> 3x3 conv (stride s, padding 1)
  -> BN -> act -> 3x3 conv, plus the shortcut: a 1x1 conv of stride s on the *activated* input when the stride
  or the channel count changes, else the raw input. Convs have no bias;
- head: BN -> act -> global average pool -> linear (with bias);
- BatchNorm with PyTorch's defaults: momentum 0.1 (flax ``momentum=0.9``), eps 1e-5, affine; updated only with
  ``train=True`` and ``mutable=['batch_stats']``;
- init: PyTorch's defaults (conv and linear weights U(+-1/sqrt(fan_in)), linear bias U(+-1/sqrt(fan_in)), BN
  scale 1 / bias 0); activation ReLU.

The reference model itself sees raw [0, 1] input; its trainer optionally puts a parameter-free standardisation in
front (``--normalize``, off by default). Here that is ``mean`` / ``std`` (default None: no standardisation; pass
e.g. ``dataset_stats('cifar10')``). ``activation='swish'`` swaps the activation function only: it is not
Rebuffi et al.'s 'preact-resnet-swish', whose blocks differ.

Call exactly as :class:`jaxdiff.nets.wide_resnet.WideResNet`: x (B, H, W, C) in [0, 1] -> logits (B, num_classes)
float32; ``train=True`` with ``mutable=['batch_stats']``. Parameter names for a torch converter: torch
``conv1``, ``layer{s}.{i}.{bn1, conv1, bn2, conv2, shortcut.0}``, ``bn``, ``linear`` are flax ``conv1``,
``layer{s}_{i}/{bn1, conv1, bn2, conv2, shortcut}``, ``bn``, ``linear``.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from jaxdiff.nets.wide_resnet import TORCH_DEFAULT_INIT, Stats, activation_fn, check_input, normalize

Array = jax.Array


def _torch_bias_init(fan_in: int):
    """PyTorch's default linear bias init U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


class PreActBlock(nn.Module):
    """Pre-activation basic block (expansion 1)."""

    out_channels: int
    stride: int = 1
    activation: str = 'relu'
    bn_momentum: float = 0.9
    bn_eps: float = 1e-5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        act = activation_fn(self.activation)
        norm = dict(use_running_average=not train, momentum=self.bn_momentum, epsilon=self.bn_eps, dtype=self.dtype)
        conv = dict(use_bias=False, kernel_init=TORCH_DEFAULT_INIT, dtype=self.dtype)
        s = (self.stride, self.stride)
        out = act(nn.BatchNorm(name='bn1', **norm)(x))
        if self.stride != 1 or x.shape[-1] != self.out_channels:
            shortcut = nn.Conv(self.out_channels, (1, 1), s, padding='VALID', name='shortcut', **conv)(out)
        else:
            shortcut = x
        out = nn.Conv(self.out_channels, (3, 3), s, padding=((1, 1), (1, 1)), name='conv1', **conv)(out)
        out = act(nn.BatchNorm(name='bn2', **norm)(out))
        out = nn.Conv(self.out_channels, (3, 3), padding=((1, 1), (1, 1)), name='conv2', **conv)(out)
        return out + shortcut


class PreActResNet(nn.Module):
    """(x (B, H, W, C) in [0, 1], train) -> logits (B, num_classes) float32.

    ``num_blocks[s]`` basic blocks of ``widths[s]`` channels in stage s (stride 1 in the first stage, 2 after).
    ``dtype``: compute dtype of the trunk; params, the input standardisation and the head are float32.
    """

    num_classes: int = 10
    num_blocks: Sequence[int] = (2, 2, 2, 2)
    widths: Sequence[int] = (64, 128, 256, 512)
    activation: str = 'relu'
    mean: Stats = None
    std: Stats = None
    bn_momentum: float = 0.9
    bn_eps: float = 1e-5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        if len(self.num_blocks) != len(self.widths) or not self.num_blocks or min(self.num_blocks) < 1:
            raise ValueError(f'PreActResNet num_blocks={tuple(self.num_blocks)}, widths={tuple(self.widths)}: need '
                             'one positive block count per stage width.')
        activation_fn(self.activation)
        check_input(x, self.mean, self.std, 'PreActResNet')
        x = normalize(x, self.mean, self.std).astype(self.dtype)
        x = nn.Conv(self.widths[0], (3, 3), padding=((1, 1), (1, 1)), use_bias=False, kernel_init=TORCH_DEFAULT_INIT,
                    dtype=self.dtype, name='conv1')(x)
        for s, (blocks, width) in enumerate(zip(self.num_blocks, self.widths)):
            for i in range(blocks):
                stride = 2 if s > 0 and i == 0 else 1
                x = PreActBlock(width, stride, self.activation, self.bn_momentum, self.bn_eps, self.dtype,
                                name=f'layer{s + 1}_{i}')(x, train)
        x = nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum, epsilon=self.bn_eps,
                         dtype=self.dtype, name='bn')(x)
        x = activation_fn(self.activation)(x)
        x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        return nn.Dense(self.num_classes, kernel_init=TORCH_DEFAULT_INIT, bias_init=_torch_bias_init(x.shape[-1]),
                        name='linear')(x)


def PreActResNet18(num_classes: int = 10, **kwargs) -> PreActResNet:  # noqa: N802 (named like the reference)
    """PreAct ResNet-18: 11,172,170 parameters for 10 classes on RGB input."""
    return PreActResNet(num_classes=num_classes, num_blocks=(2, 2, 2, 2), **kwargs)


def PreActResNet34(num_classes: int = 10, **kwargs) -> PreActResNet:  # noqa: N802
    """PreAct ResNet-34: 21,280,330 parameters for 10 classes on RGB input."""
    return PreActResNet(num_classes=num_classes, num_blocks=(3, 4, 6, 3), **kwargs)


preact_resnet18 = PreActResNet18
preact_resnet34 = PreActResNet34
