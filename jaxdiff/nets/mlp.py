"""A small MLP denoiser network for low-dimensional data (the 2-D Gaussian-mixture playground).

Same call signature as the U-Nets, so preconditioning, losses, the training step and the samplers treat it
like any image network: low-dimensional points are carried as 1x1 "images" of shape (B, 1, 1, D).
"""
from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdiff.nets.layers import PositionalEmbedding
from jaxdiff.nets.song_unet import check_labels, drop_labels

Array = jax.Array


class MLP(nn.Module):
    """Residual MLP: (x (B, H, W, in_channels), noise_labels (B,), class_labels (B, label_dim) or None,
    augment_labels (ignored), train) -> (B, H, W, out_channels).

    x is flattened to (B, H*W*in_channels); the noise embedding (sinusoidal, ``model_channels`` wide) and the
    optional label embedding are added to the first hidden layer; ``num_blocks`` residual SiLU blocks of width
    ``model_channels``; a zero-initialised linear output. With ``train=True``, dropout and label dropout draw
    from the 'dropout' rng stream.
    """

    img_resolution: int
    in_channels: int
    out_channels: int
    label_dim: int = 0
    augment_dim: int = 0
    model_channels: int = 128
    num_blocks: int = 3
    dropout: float = 0.0
    label_dropout: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, noise_labels: Array, class_labels: Optional[Array] = None,
                 augment_labels: Optional[Array] = None, train: bool = False) -> Array:
        shape = x.shape
        want = (self.img_resolution, self.img_resolution, self.in_channels)
        if x.ndim != 4 or shape[1:] != want:
            raise ValueError(f'MLP input x has shape {shape}, expected (B, {", ".join(map(str, want))}).')
        width = self.model_channels
        h = nn.Dense(width, dtype=self.dtype, name='in_proj')(x.reshape(shape[0], -1).astype(self.dtype))
        emb = PositionalEmbedding(width, endpoint=True, name='map_noise')(noise_labels)
        emb = nn.Dense(width, name='map_layer0')(emb)
        if self.label_dim:
            labels = drop_labels(self, check_labels(self.label_dim, class_labels, shape[0]), self.label_dropout,
                                 train)
            emb = emb + nn.Dense(width, name='map_label')(labels)
        h = h + nn.silu(emb).astype(self.dtype)
        for i in range(self.num_blocks):
            r = nn.Dense(width, dtype=self.dtype, name=f'block{i}_fc0')(nn.silu(h))
            r = nn.Dropout(self.dropout)(r, deterministic=not train)
            r = nn.Dense(width, dtype=self.dtype, name=f'block{i}_fc1')(nn.silu(r))
            h = h + r
        out = nn.Dense(self.out_channels * shape[1] * shape[2], dtype=self.dtype, kernel_init=nn.initializers.zeros,
                       name='out_proj')(nn.silu(h))
        return out.reshape(shape[:3] + (self.out_channels,))
