"""EDM's non-leaky augmentation as one jitted pure function (the transforms of EDM's AugmentPipe that its CIFAR-10
recipe enables: x-flip, y-flip, isotropic scale, fractional rotation, anisotropic scale, fractional translation).

Each transform fires per sample with probability ``p * multiplier``; its parameters go into the 9 augment labels
that the network is conditioned on (EDM's ``augment_dim=9``), in EDM's order and encoding (:data:`AUGMENT_LABELS`):
x-flip bit, y-flip bit, scale w (s = 2**(0.2 w)), cos(theta) - 1, sin(theta), aniso w*cos(r), w*sin(r), translation
(tx, ty) in units of 0.125 * image side. Labels of transforms that did not fire are 0.

Geometric transforms are composed into one inverse 3x3 matrix per sample (centred pixel coordinates) and applied
by :func:`resample` as in EDM: reflect-pad, 2x upsample with the sym6 wavelet filter, bilinear sampling with zero
padding, sym6 2x downsample and crop. Differences from EDM's PyTorch AugmentPipe (all because of jit's static shapes
or to make a sample independent of its batch):
- the reflect padding is always the largest EDM allows ((H-1, W-1) per side) instead of EDM's per-batch margin
  computed from the transformed corners; pixels EDM reads inside its margin are identical, and where EDM's filter
  footprint reaches past its margin it sees zeros where this sees reflected image;
- samples whose four geometric transforms all did not fire are passed through unchanged (EDM resamples them too,
  which is the identity up to float rounding because sym6 is orthonormal);
- the pixel-blitting rotate_int/translate_int and the colour transforms are not implemented (EDM's configs do not
  enable them; they would change the label layout).
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# Low-pass decomposition filter of the Symlet-6 wavelet (standard coefficients), used for 2x up/downsampling.
SYM6 = np.asarray([
    0.015404109327027373, 0.0034907120842174702, -0.11799011114819057, -0.048311742585633, 0.4910559419267466,
    0.787641141030194, 0.3379294217276218, -0.07263752278646252, -0.021060292512300564, 0.04472490177066578,
    0.0017677118642428036, -0.007800708325034148], np.float32)
FILTER_PAD = len(SYM6) // 4  # output border (in original pixels) that the filters need beyond the image

EDM_PROBABILITIES = dict(xflip=1e8, yflip=1.0, scale=1.0, rotate_frac=1.0, aniso=1.0, translate_frac=1.0)
STRENGTHS = dict(scale_std=0.2, rotate_frac_max=1.0, aniso_std=0.2, aniso_rotate_prob=0.5, translate_frac_std=0.125)
AUGMENT_LABELS = ('xflip', 'yflip', 'scale', 'rotate_cos_minus_1', 'rotate_sin', 'aniso_cos', 'aniso_sin',
                  'translate_x', 'translate_y')
AUGMENT_DIM = len(AUGMENT_LABELS)
GEOMETRIC = ('scale', 'rotate_frac', 'aniso', 'translate_frac')


def _matrix(*rows: Any) -> jax.Array:
    """3x3 rows of scalars or (B,) arrays -> float32 (..., 3, 3), broadcasting the entries."""
    shape = jnp.broadcast_shapes(*(jnp.shape(v) for row in rows for v in row))
    return jnp.stack([jnp.stack([jnp.broadcast_to(jnp.asarray(v, jnp.float32), shape) for v in row], -1)
                      for row in rows], -2)


def translate2d(tx: Any, ty: Any) -> jax.Array:
    """Translation by (tx, ty) pixels, (..., 3, 3)."""
    return _matrix([1, 0, tx], [0, 1, ty], [0, 0, 1])


def scale2d(sx: Any, sy: Any) -> jax.Array:
    """Scaling by (sx, sy), (..., 3, 3)."""
    return _matrix([sx, 0, 0], [0, sy, 0], [0, 0, 1])


def rotate2d(theta: Any) -> jax.Array:
    """Rotation by ``theta`` radians (x right, y down), (..., 3, 3)."""
    cos, sin = jnp.cos(theta), jnp.sin(theta)
    return _matrix([cos, -sin, 0], [sin, cos, 0], [0, 0, 1])


def _conv_axis(x: jax.Array, taps: np.ndarray, axis: int, padding: int, stride: int = 1,
               dilation: int = 1) -> jax.Array:
    """Depthwise 1-D cross-correlation of (B, H, W, C) along ``axis`` (1 or 2), zero padding, input dilation."""
    along_h = axis == 1
    kernel_shape = (len(taps), 1) if along_h else (1, len(taps))
    kernel = jnp.broadcast_to(jnp.asarray(taps).reshape(kernel_shape + (1, 1)), kernel_shape + (1, x.shape[-1]))
    per_axis = lambda value, other: (value, other) if along_h else (other, value)
    return jax.lax.conv_general_dilated(
        x, kernel, window_strides=per_axis(stride, 1), padding=per_axis((padding, padding), (0, 0)),
        lhs_dilation=per_axis(dilation, 1), dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
        feature_group_count=x.shape[-1], precision=jax.lax.Precision.HIGHEST)


def _bilinear(x: jax.Array, ix: jax.Array, iy: jax.Array) -> jax.Array:
    """Samples x (B, Hi, Wi, C) at pixel positions ix, iy (B, Ho, Wo); zeros outside -> (B, Ho, Wo, C)."""
    batch, height, width, channels = x.shape
    flat = x.reshape(batch, height * width, channels)
    x0, y0 = jnp.floor(ix), jnp.floor(iy)
    out = jnp.zeros(ix.shape + (channels,), x.dtype)
    for dx in (0, 1):
        for dy in (0, 1):
            xi, yi = x0 + dx, y0 + dy
            weight = (ix - x0 if dx else 1 - (ix - x0)) * (iy - y0 if dy else 1 - (iy - y0))
            weight = jnp.where((xi >= 0) & (xi < width) & (yi >= 0) & (yi < height), weight, 0)
            index = (jnp.clip(yi, 0, height - 1) * width + jnp.clip(xi, 0, width - 1)).astype(jnp.int32)
            values = jnp.take_along_axis(flat, index.reshape(batch, -1, 1), axis=1)
            out = out + values.reshape(out.shape) * weight[..., None]
    return out


@jax.jit
def resample(images: jax.Array, G_inv: jax.Array) -> jax.Array:
    """Geometric transform of images (B, H, W, C) by per-sample inverse matrices G_inv (B, 3, 3).

    G_inv maps output to input pixel coordinates, both centred on the image (x right, y down), so
    ``translate2d(-tx, -ty)`` moves content by (+tx, +ty). EDM's filtered resampling (see the module docstring).
    """
    batch, height, width, _ = images.shape
    x = jnp.pad(images.astype(jnp.float32), ((0, 0), (height - 1, height - 1), (width - 1, width - 1), (0, 0)),
                mode='reflect')
    x = _conv_axis(x, SYM6[::-1], axis=2, padding=len(SYM6) // 2, dilation=2)
    x = _conv_axis(x, SYM6[::-1], axis=1, padding=len(SYM6) // 2, dilation=2)
    G = translate2d(-0.5, -0.5) @ scale2d(2, 2) @ G_inv @ scale2d(0.5, 0.5) @ translate2d(0.5, 0.5)
    out_h, out_w = 2 * (height + 2 * FILTER_PAD), 2 * (width + 2 * FILTER_PAD)
    v, u = jnp.meshgrid(jnp.arange(out_h) - (out_h - 1) / 2, jnp.arange(out_w) - (out_w - 1) / 2, indexing='ij')
    points = jnp.stack([u, v, jnp.ones_like(u)], -1).reshape(-1, 3).astype(jnp.float32)
    source = jnp.einsum('bij,nj->bni', G, points, precision=jax.lax.Precision.HIGHEST)
    ix = source[..., 0].reshape(batch, out_h, out_w) + (x.shape[2] - 1) / 2
    iy = source[..., 1].reshape(batch, out_h, out_w) + (x.shape[1] - 1) / 2
    x = _bilinear(x, ix, iy)
    pad = len(SYM6) // 2 - 1
    x = _conv_axis(x, SYM6, axis=2, padding=pad, stride=2)[:, :, FILTER_PAD:-FILTER_PAD]
    x = _conv_axis(x, SYM6, axis=1, padding=pad, stride=2)[:, FILTER_PAD:-FILTER_PAD]
    return x.astype(images.dtype)


def _flip(images: jax.Array, coin: jax.Array, gate: jax.Array, probability: jax.Array,
          axis: int) -> tuple[jax.Array, jax.Array]:
    """EDM's flip: a fair coin (uniform ``coin`` < 1/2), kept where uniform ``gate`` < probability -> (images, bit)."""
    bit = (coin < 0.5) & (gate < probability)
    return jnp.where(bit[:, None, None, None], jnp.flip(images, axis), images), bit.astype(jnp.float32)


def _geometric(u: jax.Array, n: jax.Array, height: int, width: int, p: jax.Array,
               s: dict[str, float]) -> tuple[jax.Array, jax.Array, jax.Array]:
    """EDM's geometric parameters from uniforms u (7, B) and normals n (4, B) -> (G_inv (B, 3, 3), labels (B, 7),
    any-transform-fired (B,))."""
    on_scale, on_rotate, on_aniso, on_translate = (u[i] < s[name] * p for i, name in enumerate(GEOMETRIC))
    w_scale = jnp.where(on_scale, n[0], 0)
    scale = jnp.exp2(w_scale * s['scale_std'])
    theta = jnp.where(on_rotate, (u[4] * 2 - 1) * (np.pi * s['rotate_frac_max']), 0)
    w_aniso = jnp.where(on_aniso, n[1], 0)
    r = jnp.where(u[6] < s['aniso_rotate_prob'], (u[5] * 2 - 1) * np.pi, 0)
    aniso = jnp.exp2(w_aniso * s['aniso_std'])
    w_translate = jnp.where(on_translate, n[2:4], 0)
    shift = w_translate * (jnp.asarray([width, height], jnp.float32)[:, None] * s['translate_frac_std'])
    G_inv = (scale2d(1 / scale, 1 / scale) @ rotate2d(theta)
             @ rotate2d(-r) @ scale2d(1 / aniso, aniso) @ rotate2d(r)
             @ translate2d(-shift[0], -shift[1]))
    labels = jnp.stack([w_scale, jnp.cos(theta) - 1, jnp.sin(theta), w_aniso * jnp.cos(r), w_aniso * jnp.sin(r),
                        w_translate[0], w_translate[1]], -1)
    return G_inv, labels, on_scale | on_rotate | on_aniso | on_translate


@functools.partial(jax.jit, static_argnums=3)
def _augment(key: jax.Array, images: jax.Array, p: jax.Array, settings: tuple[tuple[str, float], ...]):
    """Jitted body of :func:`augment_pipe`; ``settings`` are the (static) multipliers and strengths."""
    s = dict(settings)
    batch, height, width, _ = images.shape
    uniform_key, normal_key = jax.random.split(key)
    u = jax.random.uniform(uniform_key, (11, batch))  # few large draws: much faster to compile than many small
    n = jax.random.normal(normal_key, (4, batch))
    images, x_bit = _flip(images, u[0], u[1], s['xflip'] * p, axis=2)
    images, y_bit = _flip(images, u[2], u[3], s['yflip'] * p, axis=1)
    G_inv, geo_labels, fired = _geometric(u[4:], n, height, width, p, s)
    if any(s[name] > 0 for name in GEOMETRIC):
        images = jnp.where(fired[:, None, None, None], resample(images, G_inv), images)
    return images, jnp.concatenate([x_bit[:, None], y_bit[:, None], geo_labels], -1).astype(jnp.float32)


def augment_pipe(key: jax.Array, images: jax.Array, p: float | jax.Array,
                 **probabilities: float) -> tuple[jax.Array, jax.Array]:
    """EDM's non-leaky augmentation: images float (B, H, W, C) -> (images (B, H, W, C), labels float32 (B, 9)).

    ``p`` is the overall probability (EDM's ``--augment``, 0.12 for CIFAR-10; may be traced). ``probabilities``
    override the per-transform multipliers (defaults :data:`EDM_PROBABILITIES`, EDM's CIFAR setting) and strengths
    (:data:`STRENGTHS`); they are static, so each distinct setting compiles once. Pure: same key, same result.
    """
    unknown = sorted(set(probabilities) - set(EDM_PROBABILITIES) - set(STRENGTHS))
    if unknown:
        raise ValueError(f'unknown augment settings {unknown}; known: {sorted({**EDM_PROBABILITIES, **STRENGTHS})}')
    if jnp.ndim(images) != 4:
        raise ValueError(f'augment_pipe expects images (B, H, W, C), got shape {jnp.shape(images)}')
    settings = tuple(sorted({**EDM_PROBABILITIES, **STRENGTHS, **probabilities}.items()))
    return _augment(key, images, p, tuple((name, float(value)) for name, value in settings))
