"""Small classifiers trained on this machine's data, as offline feature extractors and pseudo-labellers.

A Fréchet distance needs a feature network; Inception's weights are not shipped, so for the small datasets
jaxdiff trains its own :class:`~jaxdiff.nets.classifier.SmallCNN` with a fixed recipe (:data:`CLASSIFIERS`) and
caches the weights. Distances computed with these features are comparable with each other (same recipe, same
seed), not with published FIDs.

Training is the engine task ``feature_classifier`` (:mod:`jaxdiff.tasks.feature_classifier`); this module holds
the registry, the splits, :class:`FeatureNet` and :func:`load_or_train`. Cache layout: ``<cache_dir>/classifiers/
<name>/``, an engine run directory (config.json, checkpoints/, metrics.jsonl, tb/) with ``classifier.json``
(held-out accuracy, seed, step, data fingerprint, recipe, library version), where ``cache_dir`` is the argument,
else ``$JAXDIFF_CACHE``, else ``~/.cache/jaxdiff``.
"""
from __future__ import annotations

import functools
import hashlib
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.data.sources import FASHION_MNIST_DIR, load_digits, load_fashion_mnist
from jaxdiff.nets.classifier import SmallCNN

# train: fits the classifier. ref and heldout: images it never saw, so features of real images and of samples are
# alike out-of-sample; ref is the Fréchet-distance reference and heldout the real-vs-real yardstick.
SPLITS = ('train', 'ref', 'heldout')
DIGITS_SPLIT_SEED = 0
DEFAULT_SEED = 0  # the seed of the cached classifiers
EVAL_BATCH = 1000
RESULT_FILE = 'classifier.json'  # a finished run's record (written by the task, read by load_or_train)


def _digits_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn digits cut by a fixed permutation: 60% train (1078), 20% ref (359), 20% heldout (360)."""
    images, labels = load_digits()
    order = np.random.default_rng(DIGITS_SPLIT_SEED).permutation(len(images))
    train_end = len(images) * 3 // 5
    ref_end = train_end + (len(images) - train_end) // 2
    index = {'train': order[:train_end], 'ref': order[train_end:ref_end], 'heldout': order[ref_end:]}[split]
    return images[index], labels[index]


def _fashion_mnist_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST from Debian's files: train = its train split (60k); ref / heldout = halves of its test split."""
    if split == 'train':
        return load_fashion_mnist(FASHION_MNIST_DIR, 'train')
    images, labels = load_fashion_mnist(FASHION_MNIST_DIR, 'test')
    half = slice(None, 5000) if split == 'ref' else slice(5000, None)
    return images[half], labels[half]


class ClassifierSpec(NamedTuple):
    """A classifier recipe: its data, native image shape, network and training hyperparameters."""
    load: Callable[[str], tuple[np.ndarray, np.ndarray]]  # a split of SPLITS -> uint8 images, int32 labels
    split: str             # how the splits are cut, for humans (part of the recipe: a new cut retrains)
    resolution: int        # native side
    channels: int
    num_classes: int
    epochs: int
    batch_size: int
    learning_rate: float   # Adam, cosine-decayed to 0 over training
    net_channels: tuple[int, ...] = (32, 64, 128)
    feature_dim: int = 128


CLASSIFIERS = {
    'digits_classifier': ClassifierSpec(
        load=_digits_split, split='fixed permutation (seed 0) of the 1797 digits: 60% train, 20% ref, 20% heldout',
        resolution=8, channels=1, num_classes=10, epochs=20, batch_size=64, learning_rate=3e-3),
    'fashion_mnist_classifier': ClassifierSpec(
        load=_fashion_mnist_split, split="Fashion-MNIST 'train' (60k); ref / heldout: 'test' images 0-4999 / 5000-9999",
        resolution=28, channels=1, num_classes=10, epochs=2, batch_size=128, learning_rate=3e-3),
}


def classifier_spec(name: str) -> ClassifierSpec:
    """The registry entry for ``name``; ValueError listing the known names otherwise."""
    if name not in CLASSIFIERS:
        raise ValueError(f'unknown feature classifier {name!r}; known: {", ".join(sorted(CLASSIFIERS))}')
    return CLASSIFIERS[name]


def network(spec: ClassifierSpec) -> SmallCNN:
    """The SmallCNN of ``spec`` (unbound module)."""
    return SmallCNN(num_classes=spec.num_classes, channels=spec.net_channels, feature_dim=spec.feature_dim)


def recipe_of(spec: ClassifierSpec) -> dict:
    """The JSON-able fields of ``spec`` that determine the weights (all but the loader function)."""
    return {key: list(value) if isinstance(value, tuple) else value
            for key, value in spec._asdict().items() if key != 'load'}


def dataset_split(name: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 (N, H, W, C) and labels int32 (N,) of classifier ``name``'s split (one of SPLITS)."""
    spec = classifier_spec(name)
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is unknown; use one of {', '.join(SPLITS)}")
    return spec.load(split)


def to_unit(images: jax.Array) -> jax.Array:
    """Pixel values 0..255 (B, H, W, C) -> float32 in [-1, 1], the range the diffusion models work in."""
    return images.astype(jnp.float32) / 127.5 - 1


def native_side(x: jax.Array, resolution: int) -> jax.Array:
    """Images (B, S, S, C), any float dtype -> (B, resolution, resolution, C), undoing
    :func:`jaxdiff.data.sources.fit_resolution`: a side that is an integer multiple of ``resolution`` was
    nearest-upsampled, so it is average-pooled back (exactly, for replicated pixels); any other larger side was
    zero-padded to the centre, so the centre is cropped with the same offsets. Differentiable."""
    b, side, _, c = x.shape
    if side % resolution == 0:
        factor = side // resolution
        return x.reshape(b, resolution, factor, resolution, factor, c).mean(axis=(2, 4))
    start = (side - resolution) // 2
    return x[:, start:start + resolution, start:start + resolution]


def _to_native(images: jax.Array, resolution: int, channels: int) -> jax.Array:
    """uint8 (B, S, S, channels) -> uint8-valued float32 (B, resolution, resolution, channels) by
    :func:`native_side`; ValueError naming the expected shape for anything else."""
    shape = tuple(images.shape)
    expected = f'uint8 (B, {resolution}, {resolution}, {channels}) images (or sides that pad or upsample {resolution})'
    if images.dtype != jnp.uint8 or len(shape) != 4:
        raise ValueError(f'feature classifier needs {expected}, got {images.dtype} {shape}')
    side = shape[1]
    if shape[3] != channels:
        raise ValueError(f'feature classifier needs {channels}-channel images, got {shape[3]} channels ({expected})')
    if shape[2] != side or side < resolution:
        raise ValueError(f'feature classifier needs {expected}, got {side}x{shape[2]} images')
    return native_side(images.astype(jnp.float32), resolution)


@functools.partial(jax.jit, static_argnames=('module', 'resolution', 'channels'))
def _forward(variables, images: jax.Array, *, module: SmallCNN, resolution: int, channels: int):
    """uint8 images (B, S, S, C) -> dict(features (B, D), logits (B, K)) float32."""
    return module.apply(variables, to_unit(_to_native(images, resolution, channels)))


class FeatureNet(NamedTuple):
    """A trained classifier as a feature extractor.

    ``apply(images uint8 (B, S, S, channels)) -> dict(features (B, feature_dim), logits (B, num_classes))``
    float32; S is ``resolution`` or a side that :func:`jaxdiff.data.sources.fit_resolution` produces from it
    (integer multiples are average-pooled back, other larger sides centre-cropped). It is jitted, batched and
    pure, so it can also serve as a pseudo-labeller (softmax of the logits = p(class | image)).
    """
    name: str
    resolution: int
    channels: int
    num_classes: int
    accuracy: float  # on the held-out split
    apply: Callable[[jax.Array], dict]
    # the same network on float images (B, resolution, resolution, channels) in [-1, 1], differentiable (for
    # gradients of p(class | x0) in guidance and safety methods); native resolution only
    apply_float: Callable[[jax.Array], dict]


def make_feature_net(name: str, variables, accuracy: float = float('nan')) -> FeatureNet:
    """A FeatureNet for registry entry ``name`` with the given variables (e.g. a run's params)."""
    spec = classifier_spec(name)
    apply = functools.partial(_forward, variables, module=network(spec), resolution=spec.resolution,
                              channels=spec.channels)
    module = network(spec)
    return FeatureNet(name=name, resolution=spec.resolution, channels=spec.channels, num_classes=spec.num_classes,
                      accuracy=float(accuracy), apply=apply, apply_float=lambda x: module.apply(variables, x))


def top1_accuracy(net: FeatureNet, images: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of ``net`` on images uint8 (N, H, W, C), labels int32 (N,), in batches of EVAL_BATCH."""
    hits = 0
    for start in range(0, len(images), EVAL_BATCH):
        logits = net.apply(images[start:start + EVAL_BATCH])['logits']
        hits += int(jnp.sum(jnp.argmax(logits, axis=1) == labels[start:start + EVAL_BATCH]))
    return hits / len(images)


def data_fingerprint(*arrays: np.ndarray) -> str:
    """A short sha256 of the arrays' shapes and bytes, identifying the data a classifier saw."""
    digest = hashlib.sha256()
    for array in arrays:
        digest.update(str(array.shape).encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()[:16]
