"""The watermark encoder and decoder of Zhao et al. 2023 ("A Recipe for Watermarking Diffusion Models", their
StegaStamp-style string-to-image codec), in Flax, scaled to the image resolution.

Encoder: bits (B, n) -> Dense(n -> S*S*C) + ReLU -> (B, S, S, C) bit map, S = min(16, H) -> nearest resize to
(H, W) -> concat with the image -> U-Net -> 1x1 conv -> sigmoid: the watermarked image in [0, 1].

  U-Net (channels ``widths`` = (32, 32, 64, 128, 256) as in the paper): a stride-1 3x3 conv to widths[0], then
  ``L`` stride-2 3x3 convs to widths[1..L]; back up, each level: nearest 2x upsample, pad right/bottom by one,
  2x2 conv to the skip's width, crop to the skip's side (only odd sides need it), concat the skip, 3x3 conv; at
  full resolution the skip is [first conv, encoder input], followed by one more 3x3 conv (widths[0]) and the
  1x1 conv to C channels. Every conv but the last is followed by ReLU.

  Rule for ``L`` (:func:`unet_levels`): halve the side (ceil) while it is above 1, at most ``len(widths) - 1``
  (= 4) times. 32x32 (CIFAR-10) gets the paper's 4 levels (32 -> 2); 28x28 (Fashion-MNIST) 4 (28, 14, 7, 4, 2;
  the 7 -> 4 level is cropped on the way up); 16x16 4 (-> 1); 8x8 (digits) 3 (8 -> 1).

Decoder: 7 conv3x3 + ReLU with widths (32, 32, 64, 64, 64, 128, 128) and strides (2, 1, 2, 1, 2, 2, 2), padding
1 -> flatten -> Dense 512 -> ReLU -> Dense n (bit logits).

  Rule: a stride-2 conv with padding 1 maps side s to ceil(s / 2), so the side never drops below 1; once it is
  1 the remaining stride-2 convs act on the single pixel (keep 1x1). The flattened size is ceil(H/32)^2 * 128:
  512 at 64x64 (the paper's FFHQ/AFHQ), 128 at 32x32 and below.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

ENCODER_WIDTHS = (32, 32, 64, 128, 256)
DECODER_WIDTHS = (32, 32, 64, 64, 64, 128, 128)
DECODER_STRIDES = (2, 1, 2, 1, 2, 2, 2)
BITMAP_SIDE = 16


def bitmap_side(resolution: int) -> int:
    """Side S of the encoder's learned bit map: min(16, resolution)."""
    return min(BITMAP_SIDE, resolution)


def unet_levels(resolution: int, max_levels: int = len(ENCODER_WIDTHS) - 1) -> int:
    """Number of stride-2 downsamplings of the encoder U-Net: ceil-halve while the side is > 1, at most
    ``max_levels``. 8 -> 3, 16 -> 4, 28 -> 4, 32 -> 4 (with the default 5 widths)."""
    levels, side = 0, resolution
    while side > 1 and levels < max_levels:
        side = -(-side // 2)
        levels += 1
    return levels


def _conv(width: int, kernel: int = 3, stride: int = 1, name: str | None = None) -> nn.Conv:
    pad = (kernel - 1) // 2 if kernel % 2 else 0
    return nn.Conv(width, (kernel, kernel), strides=(stride, stride), padding=((pad, pad), (pad, pad)), name=name)


class WatermarkEncoder(nn.Module):
    """(bits (B, n) in {0, 1}, image (B, H, W, C) in [0, 1]) -> watermarked image (B, H, W, C) in [0, 1].

    ``widths``: U-Net channels (first conv, then one per downsampling level); only the first
    ``unet_levels(H) + 1`` are used at small resolutions. See the module docstring for the architecture.
    """

    widths: Sequence[int] = ENCODER_WIDTHS

    @nn.compact
    def __call__(self, bits: jax.Array, image: jax.Array) -> jax.Array:
        batch, height, width, channels = image.shape
        if height != width:
            raise ValueError(f'WatermarkEncoder needs square images, got {height}x{width}')
        if bits.ndim != 2 or bits.shape[0] != batch:
            raise ValueError(f'bits must be (B, n) with B={batch}, got {bits.shape}')
        side = bitmap_side(height)
        bitmap = nn.relu(nn.Dense(side * side * channels, name='bits_dense')(bits.astype(image.dtype)))
        bitmap = bitmap.reshape(batch, side, side, channels)
        if side != height:
            bitmap = jax.image.resize(bitmap, (batch, height, width, channels), 'nearest')
        inputs = jnp.concatenate([bitmap, image], axis=-1)

        levels = unet_levels(height, len(self.widths) - 1)
        x = nn.relu(_conv(self.widths[0], name='in_conv')(inputs))
        skips = [x]
        for i in range(1, levels + 1):
            x = nn.relu(_conv(self.widths[i], stride=2, name=f'down{i}')(x))
            skips.append(x)
        for i in range(levels, 0, -1):
            skip = skips[i - 1]
            b, h, w, c = x.shape
            x = jax.image.resize(x, (b, 2 * h, 2 * w, c), 'nearest')
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
            x = nn.relu(_conv(skip.shape[-1], kernel=2, name=f'up{i}')(x))
            x = x[:, :skip.shape[1], :skip.shape[2]]
            merged = [skip, x] + ([inputs] if i == 1 else [])
            x = nn.relu(_conv(skip.shape[-1], name=f'merge{i}')(jnp.concatenate(merged, axis=-1)))
        x = nn.relu(_conv(self.widths[0], name='out_conv')(x))
        return nn.sigmoid(nn.Conv(channels, (1, 1), name='to_image')(x))


class WatermarkDecoder(nn.Module):
    """image (B, H, W, C) in [0, 1] -> bit logits (B, num_bits) (logit > 0 reads as bit 1).

    ``widths`` / ``strides``: the conv stack (see the module docstring); ``hidden``: width of the dense layer.
    """

    num_bits: int
    widths: Sequence[int] = DECODER_WIDTHS
    strides: Sequence[int] = DECODER_STRIDES
    hidden: int = 512

    @nn.compact
    def __call__(self, image: jax.Array) -> jax.Array:
        if len(self.widths) != len(self.strides):
            raise ValueError(f'decoder widths {tuple(self.widths)} and strides {tuple(self.strides)} differ in length')
        x = image
        for i, (width, stride) in enumerate(zip(self.widths, self.strides)):
            x = nn.relu(_conv(width, stride=stride, name=f'conv{i}')(x))
        x = nn.relu(nn.Dense(self.hidden, name='dense')(x.reshape(x.shape[0], -1)))
        return nn.Dense(self.num_bits, name='logits')(x)


class WatermarkCodec(nn.Module):
    """Encoder + decoder under one set of params {'encoder': ..., 'decoder': ...}.

    ``__call__(bits (B, n), image (B, H, W, C))`` -> (watermarked (B, H, W, C), logits (B, n)); ``encode`` and
    ``decode`` run one half (``codec.apply(params, bits, x, method='encode')``).
    """

    num_bits: int
    encoder_widths: Sequence[int] = ENCODER_WIDTHS
    decoder_widths: Sequence[int] = DECODER_WIDTHS
    decoder_strides: Sequence[int] = DECODER_STRIDES
    decoder_hidden: int = 512

    def setup(self):
        self.encoder = WatermarkEncoder(self.encoder_widths)
        self.decoder = WatermarkDecoder(self.num_bits, self.decoder_widths, self.decoder_strides, self.decoder_hidden)

    def __call__(self, bits: jax.Array, image: jax.Array) -> tuple[jax.Array, jax.Array]:
        watermarked = self.encoder(bits, image)
        return watermarked, self.decoder(watermarked)

    def encode(self, bits: jax.Array, image: jax.Array) -> jax.Array:
        """(B, n), (B, H, W, C) -> watermarked (B, H, W, C) in [0, 1]."""
        return self.encoder(bits, image)

    def decode(self, image: jax.Array) -> jax.Array:
        """(B, H, W, C) in [0, 1] -> bit logits (B, n)."""
        return self.decoder(image)


def codec_from_config(config) -> WatermarkCodec:
    """The codec of a watermark config (``num_bits`` and ``model.*`` widths)."""
    m = config.model
    return WatermarkCodec(num_bits=int(config.num_bits), encoder_widths=tuple(m.encoder_widths),
                          decoder_widths=tuple(m.decoder_widths), decoder_strides=tuple(m.decoder_strides),
                          decoder_hidden=int(m.decoder_hidden))
