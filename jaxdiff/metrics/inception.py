"""The Inception-v3 of FID (pytorch-fid's ``fid_inception_v3``) in Flax, its preprocessing, and its weights.

Network. ``FIDInceptionV3`` is torchvision's Inception3 (no auxiliary head, 1008 classes) with the changes
pytorch-fid makes so that it computes what the TensorFlow graph of the original FID code computes: the average
pools inside the Mixed_5*/6*/7b blocks ignore the zero padding (TF's pooling, ``count_include_pad=False``), and
Mixed_7c pools its last branch with a max instead of an average (the TF graph does). Every conv is followed by
BatchNorm (eps 1e-3, running statistics only) and ReLU. ``pool`` is the 2048-D global average pool of Mixed_7c
(TF's ``pool_3``, the FID features); ``logits`` is the 1008-way fc layer applied to it, bias included.
(Inception Score code ported from TF uses ``pool @ W`` without the bias: ``pool @ params['fc']['weight']``.)

Preprocessing (``preprocess``), as pytorch-fid's ``InceptionV3`` wrapper: uint8 -> x / 255, bilinear resize to
299x299 as torch's ``F.interpolate(mode='bilinear', align_corners=False)`` (half-pixel centres, no antialias,
so a downscale samples rather than averages), then 2x - 1. Grey images are repeated to 3 channels, as PIL's
``convert('RGB')`` does in pytorch-fid's file loader.

Weights. Nothing is downloaded. The user passes pytorch-fid's file ``pt_inception-2015-12-05-6726825d.pth``
(a torch state dict of the TF Inception graph ``inception-2015-12-05`` ported to torch, the file pytorch-fid
fetches from its GitHub release ``fid_weights``) to ``load_fid_inception``, which reads it without running
pickled code. Variables are ``{'params': ..., 'batch_stats': ...}``; a variable's path joined with '.' is its torch
state-dict key (``Mixed_5b.branch1x1.conv.weight``, ``Mixed_5b.branch1x1.bn.running_mean``). Layouts: conv weight
HWIO here, OIHW in torch; fc weight (in, out) here, (out, in) in torch. ``params`` holds conv and BN ``weight``/
``bias`` and the fc layer; ``batch_stats`` holds BN ``running_mean``/``running_var``. Torch's
``num_batches_tracked`` counters mean nothing at inference and are dropped.

Comparability. With these weights and this preprocessing the features are pytorch-fid's, so FIDs match
pytorch-fid's up to float rounding (checked against pytorch-fid 0.3.0 / torch 2.13 CPU on random weights and
random uint8 images of 28..512 pixels: preprocessed inputs within 2.4e-7, pool features and logits within ~1e-6
of their largest magnitude). pytorch-fid reports that its FIDs are close to, but not identical with, the
original TF implementation (TTUR), e.g. 0.08 absolute on LSUN, mostly because the TF graph resizes differently
(TF1 bilinear without half-pixel centres); numbers quoted from TF-FID papers are therefore only approximately
comparable.
"""
from __future__ import annotations

import functools
import os
import pickle
import zipfile
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import traverse_util
from jax import lax

from jaxdiff.nets.safe_unpickle import UnsafePickleError, safe_load

Array = jax.Array
Dtype = Any

WEIGHTS_FILE = 'pt_inception-2015-12-05-6726825d.pth'
INPUT_SIZE = 299
POOL_FEATURES = 2048
NUM_CLASSES = 1008
_BN_EPS = 1e-3  # the TF graph's BatchNorm epsilon, kept by pytorch-fid's port
_COLLECTIONS = ('params', 'batch_stats')
_IGNORED_SUFFIX = '.num_batches_tracked'
_HIGHEST = lax.Precision.HIGHEST
# uint8 -> v / 255 as a table of correctly rounded quotients (torch's ToTensor): XLA's CPU backend turns a
# division by 255 into a multiplication by 1/255, which is one ulp off for about half of the 256 values.
_UNIT = np.arange(256, dtype=np.float32) / np.float32(255)


class _Conv(nn.Module):
    """Bias-free 2-D conv: (B, H, W, Cin) -> (B, H', W', features); weight HWIO, explicit (ph, pw) zero padding."""

    features: int
    kernel_size: tuple[int, int]
    stride: int
    padding: tuple[int, int]
    dtype: Dtype
    precision: Any

    @nn.compact
    def __call__(self, x: Array) -> Array:
        shape = (*self.kernel_size, x.shape[-1], self.features)
        w = self.param('weight', nn.initializers.variance_scaling(2.0, 'fan_in', 'truncated_normal'), shape)
        pads = tuple((p, p) for p in self.padding)
        return lax.conv_general_dilated(x.astype(self.dtype), w.astype(self.dtype), (self.stride, self.stride), pads,
                                        dimension_numbers=('NHWC', 'HWIO', 'NHWC'), precision=self.precision)


class _BatchNorm(nn.Module):
    """Inference BatchNorm over the last axis: (..., C) -> (..., C) with running statistics, eps 1e-3."""

    dtype: Dtype

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = x.shape[-1]
        weight = self.param('weight', nn.initializers.ones, (c,))
        bias = self.param('bias', nn.initializers.zeros, (c,))
        mean = self.variable('batch_stats', 'running_mean', jnp.zeros, (c,)).value
        var = self.variable('batch_stats', 'running_var', jnp.ones, (c,)).value
        # Folded into one float32 scale and shift per channel, as torch's CPU kernel evaluates it.
        scale = weight * lax.rsqrt(var + _BN_EPS)
        return x * scale.astype(self.dtype) + (bias - mean * scale).astype(self.dtype)


class _Linear(nn.Module):
    """float32 fully connected layer: (B, in) -> (B, features); weight (in, out), bias (features,)."""

    features: int
    precision: Any

    @nn.compact
    def __call__(self, x: Array) -> Array:
        w = self.param('weight', nn.initializers.lecun_normal(), (x.shape[-1], self.features))
        b = self.param('bias', nn.initializers.zeros, (self.features,))
        return jnp.dot(x, w, precision=self.precision) + b


class BasicConv2d(nn.Module):
    """conv (no bias) -> BatchNorm -> ReLU: (B, H, W, Cin) -> (B, H', W', features); submodules 'conv', 'bn'."""

    features: int
    kernel_size: tuple[int, int] = (1, 1)
    stride: int = 1
    padding: tuple[int, int] = (0, 0)
    dtype: Dtype = jnp.float32
    precision: Any = _HIGHEST

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x = _Conv(self.features, self.kernel_size, self.stride, self.padding, self.dtype, self.precision,
                  name='conv')(x)
        return nn.relu(_BatchNorm(self.dtype, name='bn')(x))


def _avg_pool_3x3(x: Array) -> Array:
    """3x3 stride-1 average over the valid pixels only (TF's pooling): (B, H, W, C) -> (B, H, W, C)."""
    return nn.avg_pool(x, (3, 3), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3(x: Array, stride: int, pad: int) -> Array:
    """3x3 max pool; padding counts as -inf: (B, H, W, C) -> (B, H', W', C)."""
    return nn.max_pool(x, (3, 3), strides=(stride, stride), padding=((pad, pad), (pad, pad)))


class _Block(nn.Module):
    """Shared fields of the Inception blocks; ``conv(features, name, kernel, stride, padding)`` builds a branch."""

    dtype: Dtype = jnp.float32
    precision: Any = _HIGHEST

    def conv(self, features: int, name: str, kernel: tuple[int, int] = (1, 1), stride: int = 1,
             padding: tuple[int, int] = (0, 0)) -> BasicConv2d:
        """A named BasicConv2d with this block's dtype and precision."""
        return BasicConv2d(features, kernel, stride, padding, self.dtype, self.precision, name=name)


class InceptionA(_Block):
    """Mixed_5b/5c/5d: (B, 35, 35, Cin) -> (B, 35, 35, 224 + pool_features)."""

    pool_features: int = 32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        b1 = self.conv(64, 'branch1x1')(x)
        b5 = self.conv(64, 'branch5x5_2', (5, 5), padding=(2, 2))(self.conv(48, 'branch5x5_1')(x))
        b3 = self.conv(64, 'branch3x3dbl_1')(x)
        b3 = self.conv(96, 'branch3x3dbl_2', (3, 3), padding=(1, 1))(b3)
        b3 = self.conv(96, 'branch3x3dbl_3', (3, 3), padding=(1, 1))(b3)
        bp = self.conv(self.pool_features, 'branch_pool')(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(_Block):
    """Mixed_6a, the 35 -> 17 reduction: (B, 35, 35, Cin) -> (B, 17, 17, 480 + Cin)."""

    @nn.compact
    def __call__(self, x: Array) -> Array:
        b3 = self.conv(384, 'branch3x3', (3, 3), stride=2)(x)
        bd = self.conv(64, 'branch3x3dbl_1')(x)
        bd = self.conv(96, 'branch3x3dbl_2', (3, 3), padding=(1, 1))(bd)
        bd = self.conv(96, 'branch3x3dbl_3', (3, 3), stride=2)(bd)
        return jnp.concatenate([b3, bd, _max_pool_3x3(x, 2, 0)], axis=-1)


class InceptionC(_Block):
    """Mixed_6b..6e, factorised 7x7 convs: (B, 17, 17, Cin) -> (B, 17, 17, 768)."""

    channels_7x7: int = 128

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c7, row, col = self.channels_7x7, ((1, 7), (0, 3)), ((7, 1), (3, 0))
        b1 = self.conv(192, 'branch1x1')(x)
        b7 = self.conv(c7, 'branch7x7_1')(x)
        b7 = self.conv(c7, 'branch7x7_2', row[0], padding=row[1])(b7)
        b7 = self.conv(192, 'branch7x7_3', col[0], padding=col[1])(b7)
        bd = self.conv(c7, 'branch7x7dbl_1')(x)
        bd = self.conv(c7, 'branch7x7dbl_2', col[0], padding=col[1])(bd)
        bd = self.conv(c7, 'branch7x7dbl_3', row[0], padding=row[1])(bd)
        bd = self.conv(c7, 'branch7x7dbl_4', col[0], padding=col[1])(bd)
        bd = self.conv(192, 'branch7x7dbl_5', row[0], padding=row[1])(bd)
        bp = self.conv(192, 'branch_pool')(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(_Block):
    """Mixed_7a, the 17 -> 8 reduction: (B, 17, 17, Cin) -> (B, 8, 8, 512 + Cin)."""

    @nn.compact
    def __call__(self, x: Array) -> Array:
        b3 = self.conv(320, 'branch3x3_2', (3, 3), stride=2)(self.conv(192, 'branch3x3_1')(x))
        b7 = self.conv(192, 'branch7x7x3_1')(x)
        b7 = self.conv(192, 'branch7x7x3_2', (1, 7), padding=(0, 3))(b7)
        b7 = self.conv(192, 'branch7x7x3_3', (7, 1), padding=(3, 0))(b7)
        b7 = self.conv(192, 'branch7x7x3_4', (3, 3), stride=2)(b7)
        return jnp.concatenate([b3, b7, _max_pool_3x3(x, 2, 0)], axis=-1)


class InceptionE(_Block):
    """Mixed_7b (pool='avg') and Mixed_7c (pool='max', the TF graph's quirk): (B, 8, 8, Cin) -> (B, 8, 8, 2048)."""

    pool: str = 'avg'

    @nn.compact
    def __call__(self, x: Array) -> Array:
        b1 = self.conv(320, 'branch1x1')(x)
        b3 = self.conv(384, 'branch3x3_1')(x)
        b3 = [self.conv(384, 'branch3x3_2a', (1, 3), padding=(0, 1))(b3),
              self.conv(384, 'branch3x3_2b', (3, 1), padding=(1, 0))(b3)]
        bd = self.conv(448, 'branch3x3dbl_1')(x)
        bd = self.conv(384, 'branch3x3dbl_2', (3, 3), padding=(1, 1))(bd)
        bd = [self.conv(384, 'branch3x3dbl_3a', (1, 3), padding=(0, 1))(bd),
              self.conv(384, 'branch3x3dbl_3b', (3, 1), padding=(1, 0))(bd)]
        pooled = _max_pool_3x3(x, 1, 1) if self.pool == 'max' else _avg_pool_3x3(x)
        bp = self.conv(192, 'branch_pool')(pooled)
        return jnp.concatenate([b1, *b3, *bd, bp], axis=-1)


class FIDInceptionV3(nn.Module):
    """pytorch-fid's FID Inception-v3: x (B, 299, 299, 3) in [-1, 1] -> {'pool': (B, 2048), 'logits': (B, 1008)}.

    ``dtype`` is the compute dtype of the convs; parameters stay float32 and both outputs are float32.
    ``precision`` defaults to HIGHEST so that features do not depend on an accelerator's default float32
    matmul mode (TF32 or bf16 passes); FID statistics are sensitive to small feature shifts.
    The net is fully convolutional down to the global pool, so other input sizes (>= 75) run too, but FID
    features are defined at 299.
    """

    dtype: Dtype = jnp.float32
    precision: Any = _HIGHEST

    @nn.compact
    def __call__(self, x: Array) -> dict[str, Array]:
        conv = functools.partial(BasicConv2d, dtype=self.dtype, precision=self.precision)
        blocks = dict(dtype=self.dtype, precision=self.precision)
        x = conv(32, (3, 3), stride=2, name='Conv2d_1a_3x3')(x)  # 149
        x = conv(32, (3, 3), name='Conv2d_2a_3x3')(x)  # 147
        x = conv(64, (3, 3), padding=(1, 1), name='Conv2d_2b_3x3')(x)
        x = _max_pool_3x3(x, 2, 0)  # 73
        x = conv(80, (1, 1), name='Conv2d_3b_1x1')(x)
        x = conv(192, (3, 3), name='Conv2d_4a_3x3')(x)  # 71
        x = _max_pool_3x3(x, 2, 0)  # 35
        for name, pool_features in (('Mixed_5b', 32), ('Mixed_5c', 64), ('Mixed_5d', 64)):
            x = InceptionA(pool_features=pool_features, name=name, **blocks)(x)
        x = InceptionB(name='Mixed_6a', **blocks)(x)  # 17
        for name, c7 in (('Mixed_6b', 128), ('Mixed_6c', 160), ('Mixed_6d', 160), ('Mixed_6e', 192)):
            x = InceptionC(channels_7x7=c7, name=name, **blocks)(x)
        x = InceptionD(name='Mixed_7a', **blocks)(x)  # 8
        x = InceptionE(pool='avg', name='Mixed_7b', **blocks)(x)
        x = InceptionE(pool='max', name='Mixed_7c', **blocks)(x)
        pool = jnp.mean(x.astype(jnp.float32), axis=(1, 2))  # float32: the pool feeds covariance estimates
        return {'pool': pool, 'logits': _Linear(NUM_CLASSES, self.precision, name='fc')(pool)}


def _bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) float32 matrix R with R @ v equal to torch's 1-D bilinear resize of v (n_in,) to n_out.

    Torch's rule (align_corners=False, no antialias), evaluated in float32 as torch does for float32 images:
    source index s = max(n_in / n_out * (i + 0.5) - 0.5, 0); taps floor(s) and floor(s) + 1 (clamped to the last
    pixel) with weights 1 - frac(s) and frac(s).
    """
    scale = np.float32(n_in) / np.float32(n_out)
    # Torch's compiled kernel fuses ``scale * (i + 0.5) - 0.5`` into one multiply-add (checked bit for bit on torch
    # 2.13, x86 CPU; nvcc fuses by default too). A product of two float32 is exact in float64, so float64
    # arithmetic rounded once to float32 gives the same bits; two float32 roundings differ for large inputs.
    centres = np.arange(n_out, dtype=np.float32) + np.float32(0.5)
    src = (np.float64(scale) * centres.astype(np.float64) - 0.5).astype(np.float32)
    src = np.maximum(src, np.float32(0))
    lo = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    frac = np.clip(src - lo.astype(np.float32), np.float32(0), np.float32(1))
    hi = np.minimum(lo + 1, n_in - 1)
    rows = np.arange(n_out)
    matrix = np.zeros((n_out, n_in), np.float32)
    np.add.at(matrix, (rows, lo), np.float32(1) - frac)
    np.add.at(matrix, (rows, hi), frac)  # at the last pixel lo == hi and the two weights add up to 1
    return matrix


def _resize_bilinear(x: Array, size: int) -> Array:
    """(B, H, W, C) float32 -> (B, size, size, C), torch's bilinear resize as two interpolation-matrix products.

    Width first, then height: the order in which torch's kernel combines the four taps.
    """
    rows, cols = _bilinear_matrix(x.shape[1], size), _bilinear_matrix(x.shape[2], size)
    x = jnp.einsum('vw,bhwc->bhvc', cols, x, precision=_HIGHEST)
    return jnp.einsum('uh,bhvc->buvc', rows, x, precision=_HIGHEST)


def preprocess(images: Array) -> Array:
    """uint8 images (B, H, W, C), C in {1, 3} -> float32 (B, 299, 299, 3) in [-1, 1], as pytorch-fid feeds its net.

    x / 255, then torch's bilinear resize (align_corners=False) to 299x299, then 2x - 1; one channel is repeated
    to three.
    """
    images = jnp.asarray(images)
    if images.dtype != jnp.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f'FID Inception takes uint8 images (B, H, W, 1 or 3), got {images.dtype} {images.shape}; '
                         'convert samples with jnp.round(x * 255).clip(0, 255).astype(jnp.uint8) first.')
    x = _resize_bilinear(jnp.asarray(_UNIT)[images], INPUT_SIZE)
    x = 2 * x - 1
    return jnp.broadcast_to(x, (*x.shape[:3], 3))


@jax.jit
def inception_features(variables: Mapping, images: Array) -> dict[str, Array]:
    """uint8 images (B, H, W, 1 or 3) -> {'pool': (B, 2048), 'logits': (B, 1008)}, float32, pytorch-fid's features.

    ``variables`` as returned by ``load_fid_inception``; compiles once per image shape.
    """
    return FIDInceptionV3().apply(variables, preprocess(images))


def _to_flax_layout(a: np.ndarray) -> np.ndarray:
    """Torch layout -> Flax: conv OIHW -> HWIO, linear (out, in) -> (in, out), 1-D unchanged."""
    return a.transpose(2, 3, 1, 0) if a.ndim == 4 else a.T if a.ndim == 2 else a


def _to_torch_layout(a: np.ndarray) -> np.ndarray:
    """Flax layout -> torch: conv HWIO -> OIHW, linear (in, out) -> (out, in), 1-D unchanged."""
    return a.transpose(3, 2, 0, 1) if a.ndim == 4 else a.T if a.ndim == 2 else a


@functools.cache
def _expected() -> dict[str, tuple[str, tuple[str, ...], tuple[int, ...]]]:
    """{torch key: (collection, Flax path, torch-layout shape)} of every variable of FIDInceptionV3."""
    init = functools.partial(FIDInceptionV3().init, x=jnp.zeros((1, INPUT_SIZE, INPUT_SIZE, 3)))
    abstract = jax.eval_shape(init, jax.random.key(0))
    return {'.'.join(path): (coll, path, _to_torch_layout(np.empty(leaf.shape, np.bool_)).shape)
            for coll in _COLLECTIONS for path, leaf in traverse_util.flatten_dict(abstract[coll]).items()}


def _few(items: list[str], n: int = 4) -> str:
    """The first ``n`` items joined, then how many more there are."""
    more = f' and {len(items) - n} more' if len(items) > n else ''
    return ', '.join(items[:n]) + more


def from_torch_state_dict(state_dict: Mapping[str, np.ndarray]) -> dict:
    """Torch state dict of pytorch-fid's FID Inception (torch layouts) -> {'params': ..., 'batch_stats': ...}.

    Keys as in ``pt_inception-2015-12-05-6726825d.pth``: ``Conv2d_1a_3x3.conv.weight`` (32, 3, 3, 3) OIHW,
    ``Mixed_5b.branch1x1.bn.running_var`` (64,), ``fc.weight`` (1008, 2048), ... Values become float32 numpy
    arrays in Flax layouts; ``*.num_batches_tracked`` is ignored. Missing, unexpected and mis-shaped keys are
    reported together in one ValueError.
    """
    expected = _expected()
    tree, unexpected, misshaped = {}, [], []
    for key, value in state_dict.items():
        if key.endswith(_IGNORED_SUFFIX):
            continue
        if key not in expected:
            unexpected.append(key)
            continue
        coll, path, shape = expected[key]
        value = np.asarray(value)
        if value.shape != shape:
            misshaped.append(f'{key} {value.shape} (expected {shape})')
            continue
        tree[(coll, *path)] = np.ascontiguousarray(_to_flax_layout(value), dtype=np.float32)
    missing = [k for k in expected if k not in state_dict]
    if missing or unexpected or misshaped:
        problems = [f'{len(found)} {what}: {_few(found)}' for what, found in
                    (('missing', missing), ('unexpected', unexpected), ('mis-shaped', misshaped)) if found]
        raise ValueError(f"not the state dict of pytorch-fid's FID Inception-v3 ({'; '.join(problems)}); expected "
                         f'the torch state dict stored in {WEIGHTS_FILE}, with keys like Conv2d_1a_3x3.conv.weight '
                         '(32, 3, 3, 3) in torch layouts (conv OIHW, linear (out, in)).')
    return traverse_util.unflatten_dict(tree)


def to_torch_state_dict(variables: Mapping) -> dict[str, np.ndarray]:
    """Flax variables {'params', 'batch_stats'} -> torch state dict {dotted key: float32 array in torch layout}.

    Without ``num_batches_tracked``: torch's BatchNorm fills it in when loading a plain dict.
    """
    return {'.'.join(path): np.ascontiguousarray(_to_torch_layout(np.asarray(leaf, np.float32)))
            for coll in _COLLECTIONS for path, leaf in traverse_util.flatten_dict(variables[coll]).items()}


def load_fid_inception(path: str | os.PathLike) -> dict:
    """pytorch-fid's weights file ``pt_inception-2015-12-05-6726825d.pth`` -> FIDInceptionV3 variables.

    The file (torch.save of a state dict) is read through ``jaxdiff.nets.safe_unpickle``: pickled code never
    runs, and a file naming anything but tensors and plain containers raises UnsafePickleError. A missing file
    raises FileNotFoundError, an unreadable one or a different network's ValueError.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file; pass the path of pytorch-fid's FID Inception weights "
                                f'{WEIGHTS_FILE} (jaxdiff never downloads it).')
    try:
        state_dict = safe_load(path)
    except UnsafePickleError:  # an UnpicklingError too, but its own message already names the refused global
        raise
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, ValueError, TypeError) as e:
        raise ValueError(f'{path} is not a readable torch state dict ({e}); expected {WEIGHTS_FILE}.') from e
    if not isinstance(state_dict, Mapping):
        raise ValueError(f'{path} holds a {type(state_dict).__name__}, not a state dict; expected {WEIGHTS_FILE}.')
    return from_torch_state_dict(state_dict)
