"""One jitted function from seeds to uint8 images, sharded over this process's devices.

Sample ``s`` is a function of ``s`` alone (DESIGN.md): with ``k = fold_in(key(0), s)``, its latents are
``normal(fold_in(k, 0))``, the solver's noise uses the per-sample key ``fold_in(k, 1)``, and a random class label
is ``randint(fold_in(k, 2))``. Nothing mixes samples of a batch, so batch size and device count do not change
the bytes.

Labels: ``'random'`` (uniform over the classes, EDM's generate.py default), ``'cycle'`` (class
``values[s % len(values)]``: class-balanced with values = 0..K-1, or a user list) or ``'none'`` (unconditional,
stored as -1).
"""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxdiff.cli import UsageError

BASE_SEED = 0
LABEL_MODES = ('random', 'cycle', 'none')


class Labels(NamedTuple):
    """How a seed gets its class label: mode in LABEL_MODES; values (cycle mode); num_classes (0: unconditional)."""
    mode: str
    values: tuple[int, ...]
    num_classes: int

    def describe(self) -> dict:
        """JSON-able form for the manifest."""
        return dict(mode=self.mode, values=list(self.values), num_classes=self.num_classes)


def make_labels(label_dim: int, class_balanced: bool = False, labels: Optional[str] = None) -> Labels:
    """Labels for a model with ``label_dim`` classes from --class_balanced / --labels L[,L...]; UsageError if they
    do not fit the model."""
    if not label_dim:
        if class_balanced or labels:
            raise UsageError('--class_balanced / --labels need a class-conditional model; this one is unconditional')
        return Labels('none', (), 0)
    if class_balanced and labels:
        raise UsageError('give --class_balanced or --labels, not both')
    if class_balanced:
        return Labels('cycle', tuple(range(label_dim)), label_dim)
    if labels:
        try:
            values = tuple(int(v) for v in str(labels).split(','))
        except ValueError:
            raise UsageError(f'--labels {labels!r}: expected class indices like 3 or 0,1,2') from None
        bad = [v for v in values if not 0 <= v < label_dim]
        if bad:
            raise UsageError(f'--labels {labels!r}: classes must lie in 0..{label_dim - 1}, got {bad}')
        return Labels('cycle', values, label_dim)
    return Labels('random', (), label_dim)


def seed_key(seed: jax.Array) -> jax.Array:
    """The key of one seed (int32 ())."""
    return jax.random.fold_in(jax.random.key(BASE_SEED), seed)


def seed_label(seed: jax.Array, labels: Labels) -> jax.Array:
    """The class label (int32 ()) of one seed; -1 when unconditional."""
    if labels.mode == 'random':
        return jax.random.randint(jax.random.fold_in(seed_key(seed), 2), (), 0, labels.num_classes)
    if labels.mode == 'cycle':
        return jnp.asarray(labels.values, jnp.int32)[seed % len(labels.values)]
    return jnp.int32(-1)


def to_uint8(x: jax.Array) -> jax.Array:
    """[-1, 1] floats -> uint8 as EDM's generate.py: floor(x * 127.5 + 128) clipped to 0..255."""
    return jnp.clip(jnp.floor(x.astype(jnp.float32) * 127.5 + 128), 0, 255).astype(jnp.uint8)


def generate(denoiser: Callable, solver: Callable, labels: Labels, image_shape: tuple[int, int, int],
             decode: Optional[Callable], variables: dict, seeds: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(images uint8 (B, H, W, C), labels int32 (B,)) for seeds int32 (B,).

    denoiser: variables -> D; solver: (D, latents, per-sample keys, cond) -> x0 (see :mod:`.options`);
    image_shape: the solver's (H, W, C); decode: None, or (variables, x0) -> images in [-1, 1] (a latent model).
    """
    keys = jax.vmap(seed_key)(seeds)
    latents = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 0), image_shape, jnp.float32))(keys)
    noise_keys = jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys)
    label = jax.vmap(lambda s: seed_label(s, labels))(seeds)
    cond = jax.nn.one_hot(label, labels.num_classes, dtype=jnp.float32) if labels.num_classes else None
    images = solver(denoiser(variables), latents, noise_keys, cond)
    if decode is not None:
        images = decode(variables, images)
    return to_uint8(images), label


def local_mesh() -> Mesh:
    """A 1-D ('data',) mesh over this process's devices: sampling needs no cross-host communication."""
    return Mesh(np.asarray(jax.local_devices()), ('data',))


def make_generator(denoiser: Callable, solver: Callable, labels: Labels, image_shape: tuple[int, int, int],
                   mesh: Mesh, decode: Optional[Callable] = None) -> Callable:
    """Jitted ``fn(variables, seeds int32 (B,)) -> (uint8 (B,H,W,C), int32 (B,))``, B sharded over the mesh;
    image_shape is the solver's space, ``decode`` (a latent model's) maps its result to images."""
    batch = NamedSharding(mesh, P('data'))
    replicated = NamedSharding(mesh, P())
    fn = functools.partial(generate, denoiser, solver, labels, tuple(image_shape), decode)
    return jax.jit(fn, in_shardings=(replicated, batch), out_shardings=(batch, batch))


def sample_array(model, num_samples: int, *, build: Callable = lambda d: d, labels: Optional[Labels] = None,
                 variables: Optional[dict] = None, batch_size: int = 250, num_steps: int = 18) -> np.ndarray:
    """uint8 (N, H, W, C) samples of seeds 0..N-1 in memory (sample.py's per-seed latents and labels, EDM Heun).

    model: a jaxdiff.sampling.model.Model; build: transform of its denoiser (guidance); labels: how seeds get
    labels (default: unconditional, the zero label); variables: the weights (default model.variables, e.g. a
    perturbed copy); batch_size: seeds per jitted call (a multiple of the local device count).
    """
    from jaxdiff.sampling import options
    solver = options.make_solver('edm', options.resolve_solver('edm', {'num_steps': num_steps}, model.sigma_range))
    labels = labels or Labels('none', (), model.label_dim)
    fn = make_generator(lambda v: build(model.denoiser(v)), solver, labels, model.solver_shape, local_mesh(),
                        model.decode)
    variables = model.variables if variables is None else variables
    batch = min(batch_size, num_samples)
    out = []
    for start in range(0, num_samples, batch):
        # Every batch has one shape (one compilation); the last one's surplus seeds are dropped.
        images, _ = fn(variables, jnp.arange(start, start + batch, dtype=jnp.int32))
        out.append(np.asarray(images)[:num_samples - start])
    return np.concatenate(out)

