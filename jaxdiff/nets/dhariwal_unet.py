"""DhariwalUNet: EDM's re-implementation of ADM (Dhariwal & Nichol 2021), in Flax linen, NHWC.

Parameters nest like the torch module tree (``map_label/weight``, ``enc/64x64_block0/qkv/weight``,
``out_conv/bias``, ...), so that joining a parameter's path with '.' gives its torch ``state_dict`` key;
see ``jaxdiff/nets/__init__.py`` for the layouts.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from jaxdiff.nets.layers import Conv2d, GroupNorm, Init, Linear, PositionalEmbedding, UNetBlock
from jaxdiff.nets.song_unet import check_labels, drop_labels

Array = jax.Array

_INIT = Init('kaiming_uniform', weight=math.sqrt(1 / 3), bias=math.sqrt(1 / 3))
_INIT_ZERO = Init('kaiming_uniform', weight=0.0, bias=0.0)


class _Encoder(nn.Module):
    """The 'enc' half: (x (B, H, W, Cin), emb) -> list of every encoder layer's output, in creation order."""

    img_resolution: int
    model_channels: int
    channel_mult: Sequence[int]
    num_blocks: int
    attn_resolutions: Sequence[int]
    block: Callable[..., UNetBlock]
    dtype: Any

    @nn.compact
    def __call__(self, x: Array, emb: Array, train: bool) -> list[Array]:
        skips = []
        for level, mult in enumerate(self.channel_mult):
            res = self.img_resolution >> level
            if level == 0:
                x = Conv2d(self.model_channels * mult, 3, init=_INIT, dtype=self.dtype, name=f'{res}x{res}_conv')(x)
            else:
                x = self.block(x.shape[-1], down=True, name=f'{res}x{res}_down')(x, emb, train)
            skips.append(x)
            for idx in range(self.num_blocks):
                x = self.block(self.model_channels * mult, attention=res in self.attn_resolutions,
                               name=f'{res}x{res}_block{idx}')(x, emb, train)
                skips.append(x)
        return skips


class _Decoder(nn.Module):
    """The 'dec' half: (skips, emb) -> (B, H, W, model_channels * channel_mult[0]); pops skips last-first."""

    img_resolution: int
    model_channels: int
    channel_mult: Sequence[int]
    num_blocks: int
    attn_resolutions: Sequence[int]
    block: Callable[..., UNetBlock]
    dtype: Any

    @nn.compact
    def __call__(self, skips: list[Array], emb: Array, train: bool) -> Array:
        skips = list(skips)
        x = skips[-1]
        last = len(self.channel_mult) - 1
        for level, mult in reversed(list(enumerate(self.channel_mult))):
            res = self.img_resolution >> level
            if level == last:
                x = self.block(x.shape[-1], attention=True, name=f'{res}x{res}_in0')(x, emb, train)
                x = self.block(x.shape[-1], name=f'{res}x{res}_in1')(x, emb, train)
            else:
                x = self.block(x.shape[-1], up=True, name=f'{res}x{res}_up')(x, emb, train)
            for idx in range(self.num_blocks + 1):
                x = jnp.concatenate([x, skips.pop().astype(x.dtype)], axis=-1)
                x = self.block(self.model_channels * mult, attention=res in self.attn_resolutions,
                               name=f'{res}x{res}_block{idx}')(x, emb, train)
        return x


class DhariwalUNet(nn.Module):
    """ADM U-Net: (x (B, H, W, in_channels), noise_labels (B,), class_labels (B, label_dim) or None,
    augment_labels (B, augment_dim) or None, train) -> (B, H, W, out_channels) in ``dtype``.

    Keyword names and defaults are EDM's. Attention heads have 64 channels each; a block asked for attention with
    fewer than 64 output channels gets none (as in EDM). ``dtype`` is the compute dtype of the image path; params
    and the embedding MLP stay float32. With ``train=True``, dropout and label dropout use the 'dropout' rng.
    """

    img_resolution: int
    in_channels: int
    out_channels: int
    label_dim: int = 0
    augment_dim: int = 0
    model_channels: int = 192
    channel_mult: Sequence[int] = (1, 2, 3, 4)
    channel_mult_emb: int = 4
    num_blocks: int = 3
    attn_resolutions: Sequence[int] = (32, 16, 8)
    dropout: float = 0.10
    label_dropout: float = 0.0
    dtype: Any = jnp.float32

    def _embed(self, noise_labels: Array, class_labels: Optional[Array], augment_labels: Optional[Array],
               train: bool) -> Array:
        """Mapping network: labels -> float32 embedding (B, model_channels * channel_mult_emb)."""
        emb_channels = self.model_channels * self.channel_mult_emb
        emb = PositionalEmbedding(self.model_channels, name='map_noise')(noise_labels)
        if self.augment_dim and augment_labels is not None:
            emb = emb + Linear(self.model_channels, use_bias=False, init=_INIT_ZERO, name='map_augment')(
                augment_labels.astype(jnp.float32))
        emb = nn.silu(Linear(emb_channels, init=_INIT, name='map_layer0')(emb))
        emb = Linear(emb_channels, init=_INIT, name='map_layer1')(emb)
        if self.label_dim:
            labels = check_labels(self.label_dim, class_labels, emb.shape[0])
            labels = drop_labels(self, labels, self.label_dropout, train)
            # Unlike SongUNet, the labels enter unscaled and the weight carries the sqrt(label_dim) gain.
            emb = emb + Linear(emb_channels, use_bias=False, init=Init('kaiming_normal', math.sqrt(self.label_dim)),
                               name='map_label')(labels)
        return nn.silu(emb)

    @nn.compact
    def __call__(self, x: Array, noise_labels: Array, class_labels: Optional[Array] = None,
                 augment_labels: Optional[Array] = None, train: bool = False) -> Array:
        want = (self.img_resolution, self.img_resolution, self.in_channels)
        if x.ndim != 4 or x.shape[1:] != want:
            raise ValueError(f'DhariwalUNet input x has shape {x.shape}, expected (B, {", ".join(map(str, want))}) '
                             '(NHWC).')
        emb = self._embed(noise_labels, class_labels, augment_labels, train)
        block = functools.partial(UNetBlock, channels_per_head=64, dropout=self.dropout, init=_INIT,
                                  init_zero=_INIT_ZERO, dtype=self.dtype)
        levels = dict(img_resolution=self.img_resolution, model_channels=self.model_channels,
                      channel_mult=tuple(self.channel_mult), num_blocks=self.num_blocks,
                      attn_resolutions=tuple(self.attn_resolutions), block=block, dtype=self.dtype)
        skips = _Encoder(name='enc', **levels)(x.astype(self.dtype), emb, train)
        x = _Decoder(name='dec', **levels)(skips, emb, train)
        x = GroupNorm(dtype=self.dtype, name='out_norm')(x)
        return Conv2d(self.out_channels, 3, init=_INIT_ZERO, dtype=self.dtype, name='out_conv')(nn.silu(x))
