"""DiT, the Diffusion Transformer (Peebles & Xie 2023), as facebookresearch/DiT's ``models.py`` computes it.

    x (B, H, W, C) -> patches (kernel = stride = p conv) + fixed 2-D sin-cos positions -> ``depth`` adaLN-Zero
    blocks conditioned on c = t_emb + y_emb -> final adaLN + Linear -> (B, H, W, out_channels)

Called like every jaxdiff network: ``net.apply(variables, x, noise_labels, class_labels, train=..., rngs=...)``
with NHWC images, noise_labels (B,) (the reference's integer timestep 0..999 under :func:`jaxdiff.precond.ddpm`,
or EDM's c_noise = ln(sigma)/4 under :func:`jaxdiff.precond.edm`) and one-hot class_labels (B, label_dim). The
reference embeds integer labels in a table with one extra "null" row for classifier-free guidance; here a one-hot
row selects its class row and an all-zero row (jaxdiff's unconditional convention) selects the null row, which is
the same embedding. ``label_dropout`` (the reference's class_dropout_prob, 0.1) zeroes label rows in training.

Details as the reference code has them (METHODS §10): the position table's first half encodes the column index,
each half [sin | cos]; timestep features [cos | sin] of the raw noise label with 256 frequencies; adaLN chunks
(shift, scale, gate) for attention then for the MLP, (shift, scale) in the final layer; LayerNorms without affine,
eps 1e-6; tanh-GELU MLP of ratio 4; attention with qkv laid out (3, heads, head_dim); learned variance doubles the
output channels ([eps | v] on channels; a preconditioner's ``out_channels`` keeps the first half).

Parameter names (the converter's contract, as for the U-Nets): the flattened 'params' path joined with '.' is the
reference's ``state_dict`` key, e.g. ``x_embedder.proj.weight`` (HWIO), ``t_embedder.mlp.0.weight`` (in, out),
``y_embedder.embedding_table.weight`` (label_dim + 1, D) (not transposed: a table, not a Linear),
``blocks.0.attn.qkv.weight``, ``blocks.0.adaLN_modulation.1.bias``, ``final_layer.linear.weight``. The reference's
``pos_embed`` is a frozen constant, rebuilt here by :func:`pos_embed_2d` rather than stored.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax import lax

from jaxdiff.nets.layers import Init, Linear, initializer
from jaxdiff.nets.song_unet import check_labels, drop_labels

Array = jax.Array
Dtype = Any

# DiT's model sizes: name -> (depth, hidden_size, num_heads) (models.py's DiT_models; the patch size is separate).
SIZES = {'S': (12, 384, 6), 'B': (12, 768, 12), 'L': (24, 1024, 16), 'XL': (28, 1152, 16)}
_XAVIER, _ZERO, _STD002 = Init('xavier_uniform'), Init(weight=0.0), Init('normal', weight=0.02)
_EPS = 1e-6


def pos_embed_2d(dim: int, grid: int) -> np.ndarray:
    """The reference's fixed 2-D sin-cos position table, (grid*grid, dim) float32, tokens in row-major order.

    The first dim/2 features encode the column index and the last dim/2 the row index; each half is
    [sin | cos] of position x 10000^(-k / (dim/4)), k < dim/4 (computed in float64, as MAE's numpy code).
    """
    if dim % 4:
        raise ValueError(f'hidden_size={dim} must be a multiple of 4 for the 2-D sin-cos position table')
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))
    rows, cols = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64), indexing='ij')

    def one_axis(pos):
        angles = pos.reshape(-1)[:, None] * omega[None]
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    return np.concatenate([one_axis(cols), one_axis(rows)], axis=1).astype(np.float32)


def timestep_features(t: Array, dim: int = 256, max_period: float = 10000.0) -> Array:
    """GLIDE's sinusoidal features of (possibly fractional) noise labels: t (B,) -> (B, dim) float32, [cos | sin]."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[:, None] * freqs[None]
    out = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    return jnp.pad(out, ((0, 0), (0, dim % 2)))


def layer_norm(x: Array) -> Array:
    """LayerNorm over the last axis without affine parameters (eps 1e-6), statistics in float32; x's dtype out."""
    xf = x.astype(jnp.float32)
    mean = xf.mean(-1, keepdims=True)
    var = jnp.square(xf - mean).mean(-1, keepdims=True)
    return ((xf - mean) * lax.rsqrt(var + _EPS)).astype(x.dtype)


def modulate(x: Array, shift: Array, scale: Array) -> Array:
    """adaLN: x (B, T, D) * (1 + scale (B, D)) + shift (B, D), per sample."""
    return x * (1 + scale[:, None]) + shift[:, None]


class _Modulation(nn.Module):
    """The reference's ``adaLN_modulation = Sequential(SiLU, Linear)``: c (B, D) -> (B, chunks, D), zero-initialised."""

    chunks: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, c: Array) -> Array:
        out = Linear(self.chunks * c.shape[-1], init=_ZERO, dtype=self.dtype, name='1')(nn.silu(c))
        return out.reshape(c.shape[0], self.chunks, c.shape[-1])


class _TimestepMLP(nn.Module):
    """``t_embedder.mlp = Sequential(Linear(256, D), SiLU, Linear(D, D))``: features (B, 256) -> (B, D)."""

    hidden_size: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, features: Array) -> Array:
        h = Linear(self.hidden_size, init=_STD002, dtype=self.dtype, name='0')(features)
        return Linear(self.hidden_size, init=_STD002, dtype=self.dtype, name='2')(nn.silu(h))


class _TimestepEmbedder(nn.Module):
    """noise_labels (B,) -> (B, hidden_size): 256 sinusoidal features through a two-layer SiLU MLP."""

    hidden_size: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, t: Array) -> Array:
        return _TimestepMLP(self.hidden_size, self.dtype, name='mlp')(timestep_features(t))


class _Table(nn.Module):
    """An embedding table parameter 'weight' (rows, features), N(0, 0.02^2) as the reference initialises it."""

    rows: int
    features: int

    @nn.compact
    def __call__(self) -> Array:
        return self.param('weight', initializer('normal', 0.02, 1, 1), (self.rows, self.features))


class _LabelEmbedder(nn.Module):
    """One-hot labels (B, label_dim) -> (B, hidden_size): rows of the (label_dim [+ 1 null], D) table.

    An all-zero row (unconditional, or dropped in training) selects the null row; the table has one only when
    ``null_row`` (the reference adds it when class_dropout_prob > 0), otherwise such a row embeds to zeros.
    """

    label_dim: int
    hidden_size: int
    null_row: bool

    @nn.compact
    def __call__(self, labels: Array) -> Array:
        table = _Table(self.label_dim + int(self.null_row), self.hidden_size, name='embedding_table')()
        emb = labels @ table[:self.label_dim]
        if self.null_row:
            emb = emb + (1 - labels.sum(-1, keepdims=True)) * table[self.label_dim]
        return emb


class _Attention(nn.Module):
    """timm's multi-head self-attention: x (B, T, D) -> (B, T, D); qkv channels (3, heads, head_dim); float32 softmax."""

    num_heads: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        b, t, d = x.shape
        head_dim = d // self.num_heads
        qkv = Linear(3 * d, init=_XAVIER, dtype=self.dtype, name='qkv')(x).reshape(b, t, 3, self.num_heads, head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        logits = jnp.einsum('bqhd,bkhd->bhqk', q, k, preferred_element_type=jnp.float32) / math.sqrt(head_dim)
        weights = jax.nn.softmax(logits, axis=-1).astype(x.dtype)
        out = jnp.einsum('bhqk,bkhd->bqhd', weights, v).reshape(b, t, d)
        return Linear(d, init=_XAVIER, dtype=self.dtype, name='proj')(out)


class _Mlp(nn.Module):
    """timm's Mlp with tanh-approximated GELU: (B, T, D) -> fc1 (B, T, hidden) -> fc2 (B, T, D)."""

    hidden: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        h = nn.gelu(Linear(self.hidden, init=_XAVIER, dtype=self.dtype, name='fc1')(x), approximate=True)
        return Linear(x.shape[-1], init=_XAVIER, dtype=self.dtype, name='fc2')(h)


class DiTBlock(nn.Module):
    """adaLN-Zero transformer block: x (B, T, D), c (B, D) -> (B, T, D).

    x += gate_msa * attn(modulate(LN(x), shift_msa, scale_msa)); x += gate_mlp * mlp(modulate(LN(x), ...)).
    """

    num_heads: int
    mlp_ratio: float = 4.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, c: Array) -> Array:
        mod = _Modulation(6, self.dtype, name='adaLN_modulation')(c)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (mod[:, i] for i in range(6))
        attn = _Attention(self.num_heads, self.dtype, name='attn')
        x = x + gate_msa[:, None] * attn(modulate(layer_norm(x), shift_msa, scale_msa))
        mlp = _Mlp(int(x.shape[-1] * self.mlp_ratio), self.dtype, name='mlp')
        return x + gate_mlp[:, None] * mlp(modulate(layer_norm(x), shift_mlp, scale_mlp))


class _Blocks(nn.Module):
    """``depth`` DiTBlocks named '0', '1', ... (the reference's ``blocks`` ModuleList): x (B, T, D), c -> x."""

    depth: int
    num_heads: int
    mlp_ratio: float
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, c: Array) -> Array:
        for i in range(self.depth):
            x = DiTBlock(self.num_heads, self.mlp_ratio, self.dtype, name=str(i))(x, c)
        return x


class _FinalLayer(nn.Module):
    """x (B, T, D), c -> (B, T, patch_size^2 * out_channels): adaLN (shift, scale) on LN(x), then a zero Linear."""

    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, c: Array) -> Array:
        mod = _Modulation(2, self.dtype, name='adaLN_modulation')(c)
        x = modulate(layer_norm(x), mod[:, 0], mod[:, 1])
        return Linear(self.features, init=_ZERO, dtype=self.dtype, name='linear')(x)


class _PatchEmbed(nn.Module):
    """timm's PatchEmbed: x (B, H, W, C) -> (B, H/p * W/p, D) by a kernel = stride = p conv with bias.

    Initialised as the reference does: xavier-uniform as a Linear (fan_in C*p*p, fan_out D), zero bias.
    """

    patch_size: int
    hidden_size: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        p, c, d = self.patch_size, x.shape[-1], self.hidden_size
        w = self.param('weight', initializer('xavier_uniform', 1.0, c * p * p, d), (p, p, c, d))
        b = self.param('bias', initializer('xavier_uniform', 0.0, c * p * p, d), (d,))
        y = lax.conv_general_dilated(x.astype(self.dtype), w.astype(self.dtype), (p, p), 'VALID',
                                     dimension_numbers=('NHWC', 'HWIO', 'NHWC')) + b.astype(self.dtype)
        return y.reshape(y.shape[0], -1, d)


class _XEmbedder(nn.Module):
    """The reference's ``x_embedder`` (timm PatchEmbed, whose conv is named ``proj``)."""

    patch_size: int
    hidden_size: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        return _PatchEmbed(self.patch_size, self.hidden_size, self.dtype, name='proj')(x)


class DiT(nn.Module):
    """Diffusion Transformer: (x (B, R, R, in_channels), noise_labels (B,), class_labels (B, label_dim) or None)
    -> (B, R, R, out_channels), out_channels = 2 * in_channels with ``learn_sigma`` (the reference's [eps | v]).

    Fields are the reference's ``DiT(...)`` arguments under jaxdiff's names: img_resolution = input_size,
    label_dim = num_classes (0: unconditional, no label embedder), label_dropout = class_dropout_prob. Sizes:
    :data:`SIZES` and :func:`dit`. Params are float32; compute runs in ``dtype`` with LayerNorm statistics and
    softmax in float32; the output is float32.
    """

    img_resolution: int = 32         # input height = width (the latent's, for latent diffusion)
    in_channels: int = 4             # input channels (4 for Stable Diffusion's VAE latents)
    label_dim: int = 1000            # classes; 0 = unconditional
    patch_size: int = 2              # p: tokens are p x p patches, T = (img_resolution / p)^2
    hidden_size: int = 1152          # D, the token width
    depth: int = 28                  # transformer blocks
    num_heads: int = 16              # attention heads (D must divide evenly)
    mlp_ratio: float = 4.0           # MLP hidden width / D
    label_dropout: float = 0.1       # probability of the null label in training (classifier-free guidance)
    learn_sigma: bool = True         # also output the learned-variance channels v (the reference's default)
    dtype: Dtype = jnp.float32       # compute dtype
    augment_dim: int = 0             # no augmentation conditioning (the field the jaxdiff nets share)

    @property
    def out_channels(self) -> int:
        """Output channels: in_channels, doubled by learn_sigma."""
        return self.in_channels * (2 if self.learn_sigma else 1)

    @nn.compact
    def __call__(self, x: Array, noise_labels: Array, class_labels: Optional[Array] = None,
                 augment_labels: Optional[Array] = None, train: bool = False) -> Array:
        b, r, p, d = x.shape[0], self.img_resolution, self.patch_size, self.hidden_size
        if x.shape[1:] != (r, r, self.in_channels):
            raise ValueError(f'DiT input has shape {x.shape}, expected (B, {r}, {r}, {self.in_channels})')
        if r % p or d % self.num_heads:
            raise ValueError(f'DiT needs img_resolution ({r}) divisible by patch_size ({p}) and hidden_size ({d}) '
                             f'by num_heads ({self.num_heads})')
        grid = r // p
        tokens = _XEmbedder(p, d, self.dtype, name='x_embedder')(x) + jnp.asarray(pos_embed_2d(d, grid), self.dtype)
        c = _TimestepEmbedder(d, self.dtype, name='t_embedder')(noise_labels.reshape(b))
        if self.label_dim:
            labels = drop_labels(self, check_labels(self.label_dim, class_labels, b), self.label_dropout, train)
            c = c + _LabelEmbedder(self.label_dim, d, self.label_dropout > 0, name='y_embedder')(labels)
        tokens = _Blocks(self.depth, self.num_heads, self.mlp_ratio, self.dtype, name='blocks')(tokens, c)
        out = _FinalLayer(p * p * self.out_channels, self.dtype, name='final_layer')(tokens, c)
        # Unpatchify: token (i, j) holds its p x p x C patch row-major, as the reference's 'nhwpqc->nchpwq'.
        out = out.reshape(b, grid, grid, p, p, self.out_channels).transpose(0, 1, 3, 2, 4, 5)
        return out.reshape(b, r, r, self.out_channels).astype(jnp.float32)


def dit(name: str, **kwargs) -> DiT:
    """A DiT of the reference's configurations by name, 'XL/2' or 'DiT-XL/2' (S/B/L/XL x patch 2/4/8 or any p);
    ``kwargs`` set the other fields (img_resolution, in_channels, label_dim, ...)."""
    size, _, patch = name.removeprefix('DiT-').partition('/')
    if size not in SIZES or not patch.isdigit():
        raise ValueError(f"unknown DiT configuration {name!r}: use SIZE/PATCH with SIZE in {list(SIZES)}, e.g. 'XL/2'")
    depth, hidden, heads = SIZES[size]
    return DiT(depth=depth, hidden_size=hidden, num_heads=heads, patch_size=int(patch), **kwargs)
