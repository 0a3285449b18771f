"""AutoencoderKL: the variational autoencoder of Stable Diffusion (diffusers' ``AutoencoderKL``, "kl-f8"), Flax
linen, NHWC.

Parameters nest like diffusers' module tree, so that joining a parameter's path with '.' gives its diffusers
``state_dict`` key: ``encoder.down_blocks.0.resnets.0.norm1.weight``, ``encoder.mid_block.attentions.0.to_q.bias``,
``encoder.mid_block.attentions.0.to_out.0.weight``, ``decoder.up_blocks.0.upsamplers.0.conv.weight``,
``quant_conv.weight``, ... Layouts as everywhere in ``jaxdiff.nets``: conv weight HWIO (torch OIHW
``.transpose(2, 3, 1, 0)``), linear weight (in, out) (torch ``.T``). ``jaxdiff.nets.convert_autoencoder`` loads
diffusers (and CompVis) checkpoints.

Usage::

    vae = AutoencoderKL()                                         # SD's kl-f8 VAE: 3 -> 4 channels, /8
    variables = vae.init(key, jnp.zeros((1, 64, 64, 3)))
    mean, logvar = vae.apply(variables, x, method=vae.encode)     # x (B, H, W, 3) in [-1, 1]
    z = latent_sample(mean, logvar, key)                           # (B, H/8, W/8, 4)
    x_hat = vae.apply(variables, z, method=vae.decode)            # (B, H, W, 3)

Latent diffusion scales the latents by the checkpoint's ``scaling_factor`` (0.18215 for SD 1.x/2.x); that
constant belongs to the pipeline, not to this module.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax import lax

from jaxdiff.nets.layers import Conv2d, GroupNorm, Init, Linear, initializer

Array = jax.Array

# torch's default for nn.Conv2d / nn.Linear (weight and bias uniform in +-1/sqrt(fan_in)): a VAE trained from
# scratch here starts where diffusers' would. Kaiming-uniform's bound is sqrt(3 / fan_in), hence the gains.
_INIT = Init('kaiming_uniform', weight=math.sqrt(1 / 3), bias=math.sqrt(1 / 3))
_EPS = 1e-6  # every GroupNorm of the VAE (resnets, attention, conv_norm_out)
LOGVAR_RANGE = (-30.0, 20.0)  # diffusers' DiagonalGaussianDistribution clamps logvar to this


class ModuleList(nn.Module):
    """torch's ``nn.ModuleList`` for parameter paths: child i is ``make(i)``, named ``str(i)``, so its parameters
    live under '<list name>.<i>.'. Index it (``blocks[0](x)``) or iterate over it; it has no ``__call__``."""

    make: Callable[[int], nn.Module]
    length: int

    def setup(self) -> None:
        for i in range(self.length):
            setattr(self, str(i), self.make(i))

    def __getitem__(self, i: int) -> nn.Module:
        return getattr(self, str(i))

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        return (self[i] for i in range(self.length))


def _group_norm(groups: int, dtype: Any, name: str) -> GroupNorm:
    """torch's GroupNorm(groups, C, eps=1e-6): exactly ``groups`` groups (min_channels_per_group=1 keeps
    layers.GroupNorm from lowering the count; AutoencoderKL checks that ``groups`` divides every width)."""
    return GroupNorm(num_groups=groups, min_channels_per_group=1, eps=_EPS, dtype=dtype, name=name)


class ResnetBlock2D(nn.Module):
    """diffusers' ResnetBlock2D without time embedding: (B, H, W, Cin) -> (B, H, W, out_channels).

    norm1 -> SiLU -> conv1 (3x3) -> norm2 -> SiLU -> conv2 (3x3), plus the input (through the 1x1
    ``conv_shortcut`` when Cin != out_channels). The VAE's dropout is 0 and its output_scale_factor 1, so
    neither appears.
    """

    out_channels: int
    norm_num_groups: int = 32
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cout, dt = self.out_channels, self.dtype
        h = nn.silu(_group_norm(self.norm_num_groups, dt, 'norm1')(x))
        h = Conv2d(cout, 3, init=_INIT, dtype=dt, name='conv1')(h)
        h = nn.silu(_group_norm(self.norm_num_groups, dt, 'norm2')(h))
        h = Conv2d(cout, 3, init=_INIT, dtype=dt, name='conv2')(h)
        if x.shape[-1] != cout:
            x = Conv2d(cout, 1, init=_INIT, dtype=dt, name='conv_shortcut')(x)
        return x.astype(dt) + h


class Attention(nn.Module):
    """diffusers' mid-block ``Attention`` of the VAE: one head over all H*W pixels, with residual.

    (B, H, W, C) -> (B, H, W, C): x + to_out.0(softmax(q k^T / sqrt(C)) v), with q, k, v = to_q/to_k/to_v of
    group_norm(x). Pixels are taken in row-major (h, w) order, as diffusers' ``view(B, C, H*W).transpose(1, 2)``
    does. Logits and softmax are float32 whatever the compute dtype.
    """

    norm_num_groups: int = 32
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        b, h, w, c = x.shape
        dt = self.dtype
        tokens = _group_norm(self.norm_num_groups, dt, 'group_norm')(x).reshape(b, h * w, c)
        q, k, v = (Linear(c, init=_INIT, dtype=dt, name=name)(tokens) for name in ('to_q', 'to_k', 'to_v'))
        logits = jnp.einsum('bqc,bkc->bqk', q, k, preferred_element_type=jnp.float32) / math.sqrt(c)
        weights = jax.nn.softmax(logits, axis=-1).astype(dt)
        out = jnp.einsum('bqk,bkc->bqc', weights, v)
        # to_out is a ModuleList in diffusers ([Linear, Dropout]); only the Linear holds parameters.
        out = ModuleList(lambda i: Linear(c, init=_INIT, dtype=dt), 1, name='to_out')[0](out)
        return out.reshape(b, h, w, c) + x.astype(dt)


class _StridedConv(nn.Module):
    """3x3 stride-2 conv with explicit zero padding ((top, bottom), (left, right)): (B, H, W, Cin) ->
    (B, (H + top + bottom - 3) // 2 + 1, ..., out_channels). Params ``weight`` (3, 3, Cin, out) and ``bias``,
    initialised like layers.Conv2d's (which has no plain stride)."""

    out_channels: int
    padding: Sequence[tuple[int, int]]
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cin, cout = x.shape[-1], self.out_channels
        fans = (cin * 9, cout * 9)
        w = self.param('weight', initializer(_INIT.mode, _INIT.weight, *fans), (3, 3, cin, cout))
        b = self.param('bias', initializer(_INIT.mode, _INIT.bias, *fans), (cout,))
        y = lax.conv_general_dilated(x.astype(self.dtype), w.astype(self.dtype), (2, 2), tuple(self.padding),
                                     dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
        return y + b.astype(self.dtype)


class Downsample2D(nn.Module):
    """diffusers' Downsample2D(use_conv=True, padding=0): (B, H, W, C) -> (B, H // 2, W // 2, C).

    The input is padded by one row at the bottom and one column at the right only (torch ``F.pad(x, (0, 1, 0,
    1))``), then a 3x3 stride-2 conv ``conv`` runs without further padding: output pixel i sees input rows 2i,
    2i+1, 2i+2, not the centred window a symmetric padding would give.
    """

    out_channels: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        return _StridedConv(self.out_channels, ((0, 1), (0, 1)), dtype=self.dtype, name='conv')(x)


class Upsample2D(nn.Module):
    """diffusers' Upsample2D(use_conv=True): nearest-neighbour 2x, then 3x3 conv ``conv``:
    (B, H, W, C) -> (B, 2H, 2W, out_channels)."""

    out_channels: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x = jnp.repeat(jnp.repeat(x.astype(self.dtype), 2, axis=1), 2, axis=2)
        return Conv2d(self.out_channels, 3, init=_INIT, dtype=self.dtype, name='conv')(x)


class _Level(nn.Module):
    """One level of the encoder or decoder: ``num_layers`` ResNet blocks to ``out_channels``, then an optional
    ``resample`` module ('downsamplers' for DownEncoderBlock2D, 'upsamplers' for UpDecoderBlock2D):
    (B, H, W, Cin) -> (B, H', W', out_channels), H' = H // 2 (down), 2H (up) or H."""

    out_channels: int
    num_layers: int
    resample: Optional[str] = None   # None | 'downsamplers' | 'upsamplers' (the diffusers ModuleList's name)
    norm_num_groups: int = 32
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        resnets = ModuleList(lambda i: ResnetBlock2D(self.out_channels, self.norm_num_groups, self.dtype),
                             self.num_layers, name='resnets')
        for resnet in resnets:
            x = resnet(x)
        if self.resample:
            kind = Downsample2D if self.resample == 'downsamplers' else Upsample2D
            x = ModuleList(lambda i: kind(self.out_channels, self.dtype), 1, name=self.resample)[0](x)
        return x


def DownEncoderBlock2D(out_channels: int, num_layers: int, add_downsample: bool, **kwargs) -> _Level:
    """diffusers' DownEncoderBlock2D: ResNet blocks, then (``add_downsample``) a Downsample2D (H -> H // 2)."""
    return _Level(out_channels, num_layers, 'downsamplers' if add_downsample else None, **kwargs)


def UpDecoderBlock2D(out_channels: int, num_layers: int, add_upsample: bool, **kwargs) -> _Level:
    """diffusers' UpDecoderBlock2D: ResNet blocks, then (``add_upsample``) an Upsample2D (H -> 2H)."""
    return _Level(out_channels, num_layers, 'upsamplers' if add_upsample else None, **kwargs)


class UNetMidBlock2D(nn.Module):
    """resnets.0 -> attentions.0 -> resnets.1 at constant width: (B, H, W, C) -> (B, H, W, C).
    ``add_attention=False`` (diffusers' mid_block_add_attention) drops the attention."""

    norm_num_groups: int = 32
    add_attention: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = x.shape[-1]
        resnets = ModuleList(lambda i: ResnetBlock2D(c, self.norm_num_groups, self.dtype), 2, name='resnets')
        x = resnets[0](x)
        if self.add_attention:
            x = ModuleList(lambda i: Attention(self.norm_num_groups, self.dtype), 1, name='attentions')[0](x)
        return resnets[1](x)


class Encoder(nn.Module):
    """diffusers' VAE Encoder: (B, H, W, in_channels) -> (B, H / 2^(L-1), W / 2^(L-1), 2 * latent_channels),
    L = len(block_out_channels) (an odd size rounds down at each halving). Output channels: mean, then logvar."""

    latent_channels: int
    block_out_channels: Sequence[int]
    layers_per_block: int
    norm_num_groups: int
    mid_block_add_attention: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        dt, channels, groups = self.dtype, tuple(self.block_out_channels), self.norm_num_groups
        x = Conv2d(channels[0], 3, init=_INIT, dtype=dt, name='conv_in')(x)
        down_blocks = ModuleList(lambda i: DownEncoderBlock2D(
            channels[i], self.layers_per_block, add_downsample=i < len(channels) - 1, norm_num_groups=groups,
            dtype=dt), len(channels), name='down_blocks')
        for block in down_blocks:
            x = block(x)
        x = UNetMidBlock2D(groups, self.mid_block_add_attention, dt, name='mid_block')(x)
        x = nn.silu(_group_norm(groups, dt, 'conv_norm_out')(x))
        return Conv2d(2 * self.latent_channels, 3, init=_INIT, dtype=dt, name='conv_out')(x)


class Decoder(nn.Module):
    """diffusers' VAE Decoder: (B, h, w, latent_channels) -> (B, h * 2^(L-1), w * 2^(L-1), out_channels),
    L = len(block_out_channels). Up block i has width block_out_channels[L-1-i] and layers_per_block + 1
    ResNet blocks."""

    out_channels: int
    block_out_channels: Sequence[int]
    layers_per_block: int
    norm_num_groups: int
    mid_block_add_attention: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, z: Array) -> Array:
        dt, groups = self.dtype, self.norm_num_groups
        channels = tuple(reversed(self.block_out_channels))
        x = Conv2d(channels[0], 3, init=_INIT, dtype=dt, name='conv_in')(z)
        x = UNetMidBlock2D(groups, self.mid_block_add_attention, dt, name='mid_block')(x)
        up_blocks = ModuleList(lambda i: UpDecoderBlock2D(
            channels[i], self.layers_per_block + 1, add_upsample=i < len(channels) - 1, norm_num_groups=groups,
            dtype=dt), len(channels), name='up_blocks')
        for block in up_blocks:
            x = block(x)
        x = nn.silu(_group_norm(groups, dt, 'conv_norm_out')(x))
        return Conv2d(self.out_channels, 3, init=_INIT, dtype=dt, name='conv_out')(x)


def latent_sample(mean: Array, logvar: Array, key: Array) -> Array:
    """A draw from the diagonal Gaussian posterior: mean + exp(logvar / 2) * N(0, 1), any shape (B, h, w, c)."""
    return mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)


class AutoencoderKL(nn.Module):
    """Stable Diffusion's KL autoencoder (diffusers ``AutoencoderKL`` with DownEncoderBlock2D/UpDecoderBlock2D).

    ``encode``: x (B, H, W, in_channels) -> (mean, logvar), each (B, H / f, W / f, latent_channels) float32,
    f = 2^(len(block_out_channels) - 1) (an odd size rounds down at each halving: 30 -> 15 -> 7); logvar clamped to
    [-30, 20]. ``decode``: z (B, h, w, latent_channels) -> (B, h * f, w * f, out_channels) in ``dtype``.
    ``__call__(x, key, sample_posterior)`` -> (reconstruction, mean, logvar).

    The defaults are SD's kl-f8 VAE (83,653,863 parameters). ``norm_num_groups`` must divide every entry of
    ``block_out_channels`` (torch's GroupNorm requires it). ``dtype`` is the compute dtype; parameters are
    float32 and GroupNorm statistics and attention softmax are computed in float32. ``mid_block_add_attention``,
    ``use_quant_conv`` and ``use_post_quant_conv`` are diffusers' config switches of the same names.
    """

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: Sequence[int] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    mid_block_add_attention: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    dtype: Any = jnp.float32

    def setup(self) -> None:
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups or c < self.norm_num_groups]
        if bad:
            raise ValueError(f'AutoencoderKL: norm_num_groups={self.norm_num_groups} does not divide the widths '
                             f'{bad} of block_out_channels={tuple(self.block_out_channels)}; choose widths that '
                             'are multiples of it (as torch GroupNorm requires).')
        levels = dict(block_out_channels=tuple(self.block_out_channels), layers_per_block=self.layers_per_block,
                      norm_num_groups=self.norm_num_groups, mid_block_add_attention=self.mid_block_add_attention,
                      dtype=self.dtype)
        self.encoder = Encoder(self.latent_channels, **levels)
        self.decoder = Decoder(self.out_channels, **levels)
        if self.use_quant_conv:
            self.quant_conv = Conv2d(2 * self.latent_channels, 1, init=_INIT, dtype=self.dtype)
        if self.use_post_quant_conv:
            self.post_quant_conv = Conv2d(self.latent_channels, 1, init=_INIT, dtype=self.dtype)

    def encode(self, x: Array) -> tuple[Array, Array]:
        """x (B, H, W, in_channels) -> (mean, logvar), each (B, H / f, W / f, latent_channels) float32."""
        if x.ndim != 4 or x.shape[-1] != self.in_channels:
            raise ValueError(f'AutoencoderKL.encode: x has shape {x.shape}, expected (B, H, W, {self.in_channels}) '
                             '(NHWC).')
        moments = self.encoder(x.astype(self.dtype))
        if self.use_quant_conv:
            moments = self.quant_conv(moments)
        # The posterior's moments are small; float32 keeps the KL term and the reparametrised draw exact-ish
        # under a bfloat16 compute dtype.
        mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
        return mean, jnp.clip(logvar, *LOGVAR_RANGE)

    def decode(self, z: Array) -> Array:
        """z (B, h, w, latent_channels) -> (B, h * f, w * f, out_channels) in ``dtype``."""
        if z.ndim != 4 or z.shape[-1] != self.latent_channels:
            raise ValueError(f'AutoencoderKL.decode: z has shape {z.shape}, expected (B, h, w, '
                             f'{self.latent_channels}) (NHWC).')
        z = z.astype(self.dtype)
        if self.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def __call__(self, x: Array, key: Optional[Array] = None,
                 sample_posterior: bool = True) -> tuple[Array, Array, Array]:
        """x (B, H, W, in_channels) -> (reconstruction (B, H', W', out_channels), mean, logvar (B, H/f, W/f,
        latent_channels)); H' = H when H is a multiple of f. The decoded latent is a posterior draw with ``key``
        when ``sample_posterior`` and a key is given, else the mean."""
        mean, logvar = self.encode(x)
        z = latent_sample(mean, logvar, key) if sample_posterior and key is not None else mean
        return self.decode(z), mean, logvar
