"""Wide ResNets for adversarial training (Zagoruyko & Komodakis 2016, as used by Gowal et al. 2020, Rebuffi et al.
2021 and Wang et al. 2023), Flax linen, NHWC.

The architecture follows the Swish WideResNet of DM-Improves-AT (``core/models/wideresnetwithswish.py``, itself the
DeepMind adversarial-robustness model zoo), so parameter counts and shapes match its checkpoints:

- the input is in [0, 1] and is standardised inside the model by the dataset mean/std (configurable; 1-channel
  data such as digits and Fashion-MNIST have their own statistics in :data:`DATASET_STATS`);
- stem: 3x3 conv to 16 channels, stride 1, no bias;
- three groups of (depth - 4) / 6 pre-activation basic blocks with 16k, 32k, 64k channels (k = width), strides
  1, 2, 2. A block is BN -> act -> 3x3 conv (stride s) -> BN -> act -> 3x3 conv, plus a shortcut. When the block
  changes the channel count (the first block of every group here) the shortcut is a 1x1 conv of stride s applied
  to the *activated* input; otherwise it is the raw input. Convs have no bias;
- head: BN -> act -> global average pool -> linear (with bias);
- BatchNorm momentum 0.01 in PyTorch's convention (running = 0.99 running + 0.01 batch: flax ``momentum=0.99``),
  eps 1e-5, affine; updated only with ``train=True`` and ``mutable=['batch_stats']``;
- padding: the strided 3x3 conv pads 0 before and 1 after (TF 'SAME'; with stride 1 'SAME' is 1 on each side),
  which is what flax's ``padding='SAME'`` does on even sides; on odd sides 'SAME' still gives the shortcut's shape;
- init: convs N(0, 2 / (k*k*out_channels)) (He, fan-out), BN scale 1 / bias 0, linear weight PyTorch's default
  U(+-1/sqrt(fan_in)) and bias 0.

Call::

    net = wrn_28_10(num_classes=10)
    variables = net.init(key, x)                                   # {'params', 'batch_stats'}
    logits = net.apply(variables, x)                               # eval: running statistics
    logits, updates = net.apply(variables, x, train=True, mutable=['batch_stats'])

x (B, H, W, C) float in [0, 1]; logits (B, num_classes) float32. The spatial side only has to survive two
stride-2 stages (8x8 digits end at 2x2, 28x28 Fashion-MNIST at 7x7, 32x32 CIFAR at 8x8).

Parameter names, for a torch converter (conv weight OIHW -> HWIO kernel, linear weight -> its transpose, BN
weight -> scale, running_mean / running_var -> batch_stats mean / var): torch ``init_conv``, ``layer.{g}.block.{i}.
{batchnorm_0, conv_0, batchnorm_1, conv_1, shortcut}``, ``batchnorm``, ``logits`` are flax ``init_conv``,
``group{g}_block{i}/{...}``, ``batchnorm``, ``logits``. (PyTorch updates the running variance with the unbiased
batch variance, flax with the biased one: they differ by a factor n/(n-1), n = batch * height * width.)
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

Array = jax.Array
Stats = Optional[Union[float, Sequence[float]]]

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)

# Per-channel (mean, std) of the training images scaled to [0, 1]. digits: scikit-learn's 8x8 digits as jaxdiff
# loads them (0..16 -> 0..255 -> [0, 1]); fashion_mnist: the 60k training images.
DATASET_STATS = {
    'cifar10': (CIFAR10_MEAN, CIFAR10_STD),
    'cifar100': (CIFAR100_MEAN, CIFAR100_STD),
    'svhn': ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    'mnist': ((0.1307,), (0.3081,)),
    'fashion_mnist': ((0.2860,), (0.3530,)),
    'digits': ((0.3053,), (0.3760,)),
}

ACTIVATIONS: dict[str, Callable[[Array], Array]] = {'relu': nn.relu, 'swish': nn.swish}  # swish == SiLU

# He normal on fan-out (k * k * out_channels), untruncated.
CONV_INIT = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')
# PyTorch's default nn.Linear / nn.Conv2d weight init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
TORCH_DEFAULT_INIT = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')


def dataset_stats(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) of dataset ``name`` (a key of :data:`DATASET_STATS`); ValueError naming the known ones."""
    if name not in DATASET_STATS:
        raise ValueError(f'no mean/std for dataset {name!r}: use one of {sorted(DATASET_STATS)} or pass mean=, std= '
                         'explicitly.')
    return DATASET_STATS[name]


def activation_fn(name: str) -> Callable[[Array], Array]:
    """The activation called ``name`` ('relu' or 'swish'); ValueError otherwise."""
    if name not in ACTIVATIONS:
        raise ValueError(f'activation={name!r} is not supported: use one of {sorted(ACTIVATIONS)}.')
    return ACTIVATIONS[name]


def check_input(x: Array, mean: Stats, std: Stats, net: str) -> None:
    """One clear error for an input that is not (B, H, W, C) or whose C does not match ``mean`` / ``std``."""
    if x.ndim != 4:
        raise ValueError(f'{net} input x has shape {x.shape}: expected (B, H, W, C) images (NHWC) in [0, 1].')
    channels = x.shape[-1]
    for name, value in (('mean', mean), ('std', std)):
        n = np.size(value) if value is not None else 1
        if n not in (1, channels):
            raise ValueError(f'{net} got {channels}-channel input but {name} has {n} entries; pass {name} with '
                             f'{channels} entries (e.g. dataset_stats(...)).')


def normalize(x: Array, mean: Stats, std: Stats) -> Array:
    """(x - mean) / std per channel (last axis) in float32; ``None`` means 0 (mean) / 1 (std)."""
    x = jnp.asarray(x, jnp.float32)
    if mean is not None:
        x = x - jnp.asarray(mean, jnp.float32)
    if std is not None:
        x = x / jnp.asarray(std, jnp.float32)
    return x


class _Block(nn.Module):
    """Pre-activation basic block: BN -> act -> conv3x3(stride) -> BN -> act -> conv3x3, plus shortcut."""

    out_channels: int
    stride: int
    activation: str
    bn_momentum: float
    bn_eps: float
    dtype: Any

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        act = activation_fn(self.activation)
        norm = dict(use_running_average=not train, momentum=self.bn_momentum, epsilon=self.bn_eps, dtype=self.dtype)
        conv = dict(use_bias=False, kernel_init=CONV_INIT, dtype=self.dtype)
        s = (self.stride, self.stride)
        out = act(nn.BatchNorm(name='batchnorm_0', **norm)(x))
        if x.shape[-1] != self.out_channels or self.stride != 1:
            shortcut = nn.Conv(self.out_channels, (1, 1), s, padding='VALID', name='shortcut', **conv)(out)
        else:
            shortcut = x
        out = nn.Conv(self.out_channels, (3, 3), s, padding='SAME', name='conv_0', **conv)(out)
        out = act(nn.BatchNorm(name='batchnorm_1', **norm)(out))
        out = nn.Conv(self.out_channels, (3, 3), padding='SAME', name='conv_1', **conv)(out)
        return shortcut + out


class WideResNet(nn.Module):
    """WRN-depth-width: (x (B, H, W, C) in [0, 1], train) -> logits (B, num_classes) float32.

    depth = 6n + 4 (n blocks per group). ``mean`` / ``std``: per-channel statistics (len C, or a scalar) used to
    standardise the input inside the model; None skips that part. ``padding`` zero-pads the [0, 1] input on every
    side first (as the reference's ``padding``). ``dtype``: compute dtype of the trunk; params, the input
    standardisation and the linear head are float32.
    """

    num_classes: int = 10
    depth: int = 28
    width: int = 10
    activation: str = 'swish'
    mean: Stats = CIFAR10_MEAN
    std: Stats = CIFAR10_STD
    padding: int = 0
    bn_momentum: float = 0.99
    bn_eps: float = 1e-5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        if self.depth < 10 or (self.depth - 4) % 6:
            raise ValueError(f'WideResNet depth={self.depth}: need depth = 6n + 4 with n >= 1 (16, 22, 28, 34, 70, '
                             '...).')
        if self.width < 1:
            raise ValueError(f'WideResNet width={self.width}: need a positive width factor.')
        activation_fn(self.activation)
        check_input(x, self.mean, self.std, 'WideResNet')
        if self.padding > 0:
            p = self.padding
            x = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
        x = normalize(x, self.mean, self.std).astype(self.dtype)
        x = nn.Conv(16, (3, 3), padding='SAME', use_bias=False, kernel_init=CONV_INIT, dtype=self.dtype,
                    name='init_conv')(x)
        n = (self.depth - 4) // 6
        for g, (mult, stride) in enumerate(((16, 1), (32, 2), (64, 2))):
            for i in range(n):
                x = _Block(mult * self.width, stride if i == 0 else 1, self.activation, self.bn_momentum,
                           self.bn_eps, self.dtype, name=f'group{g}_block{i}')(x, train)
        x = nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum, epsilon=self.bn_eps,
                         dtype=self.dtype, name='batchnorm')(x)
        x = activation_fn(self.activation)(x)
        x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        return nn.Dense(self.num_classes, kernel_init=TORCH_DEFAULT_INIT, bias_init=nn.initializers.zeros,
                        name='logits')(x)


def wrn_28_10(num_classes: int = 10, **kwargs) -> WideResNet:
    """WRN-28-10 (Swish by default): 36,479,194 parameters for 10 classes on RGB input."""
    return WideResNet(num_classes=num_classes, depth=28, width=10, **kwargs)


def wrn_70_16(num_classes: int = 10, **kwargs) -> WideResNet:
    """WRN-70-16 (Swish by default): 266,796,506 parameters for 10 classes on RGB input."""
    return WideResNet(num_classes=num_classes, depth=70, width=16, **kwargs)


def wrn_34_10(num_classes: int = 10, **kwargs) -> WideResNet:
    """WRN-34-10: 46,160,474 parameters for 10 classes on RGB input."""
    return WideResNet(num_classes=num_classes, depth=34, width=10, **kwargs)


def wrn_16_4(num_classes: int = 10, **kwargs) -> WideResNet:
    """WRN-16-4, the small preset for digits / Fashion-MNIST (pass that dataset's mean/std): 2,748,602 parameters
    for 10 classes on 1-channel input."""
    return WideResNet(num_classes=num_classes, depth=16, width=4, **kwargs)


PRESETS = {'wrn-28-10': wrn_28_10, 'wrn-70-16': wrn_70_16, 'wrn-34-10': wrn_34_10, 'wrn-16-4': wrn_16_4}


def logits_fn(net: nn.Module, variables) -> Callable[[Array], Array]:
    """The eval-mode classifier x (B, H, W, C) in [0, 1] -> logits (B, K), as :mod:`jaxdiff.robust` attacks take."""
    return lambda x: net.apply(variables, x, train=False)
