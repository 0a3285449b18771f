"""A noise-conditional classifier p(y | x_sigma, sigma) for classifier guidance: the encoder half of a DDPM++ U-Net.

Dhariwal & Nichol (2021) guide with the downsampling half of their U-Net plus a pooling head, trained on noisy
inputs at every noise level. Here: SongUNet's DDPM++ residual blocks (noise embedding added inside every block),
2x downsampling between levels, GroupNorm + SiLU, global average pooling and a linear head. No class labels go in
(they are what it predicts), and no augmentation labels.

The network sees EDM-preconditioned inputs (:func:`noisy_logits`): c_in(sigma) x with c_in = 1 / sqrt(sigma^2 +
sigma_data^2), so its input has unit variance at every sigma, and c_noise = ln(sigma) / 4 as the noise label,
exactly as EDM's denoiser feeds its network.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from jaxdiff.nets.layers import Conv2d, GroupNorm, Init, Linear, PositionalEmbedding, UNetBlock

Array = jax.Array

_INIT = Init('xavier_uniform')
_INIT_ZERO = Init('xavier_uniform', weight=1e-5)
_INIT_ATTN = Init('xavier_uniform', weight=math.sqrt(0.2))


class NoisyClassifier(nn.Module):
    """(x (B, H, W, in_channels), noise_labels (B,), train) -> logits (B, num_classes) float32.

    Levels as SongUNet's encoder: level l works at img_resolution >> l with model_channels * channel_mult[l]
    channels and num_blocks residual blocks (self-attention at attn_resolutions). ``dtype`` is the compute dtype
    of the image path; params, the noise embedding and the head stay float32. ``train=True`` enables dropout
    (rng 'dropout').
    """

    img_resolution: int
    in_channels: int
    num_classes: int
    model_channels: int = 64
    channel_mult: Sequence[int] = (1, 2, 2)
    channel_mult_emb: int = 4
    num_blocks: int = 2
    attn_resolutions: Sequence[int] = ()
    dropout: float = 0.0
    dtype: Any = jnp.float32

    def _check(self, x: Array) -> None:
        """Raises one clear error for an input of the wrong shape."""
        want = (self.img_resolution, self.img_resolution, self.in_channels)
        if x.ndim != 4 or x.shape[1:] != want:
            raise ValueError(f'NoisyClassifier input x has shape {x.shape}, expected (B, '
                             f'{", ".join(map(str, want))}) (NHWC).')

    @nn.compact
    def __call__(self, x: Array, noise_labels: Array, train: bool = False) -> Array:
        self._check(x)
        emb_channels = self.model_channels * self.channel_mult_emb
        emb = PositionalEmbedding(self.model_channels, endpoint=True, name='map_noise')(noise_labels)
        emb = nn.silu(Linear(emb_channels, init=_INIT, name='map_layer0')(emb))
        emb = nn.silu(Linear(emb_channels, init=_INIT, name='map_layer1')(emb))
        block = functools.partial(
            UNetBlock, num_heads=1, dropout=self.dropout, skip_scale=math.sqrt(0.5), eps=1e-6, resample_proj=True,
            adaptive_scale=False, init=_INIT, init_zero=_INIT_ZERO, init_attn=_INIT_ATTN, dtype=self.dtype)
        h = x.astype(self.dtype)
        for level, mult in enumerate(self.channel_mult):
            res = self.img_resolution >> level
            if level == 0:
                h = Conv2d(self.model_channels, 3, init=_INIT, dtype=self.dtype, name=f'{res}x{res}_conv')(h)
            else:
                h = block(h.shape[-1], down=True, name=f'{res}x{res}_down')(h, emb, train)
            for idx in range(self.num_blocks):
                h = block(self.model_channels * mult, attention=res in self.attn_resolutions,
                          name=f'{res}x{res}_block{idx}')(h, emb, train)
        h = nn.silu(GroupNorm(eps=1e-6, dtype=self.dtype, name='out_norm')(h))
        pooled = jnp.mean(h.astype(jnp.float32), axis=(1, 2))
        return Linear(self.num_classes, init=_INIT, name='out_head')(pooled)


def noisy_logits(net: NoisyClassifier, variables: dict, x: Array, sigma: Array, *, sigma_data: float = 0.5,
                 train: bool = False, rngs: Optional[dict] = None) -> Array:
    """Logits (B, num_classes) of the noisy images x (B, H, W, C) at noise level sigma (() or (B,)).

    EDM preconditioning of the input (module docstring): the net sees c_in * x and c_noise = ln(sigma) / 4.
    ``rngs`` {'dropout': key} when ``train``.
    """
    sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32).reshape(-1), (x.shape[0],))
    c_in = 1 / jnp.sqrt(sigma ** 2 + sigma_data ** 2)
    return net.apply(variables, x * c_in[:, None, None, None], jnp.log(sigma) / 4, train=train, rngs=rngs)
