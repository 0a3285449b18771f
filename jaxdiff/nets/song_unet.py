"""SongUNet: EDM's re-implementation of DDPM++ and NCSN++ (Song et al. 2021), in Flax linen, NHWC.

Parameters nest like the torch module tree (``map_layer0/weight``, ``enc/32x32_block0/conv0/weight``,
``dec/32x32_aux_norm/bias``, ...), so that joining a parameter's path with '.' gives its torch ``state_dict`` key;
see ``jaxdiff/nets/__init__.py`` for the layouts and the ``buffers`` collection (NCSN++'s Fourier frequencies).
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from jaxdiff.nets.layers import Conv2d, FourierEmbedding, GroupNorm, Init, Linear, PositionalEmbedding, UNetBlock

Array = jax.Array

_INIT = Init('xavier_uniform')
_INIT_ZERO = Init('xavier_uniform', weight=1e-5)
_INIT_ATTN = Init('xavier_uniform', weight=math.sqrt(0.2))


def check_labels(label_dim: int, class_labels: Optional[Array], batch: int) -> Array:
    """Returns class_labels as float32 (B, label_dim), or raises one clear error naming the mismatch."""
    if class_labels is None:
        raise ValueError(f'class_labels is None but the net has label_dim={label_dim}: pass (B, {label_dim}) '
                         'one-hot labels (zeros for the unconditional branch).')
    if class_labels.shape != (batch, label_dim):
        raise ValueError(f'class_labels has shape {class_labels.shape}, expected ({batch}, {label_dim}).')
    return class_labels.astype(jnp.float32)


def drop_labels(module: nn.Module, labels: Array, rate: float, train: bool) -> Array:
    """Zeroes whole label rows with probability ``rate`` when training (classifier-free guidance); rng 'dropout'."""
    if not (train and rate):
        return labels
    keep = jax.random.uniform(module.make_rng('dropout'), (labels.shape[0], 1)) >= rate
    return labels * keep.astype(labels.dtype)


class _Encoder(nn.Module):
    """The 'enc' half: (x (B, H, W, Cin), emb) -> list of skip activations, in creation order."""

    img_resolution: int
    model_channels: int
    channel_mult: Sequence[int]
    num_blocks: int
    attn_resolutions: Sequence[int]
    encoder_type: str
    resample_filter: Sequence[int]
    block: Callable[..., UNetBlock]
    dtype: Any

    @nn.compact
    def __call__(self, x: Array, emb: Array, train: bool) -> list[Array]:
        skips = []
        aux = x
        for level, mult in enumerate(self.channel_mult):
            res = self.img_resolution >> level
            if level == 0:
                x = Conv2d(self.model_channels, 3, init=_INIT, dtype=self.dtype, name=f'{res}x{res}_conv')(x)
                skips.append(x)
            else:
                x = self.block(x.shape[-1], down=True, name=f'{res}x{res}_down')(x, emb, train)
                skips.append(x)
                if self.encoder_type == 'skip':
                    # Progressive input: the image, downsampled, is projected and added at every level.
                    aux = Conv2d(aux.shape[-1], 0, down=True, resample_filter=self.resample_filter,
                                 dtype=self.dtype, name=f'{res}x{res}_aux_down')(aux)
                    x = skips[-1] = x + Conv2d(x.shape[-1], 1, init=_INIT, dtype=self.dtype,
                                               name=f'{res}x{res}_aux_skip')(aux)
                if self.encoder_type == 'residual':
                    # Progressive residual: a strided conv of the previous aux joins x, and the sum becomes aux.
                    down = Conv2d(x.shape[-1], 3, down=True, resample_filter=self.resample_filter,
                                  fused_resample=True, init=_INIT, dtype=self.dtype, name=f'{res}x{res}_aux_residual')
                    x = skips[-1] = aux = (x + down(aux)) / math.sqrt(2)
            for idx in range(self.num_blocks):
                x = self.block(self.model_channels * mult, attention=res in self.attn_resolutions,
                               name=f'{res}x{res}_block{idx}')(x, emb, train)
                skips.append(x)
        return skips


class _Decoder(nn.Module):
    """The 'dec' half: (skips, emb) -> (B, H, W, out_channels); consumes the encoder's skips last-first."""

    img_resolution: int
    out_channels: int
    model_channels: int
    channel_mult: Sequence[int]
    num_blocks: int
    attn_resolutions: Sequence[int]
    decoder_type: str
    resample_filter: Sequence[int]
    block: Callable[..., UNetBlock]
    dtype: Any

    @nn.compact
    def __call__(self, skips: list[Array], emb: Array, train: bool) -> Array:
        skips = list(skips)
        x = skips[-1]
        aux = None
        last = len(self.channel_mult) - 1
        for level, mult in reversed(list(enumerate(self.channel_mult))):
            res = self.img_resolution >> level
            name = f'{res}x{res}'
            if level == last:
                x = self.block(x.shape[-1], attention=True, name=f'{name}_in0')(x, emb, train)
                x = self.block(x.shape[-1], name=f'{name}_in1')(x, emb, train)
            else:
                x = self.block(x.shape[-1], up=True, name=f'{name}_up')(x, emb, train)
            for idx in range(self.num_blocks + 1):
                x = jnp.concatenate([x, skips.pop().astype(x.dtype)], axis=-1)
                attn = idx == self.num_blocks and res in self.attn_resolutions
                x = self.block(self.model_channels * mult, attention=attn, name=f'{name}_block{idx}')(x, emb, train)
            if self.decoder_type == 'skip' or level == 0:
                # Output head; with the 'skip' decoder every level adds its head to the upsampled sum.
                if self.decoder_type == 'skip' and level < last:
                    aux = Conv2d(self.out_channels, 0, up=True, resample_filter=self.resample_filter,
                                 dtype=self.dtype, name=f'{name}_aux_up')(aux)
                tmp = GroupNorm(eps=1e-6, dtype=self.dtype, name=f'{name}_aux_norm')(x)
                tmp = Conv2d(self.out_channels, 3, init=_INIT_ZERO, dtype=self.dtype, name=f'{name}_aux_conv')(
                    nn.silu(tmp))
                aux = tmp if aux is None else tmp + aux
        return aux


class SongUNet(nn.Module):
    """DDPM++ / NCSN++ U-Net: (x (B, H, W, in_channels), noise_labels (B,), class_labels (B, label_dim) or None,
    augment_labels (B, augment_dim) or None, train) -> (B, H, W, out_channels) in ``dtype``.

    Keyword names and defaults are EDM's. DDPM++: embedding_type='positional', channel_mult_noise=1,
    encoder_type='standard', resample_filter=(1, 1). NCSN++: 'fourier', 2, 'residual', (1, 3, 3, 1).
    ``dtype`` is the compute dtype of the image path; params and the embedding MLP stay float32. With
    ``train=True``, dropout and label dropout draw from the 'dropout' rng stream.
    """

    img_resolution: int
    in_channels: int
    out_channels: int
    label_dim: int = 0
    augment_dim: int = 0
    model_channels: int = 128
    channel_mult: Sequence[int] = (1, 2, 2, 2)
    channel_mult_emb: int = 4
    num_blocks: int = 4
    attn_resolutions: Sequence[int] = (16,)
    dropout: float = 0.10
    label_dropout: float = 0.0
    embedding_type: str = 'positional'
    channel_mult_noise: int = 1
    encoder_type: str = 'standard'
    decoder_type: str = 'standard'
    resample_filter: Sequence[int] = (1, 1)
    dtype: Any = jnp.float32

    def _check(self, x: Array) -> None:
        """Raises one clear error for an unknown option or an input of the wrong shape."""
        options = dict(embedding_type=('fourier', 'positional'), encoder_type=('standard', 'skip', 'residual'),
                       decoder_type=('standard', 'skip'))
        for key, allowed in options.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f'SongUNet {key}={getattr(self, key)!r}: use one of {allowed}.')
        want = (self.img_resolution, self.img_resolution, self.in_channels)
        if x.ndim != 4 or x.shape[1:] != want:
            raise ValueError(f'SongUNet input x has shape {x.shape}, expected (B, {", ".join(map(str, want))}) '
                             '(NHWC).')

    def _embed(self, noise_labels: Array, class_labels: Optional[Array], augment_labels: Optional[Array],
               train: bool) -> Array:
        """Mapping network: labels -> float32 embedding (B, model_channels * channel_mult_emb)."""
        noise_channels = self.model_channels * self.channel_mult_noise
        emb_channels = self.model_channels * self.channel_mult_emb
        if self.embedding_type == 'positional':
            emb = PositionalEmbedding(noise_channels, endpoint=True, name='map_noise')(noise_labels)
        else:
            emb = FourierEmbedding(noise_channels, name='map_noise')(noise_labels)
        half = noise_channels // 2
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=1)  # [sin | cos], the order Song et al. use
        if self.label_dim:
            labels = check_labels(self.label_dim, class_labels, emb.shape[0])
            labels = drop_labels(self, labels, self.label_dropout, train)
            emb = emb + Linear(noise_channels, init=_INIT, name='map_label')(labels * math.sqrt(self.label_dim))
        if self.augment_dim and augment_labels is not None:
            emb = emb + Linear(noise_channels, use_bias=False, init=_INIT, name='map_augment')(
                augment_labels.astype(jnp.float32))
        emb = nn.silu(Linear(emb_channels, init=_INIT, name='map_layer0')(emb))
        return nn.silu(Linear(emb_channels, init=_INIT, name='map_layer1')(emb))

    @nn.compact
    def __call__(self, x: Array, noise_labels: Array, class_labels: Optional[Array] = None,
                 augment_labels: Optional[Array] = None, train: bool = False) -> Array:
        self._check(x)
        emb = self._embed(noise_labels, class_labels, augment_labels, train)
        block = functools.partial(
            UNetBlock, num_heads=1, dropout=self.dropout, skip_scale=math.sqrt(0.5), eps=1e-6,
            resample_filter=tuple(self.resample_filter), resample_proj=True, adaptive_scale=False,
            init=_INIT, init_zero=_INIT_ZERO, init_attn=_INIT_ATTN, dtype=self.dtype)
        levels = dict(img_resolution=self.img_resolution, model_channels=self.model_channels,
                      channel_mult=tuple(self.channel_mult), num_blocks=self.num_blocks,
                      attn_resolutions=tuple(self.attn_resolutions), resample_filter=tuple(self.resample_filter),
                      block=block, dtype=self.dtype)
        skips = _Encoder(encoder_type=self.encoder_type, name='enc', **levels)(x.astype(self.dtype), emb, train)
        return _Decoder(out_channels=self.out_channels, decoder_type=self.decoder_type, name='dec', **levels)(
            skips, emb, train)
