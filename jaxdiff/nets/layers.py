"""Building blocks shared by SongUNet and DhariwalUNet (EDM's layers, in Flax linen, NHWC).

Conventions (they let a torch checkpoint of EDM's networks load 1:1, see ``jaxdiff/nets/__init__.py``):

- Parameter leaves are named ``weight`` and ``bias`` like torch's; a linear weight is stored (in, out), i.e. the
  torch (out, in) matrix transposed; a conv weight is HWIO, i.e. torch OIHW transposed (2, 3, 1, 0).
- Parameters are float32; every layer computes in its ``dtype`` (compute dtype) by casting weights at use.
- Resampling filters are constants rebuilt from their taps in code; they are never stored.
- Initialisation reproduces EDM's scheme: a mode (kaiming/xavier, uniform/normal) whose fans are those of the torch
  tensor, times ``Init.weight`` for weights and ``Init.bias`` for biases.
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax import lax

Array = jax.Array
Dtype = Any
_DIMS = ('NHWC', 'HWIO', 'NHWC')


class Init(NamedTuple):
    """Initialisation of one layer: ``mode`` (EDM's init_mode), weight gain and bias gain."""

    mode: str = 'kaiming_normal'
    weight: float = 1.0
    bias: float = 0.0


def weight_init(key: Array, shape: Sequence[int], mode: str, fan_in: int, fan_out: int) -> Array:
    """Draws a float32 tensor of ``shape`` with EDM's unit-gain scheme ``mode`` for the given fans."""
    if mode == 'xavier_uniform':
        return math.sqrt(6 / (fan_in + fan_out)) * jax.random.uniform(key, shape, minval=-1.0, maxval=1.0)
    if mode == 'xavier_normal':
        return math.sqrt(2 / (fan_in + fan_out)) * jax.random.normal(key, shape)
    if mode == 'kaiming_uniform':
        return math.sqrt(3 / fan_in) * jax.random.uniform(key, shape, minval=-1.0, maxval=1.0)
    if mode == 'kaiming_normal':
        return math.sqrt(1 / fan_in) * jax.random.normal(key, shape)
    if mode == 'normal':  # fan-free N(0, 1), scaled by the gain (DiT's std-0.02 embeddings)
        return jax.random.normal(key, shape)
    raise ValueError(f'Invalid init mode "{mode}": use xavier_uniform, xavier_normal, kaiming_uniform, '
                     'kaiming_normal or normal.')


def initializer(mode: str, gain: float, fan_in: int, fan_out: int):
    """Flax initializer ``(key, shape) -> array``; a zero gain gives exact zeros without drawing."""
    def init(key, shape, dtype=jnp.float32):
        if gain == 0:
            return jnp.zeros(shape, dtype)
        return (weight_init(key, shape, mode, fan_in, fan_out) * gain).astype(dtype)
    return init


class Linear(nn.Module):
    """Fully connected layer: (..., in) -> (..., out_features); weight (in, out), bias (out,)."""

    out_features: int
    use_bias: bool = True
    init: Init = Init()
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        fan_in, fan_out = x.shape[-1], self.out_features
        w = self.param('weight', initializer(self.init.mode, self.init.weight, fan_in, fan_out), (fan_in, fan_out))
        x = x.astype(self.dtype) @ w.astype(self.dtype)
        if self.use_bias:
            b = self.param('bias', initializer(self.init.mode, self.init.bias, fan_in, fan_out), (fan_out,))
            x = x + b.astype(self.dtype)
        return x


def _take(x: Array, axis: int, start: int, count: int, stride: int) -> Array:
    """x[start + stride * j] for j < count along ``axis``, zero where the index falls outside x."""
    n = x.shape[axis]
    lo, hi = max(0, -start), max(0, start + stride * (count - 1) + 1 - n)
    if lo or hi:
        x = lax.pad(x, jnp.zeros((), x.dtype), [(lo, hi, 0) if a == axis else (0, 0, 0) for a in range(x.ndim)])
    return lax.slice_in_dim(x, start + lo, start + lo + stride * (count - 1) + 1, stride, axis)


def _downsample_axis(x: Array, axis: int, taps: np.ndarray, padding: int) -> Array:
    """Stride-2 correlation with ``taps`` along one axis, zero padding ``padding`` on both sides."""
    count = (x.shape[axis] + 2 * padding - len(taps)) // 2 + 1
    return sum(float(tap) * _take(x, axis, t - padding, count, 2) for t, tap in enumerate(taps))


def _upsample_axis(x: Array, axis: int, taps: np.ndarray, padding: int) -> Array:
    """Stride-2 transposed correlation with ``taps`` along one axis (torch conv_transpose semantics), polyphase:
    output 2m + r gathers the taps t = r + padding (mod 2), reading input m + (r + padding - t) / 2."""
    k = len(taps)
    count = 2 * x.shape[axis] + k - 2 - 2 * padding
    phases = []
    for r in (0, 1):
        n_r = (count - r + 1) // 2
        terms = [float(taps[t]) * _take(x, axis, (r + padding - t) // 2, n_r, 1)
                 for t in range(k) if (r + padding - t) % 2 == 0]
        # A phase no tap reaches (a 1-tap filter) holds only the inserted zeros.
        phases.append(sum(terms[1:], terms[0]) if terms else jnp.zeros_like(_take(x, axis, 0, n_r, 1)))
    if phases[1].shape[axis] < phases[0].shape[axis]:  # odd output length: phase 1 is one short
        phases[1] = _take(phases[1], axis, 0, phases[0].shape[axis], 1)
    y = jnp.stack(phases, axis=axis + 1)
    return lax.slice_in_dim(y.reshape(*x.shape[:axis], -1, *x.shape[axis + 1:]), 0, count, axis=axis)


def _normalised(taps: Sequence[float]) -> np.ndarray:
    """1-D filter with unit sum (EDM normalises the 2-D outer product by sum^2, i.e. each axis by sum)."""
    f = np.asarray(taps, np.float64)
    return f / f.sum()


# Resampling uses that EDM's 2-D filter outer(f, f) / sum(f)^2 is separable: two 1-D passes of shifted, strided
# slices, which XLA fuses into one elementwise kernel. On an H100 this ran 10-30x faster than the equivalent
# depthwise (feature_group_count=C) convolution, forward and backward. Sums are float32 whatever the input dtype.
def upsample2x(x: Array, taps: Sequence[float], padding: int) -> Array:
    """(B, H, W, C) -> (B, 2H+k-2-2p, 2W+k-2-2p, C): torch ``conv_transpose2d(x, 4*filter, stride=2, groups=C,
    padding=p)`` with EDM's normalised filter; the gain 4 restores the mean lost to the inserted zeros."""
    f = 2 * _normalised(taps)
    y = _upsample_axis(_upsample_axis(x.astype(jnp.float32), 1, f, padding), 2, f, padding)
    return y.astype(x.dtype)


def downsample2x(x: Array, taps: Sequence[float], padding: int) -> Array:
    """(B, H, W, C) -> (B, (H+2p-k)//2+1, (W+2p-k)//2+1, C): torch ``conv2d(x, filter, stride=2, groups=C,
    padding=p)`` with EDM's normalised filter."""
    f = _normalised(taps)
    y = _downsample_axis(_downsample_axis(x.astype(jnp.float32), 1, f, padding), 2, f, padding)
    return y.astype(x.dtype)


def conv2d(x: Array, w: Array, padding: int) -> Array:
    """Plain stride-1 conv: x (B, H, W, I), w (k, k, I, O), symmetric zero padding -> (B, H', W', O)."""
    return lax.conv_general_dilated(x, w, (1, 1), [(padding, padding), (padding, padding)], dimension_numbers=_DIMS)


class Conv2d(nn.Module):
    """Conv with optional 2x up/down resampling: (B, H, W, C) -> (B, H', W', out_channels).

    ``kernel=0`` means no weight at all (pure resampling, out_channels is then the input's). With
    ``fused_resample`` the filter runs after the conv when downsampling (before it when upsampling) and the paddings
    are merged, as in EDM; otherwise resampling always comes first.
    """

    out_channels: int
    kernel: int
    use_bias: bool = True
    up: bool = False
    down: bool = False
    resample_filter: Sequence[int] = (1, 1)
    fused_resample: bool = False
    init: Init = Init()
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        assert not (self.up and self.down), 'Conv2d: up and down are exclusive'
        x = x.astype(self.dtype)
        k, cin, cout = self.kernel, x.shape[-1], self.out_channels
        fans = (cin * k * k, cout * k * k)
        w = b = None
        if k:
            w = self.param('weight', initializer(self.init.mode, self.init.weight, *fans), (k, k, cin, cout))
            w = w.astype(self.dtype)
            if self.use_bias:
                b = self.param('bias', initializer(self.init.mode, self.init.bias, *fans), (cout,))
        taps = self.resample_filter
        w_pad, f_pad = k // 2, (len(taps) - 1) // 2

        if self.fused_resample and self.up and k:
            x = upsample2x(x, taps, max(f_pad - w_pad, 0))
            x = conv2d(x, w, max(w_pad - f_pad, 0))
        elif self.fused_resample and self.down and k:
            x = conv2d(x, w, w_pad + f_pad)
            x = downsample2x(x, taps, 0)
        else:
            if self.up:
                x = upsample2x(x, taps, f_pad)
            if self.down:
                x = downsample2x(x, taps, f_pad)
            if k:
                x = conv2d(x, w, w_pad)
        if b is not None:
            x = x + b.astype(self.dtype)
        return x


class GroupNorm(nn.Module):
    """Group normalisation over (H, W, C/G) with G = min(num_groups, C // min_channels_per_group).

    (B, H, W, C) -> (B, H, W, C) in ``dtype``; statistics are taken in float32 whatever the compute dtype.
    """

    num_groups: int = 32
    min_channels_per_group: int = 4
    eps: float = 1e-5
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = x.shape[-1]
        groups = min(self.num_groups, c // self.min_channels_per_group)
        scale = self.param('weight', nn.initializers.ones, (c,))
        shift = self.param('bias', nn.initializers.zeros, (c,))
        # Channel c belongs to group c // (C/G), as in torch: contiguous channels share a group.
        xg = x.astype(jnp.float32).reshape(*x.shape[:-1], groups, c // groups)
        axes = (*range(1, x.ndim - 1), x.ndim)
        mean = xg.mean(axis=axes, keepdims=True)
        var = jnp.square(xg - mean).mean(axis=axes, keepdims=True)
        y = ((xg - mean) * lax.rsqrt(var + self.eps)).reshape(x.shape)
        return (y * scale + shift).astype(self.dtype)


def self_attention(qkv: Array, num_heads: int) -> Array:
    """Multi-head self-attention over pixels: qkv (B, H, W, 3C) -> (B, H, W, C).

    The 3C channels are laid out (head, channel, q/k/v) as EDM's reshape expects. Logits are q.k / sqrt(C/heads),
    and logits and softmax are float32 whatever the compute dtype (EDM's AttentionOp does the same).
    """
    b, h, w, c3 = qkv.shape
    c = c3 // 3
    qkv = qkv.reshape(b, h * w, num_heads, c // num_heads, 3)
    q, k, v = qkv[..., 0], qkv[..., 1], qkv[..., 2]
    logits = jnp.einsum('bqnd,bknd->bnqk', q, k, preferred_element_type=jnp.float32) / math.sqrt(c // num_heads)
    weights = jax.nn.softmax(logits, axis=-1).astype(qkv.dtype)
    return jnp.einsum('bnqk,bknd->bqnd', weights, v).reshape(b, h, w, c)


class UNetBlock(nn.Module):
    """EDM's unified residual block (DDPM++, NCSN++ and ADM) with optional 2x resampling and self-attention.

    __call__(x (B, H, W, Cin), emb (B, E), train) -> (B, H', W', out_channels). The embedding path (``affine``)
    runs in the embedding's dtype (float32 in our nets) and is cast to the compute dtype afterwards, as EDM does
    under mixed precision.
    """

    out_channels: int
    up: bool = False
    down: bool = False
    attention: bool = False
    num_heads: Optional[int] = None
    channels_per_head: int = 64
    dropout: float = 0.0
    skip_scale: float = 1.0
    eps: float = 1e-5
    resample_filter: Sequence[int] = (1, 1)
    resample_proj: bool = False
    adaptive_scale: bool = True
    init: Init = Init()
    init_zero: Init = Init(weight=0.0)
    init_attn: Optional[Init] = None
    dtype: Dtype = jnp.float32

    def heads(self) -> int:
        """Number of attention heads; 0 (no attention layers at all) when out_channels < channels_per_head."""
        if not self.attention:
            return 0
        return self.num_heads if self.num_heads is not None else self.out_channels // self.channels_per_head

    @nn.compact
    def __call__(self, x: Array, emb: Array, train: bool = False) -> Array:
        cin, cout, dt = x.shape[-1], self.out_channels, self.dtype
        resample = dict(up=self.up, down=self.down, resample_filter=self.resample_filter, dtype=dt)
        orig = x.astype(dt)
        x = GroupNorm(eps=self.eps, dtype=dt, name='norm0')(orig)
        x = Conv2d(cout, 3, init=self.init, name='conv0', **resample)(nn.silu(x))

        params = Linear(cout * (2 if self.adaptive_scale else 1), init=self.init, dtype=emb.dtype, name='affine')(emb)
        params = params[:, None, None, :].astype(dt)
        norm1 = GroupNorm(eps=self.eps, dtype=dt, name='norm1')
        if self.adaptive_scale:
            scale, shift = jnp.split(params, 2, axis=-1)
            x = nn.silu(shift + norm1(x) * (scale + 1))
        else:
            x = nn.silu(norm1(x + params))

        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        x = Conv2d(cout, 3, init=self.init_zero, dtype=dt, name='conv1')(x)
        if cout != cin or self.up or self.down:
            # A 1x1 projection when channels change or when asked; pure resampling otherwise.
            kernel = 1 if self.resample_proj or cout != cin else 0
            orig = Conv2d(cout, kernel, init=self.init, name='skip', **resample)(orig)
        x = (x + orig) * self.skip_scale

        heads = self.heads()
        if heads:
            init_attn = self.init_attn if self.init_attn is not None else self.init
            qkv = Conv2d(cout * 3, 1, init=init_attn, dtype=dt, name='qkv')(GroupNorm(eps=self.eps, dtype=dt,
                                                                                       name='norm2')(x))
            a = Conv2d(cout, 1, init=self.init_zero, dtype=dt, name='proj')(self_attention(qkv, heads))
            x = (a + x) * self.skip_scale
        return x


class PositionalEmbedding(nn.Module):
    """Sinusoidal embedding (DDPM++, ADM): (B,) -> (B, num_channels) float32, laid out [cos | sin].

    Frequencies are (1/max_positions)^(i / (num_channels/2 - endpoint)), i = 0 .. num_channels/2 - 1.
    """

    num_channels: int
    max_positions: int = 10000
    endpoint: bool = False

    def __call__(self, x: Array) -> Array:
        half = self.num_channels // 2
        freqs = np.arange(half, dtype=np.float32) / (half - (1 if self.endpoint else 0))
        freqs = jnp.asarray((1 / self.max_positions) ** freqs, jnp.float32)
        x = x.astype(jnp.float32)[:, None] * freqs[None, :]
        return jnp.concatenate([jnp.cos(x), jnp.sin(x)], axis=1)


class FourierEmbedding(nn.Module):
    """Random Fourier features (NCSN++): (B,) -> (B, num_channels) float32, laid out [cos | sin].

    The frequencies, drawn N(0, scale^2) at init from the 'params' rng, are the non-trainable variable
    ``buffers/<path>/freqs`` of shape (num_channels // 2,) (torch: the buffer ``<path>.freqs``).
    """

    num_channels: int
    scale: float = 16.0

    @nn.compact
    def __call__(self, x: Array) -> Array:
        freqs = self.variable('buffers', 'freqs', lambda: jax.random.normal(
            self.make_rng('params'), (self.num_channels // 2,), jnp.float32) * self.scale).value
        x = x.astype(jnp.float32)[:, None] * (2 * np.pi * freqs)[None, :]
        return jnp.concatenate([jnp.cos(x), jnp.sin(x)], axis=1)
