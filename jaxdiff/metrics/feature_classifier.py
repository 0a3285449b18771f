"""Small classifiers trained on this machine's data, as offline feature extractors and pseudo-labellers.

A Fréchet distance needs a feature network; Inception's weights are not shipped, so for the small datasets
jaxdiff trains its own :class:`~jaxdiff.nets.classifier.SmallCNN` with a fixed recipe (:data:`CLASSIFIERS`) and
caches the weights. Distances computed with these features are comparable with each other (same recipe, same
seed), not with published FIDs.

Cache layout: ``<cache_dir>/classifiers/<name>.msgpack`` (flax msgpack of the variables) next to
``<name>.json`` (accuracy, seed, data fingerprint, recipe, library version and the weights' sha256), where
``cache_dir`` is the argument, else ``$JAXDIFF_CACHE``, else ``~/.cache/jaxdiff``.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from typing import Callable, NamedTuple

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxdiff
from jaxdiff import files
from jaxdiff.data.sources import FASHION_MNIST_DIR, load_digits, load_fashion_mnist
from jaxdiff.nets.classifier import SmallCNN

# train: fits the classifier. ref and heldout: images it never saw, so features of real images and of samples are
# alike out-of-sample; ref is the Fréchet-distance reference and heldout the real-vs-real yardstick.
SPLITS = ('train', 'ref', 'heldout')
DIGITS_SPLIT_SEED = 0
DEFAULT_SEED = 0
EVAL_BATCH = 1000
LOG_EVERY_S = 10.0


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


def _spec(name: str) -> ClassifierSpec:
    """The registry entry for ``name``; ValueError listing the known names otherwise."""
    if name not in CLASSIFIERS:
        raise ValueError(f'unknown feature classifier {name!r}; known: {", ".join(sorted(CLASSIFIERS))}')
    return CLASSIFIERS[name]


def _module(spec: ClassifierSpec) -> SmallCNN:
    return SmallCNN(num_classes=spec.num_classes, channels=spec.net_channels, feature_dim=spec.feature_dim)


def _recipe(spec: ClassifierSpec) -> dict:
    """The JSON-able fields of ``spec`` that determine the weights (all but the loader function)."""
    return {key: list(value) if isinstance(value, tuple) else value
            for key, value in spec._asdict().items() if key != 'load'}


def dataset_split(name: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 (N, H, W, C) and labels int32 (N,) of classifier ``name``'s split (one of SPLITS)."""
    spec = _spec(name)
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is unknown; use one of {', '.join(SPLITS)}")
    return spec.load(split)


def _to_unit(images: jax.Array) -> jax.Array:
    """Pixel values 0..255 (B, H, W, C) -> float32 in [-1, 1], the range the diffusion models work in."""
    return images.astype(jnp.float32) / 127.5 - 1


def _to_native(images: jax.Array, resolution: int, channels: int) -> jax.Array:
    """uint8 (B, S, S, channels) -> uint8-valued float32 (B, resolution, resolution, channels).

    Undoes :func:`jaxdiff.data.sources.fit_resolution`: a side that is an integer multiple of ``resolution``
    was nearest-upsampled, so it is average-pooled back (exactly, for replicated pixels); any other larger side
    was zero-padded to the centre, so the centre is cropped with the same offsets.
    """
    shape = tuple(images.shape)
    expected = f'uint8 (B, {resolution}, {resolution}, {channels}) images (or sides that pad or upsample {resolution})'
    if images.dtype != jnp.uint8 or len(shape) != 4:
        raise ValueError(f'feature classifier needs {expected}, got {images.dtype} {shape}')
    side = shape[1]
    if shape[3] != channels:
        raise ValueError(f'feature classifier needs {channels}-channel images, got {shape[3]} channels ({expected})')
    if shape[2] != side or side < resolution:
        raise ValueError(f'feature classifier needs {expected}, got {side}x{shape[2]} images')
    x = images.astype(jnp.float32)
    if side % resolution == 0:
        factor = side // resolution
        return x.reshape(shape[0], resolution, factor, resolution, factor, channels).mean(axis=(2, 4))
    start = (side - resolution) // 2
    return x[:, start:start + resolution, start:start + resolution]


@functools.partial(jax.jit, static_argnames=('module', 'resolution', 'channels'))
def _forward(variables, images: jax.Array, *, module: SmallCNN, resolution: int, channels: int):
    """uint8 images (B, S, S, C) -> dict(features (B, D), logits (B, K)) float32."""
    return module.apply(variables, _to_unit(_to_native(images, resolution, channels)))


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
    """A FeatureNet for registry entry ``name`` with the given variables (e.g. from :func:`train_classifier`)."""
    spec = _spec(name)
    apply = functools.partial(_forward, variables, module=_module(spec), resolution=spec.resolution,
                              channels=spec.channels)
    module = _module(spec)
    return FeatureNet(name=name, resolution=spec.resolution, channels=spec.channels, num_classes=spec.num_classes,
                      accuracy=float(accuracy), apply=apply, apply_float=lambda x: module.apply(variables, x))


def _accuracy(net: FeatureNet, images: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of ``net`` on images (N, H, W, C), labels (N,)."""
    hits = 0
    for start in range(0, len(images), EVAL_BATCH):
        logits = net.apply(images[start:start + EVAL_BATCH])['logits']
        hits += int(jnp.sum(jnp.argmax(logits, axis=1) == labels[start:start + EVAL_BATCH]))
    return hits / len(images)


def _train(name: str, train, heldout, seed: int, log: Callable[[str], None]):
    """(variables, held-out accuracy) of ``name``'s recipe fitted to ``train`` = (images, labels)."""
    spec = _spec(name)
    module = _module(spec)
    images, labels = train
    steps_per_epoch = len(images) // spec.batch_size  # the remainder is dropped so every step has one shape
    total = spec.epochs * steps_per_epoch
    optimizer = optax.adam(optax.cosine_decay_schedule(spec.learning_rate, total))
    variables = module.init(jax.random.key(seed), jnp.zeros((1, spec.resolution, spec.resolution, spec.channels)))
    opt_state = optimizer.init(variables)

    @jax.jit
    def step(variables, opt_state, x, y):
        def loss_fn(v):
            logits = module.apply(v, _to_unit(x))['logits']
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        loss, grads = jax.value_and_grad(loss_fn)(variables)
        updates, opt_state = optimizer.update(grads, opt_state, variables)
        return optax.apply_updates(variables, updates), opt_state, loss

    order_rng = np.random.default_rng(seed)
    begin = last_log = time.perf_counter()
    done, loss_sum = 0, 0.0
    for epoch in range(spec.epochs):
        order = order_rng.permutation(len(images))
        for i in range(steps_per_epoch):
            batch = order[i * spec.batch_size:(i + 1) * spec.batch_size]
            variables, opt_state, loss = step(variables, opt_state, images[batch], labels[batch])
            loss_sum, done = loss_sum + loss, done + 1
            now = time.perf_counter()
            if now - last_log >= LOG_EVERY_S or done == total:
                # float() waits for the step: only here, so the host otherwise runs ahead of the device.
                rate = done * spec.batch_size / (now - begin)
                eta = (total - done) * spec.batch_size / rate
                log(f'{name}: epoch {epoch + 1}/{spec.epochs} step {done}/{total} '
                    f'loss {float(loss_sum) / done:.4f} {rate:.0f} img/s ETA {eta:.0f}s')
                last_log = now
    accuracy = _accuracy(make_feature_net(name, variables), *heldout)
    log(f'{name}: held-out accuracy {accuracy:.4f} after {time.perf_counter() - begin:.0f}s')
    return variables, accuracy


def train_classifier(name: str, *, seed: int = 0, log: Callable[[str], None] = print):
    """Trains ``name``'s recipe from scratch -> (variables, held-out accuracy).

    Deterministic: ``seed`` fixes the initialisation and the order of the batches.
    """
    return _train(name, dataset_split(name, 'train'), dataset_split(name, 'heldout'), seed, log)


def _fingerprint(*arrays: np.ndarray) -> str:
    """A short sha256 of the arrays' shapes and bytes, identifying the data a classifier saw."""
    digest = hashlib.sha256()
    for array in arrays:
        digest.update(str(array.shape).encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()[:16]


def _read_cache(spec: ClassifierSpec, weights_path: str, sidecar_path: str):
    """(variables, accuracy) from the cache files; raises if they are unreadable, mismatched or stale."""
    with open(weights_path, 'rb') as f:
        data = f.read()
    with open(sidecar_path) as f:
        sidecar = json.load(f)
    if sidecar['weights_sha256'] != hashlib.sha256(data).hexdigest():
        raise ValueError('weights do not match the sha256 in their sidecar')
    if sidecar['recipe'] != _recipe(spec):
        raise ValueError('they were trained with a different recipe')
    module = _module(spec)
    template = jax.eval_shape(module.init, jax.random.key(0),
                              jnp.zeros((1, spec.resolution, spec.resolution, spec.channels)))
    variables = flax.serialization.from_bytes(template, data)
    shapes = jax.tree.map(lambda a: (tuple(a.shape), str(a.dtype)), variables)
    if shapes != jax.tree.map(lambda a: (tuple(a.shape), str(a.dtype)), template):
        raise ValueError('the stored arrays do not fit the network')
    return jax.tree.map(jnp.asarray, variables), float(sidecar['accuracy'])


def load_or_train(name: str, cache_dir: str | None = None, log: Callable[[str], None] = print) -> FeatureNet:
    """The FeatureNet for registry entry ``name``, from the cache or trained (seed 0) and cached.

    The files are a cache, not user data: if they are missing, unreadable, inconsistent or from another recipe,
    the classifier is retrained and the files are replaced (with a warning line in the last three cases).
    """
    spec = _spec(name)
    folder = os.path.join(cache_dir or os.environ.get('JAXDIFF_CACHE') or os.path.expanduser('~/.cache/jaxdiff'),
                          'classifiers')
    weights_path = os.path.join(folder, f'{name}.msgpack')
    sidecar_path = os.path.join(folder, f'{name}.json')
    if os.path.exists(weights_path):
        try:
            variables, accuracy = _read_cache(spec, weights_path, sidecar_path)
            return make_feature_net(name, variables, accuracy)
        except Exception as error:  # pylint: disable=broad-except  # any failure to read a cache means rebuild it
            log(f'warning: cached {name} at {weights_path} is unusable ({type(error).__name__}: {error}); '
                'retraining and replacing it')
    else:
        log(f'{name}: no cached weights; training it (seed {DEFAULT_SEED}) and saving to {weights_path}')
    train, heldout = dataset_split(name, 'train'), dataset_split(name, 'heldout')
    variables, accuracy = _train(name, train, heldout, DEFAULT_SEED, log)
    data = flax.serialization.to_bytes(variables)
    sidecar = dict(name=name, accuracy=accuracy, seed=DEFAULT_SEED, data_fingerprint=_fingerprint(*train, *heldout),
                   recipe=_recipe(spec), jaxdiff_version=jaxdiff.__version__,
                   weights_sha256=hashlib.sha256(data).hexdigest())
    os.makedirs(folder, exist_ok=True)
    # Weights first: a crash before the sidecar lands leaves a hash mismatch, which the next call retrains.
    files.write_bytes(weights_path, data)
    files.write_json(sidecar_path, sidecar)
    log(f'{name}: saved weights to {weights_path} (held-out accuracy {accuracy:.4f})')
    return make_feature_net(name, variables, accuracy)
