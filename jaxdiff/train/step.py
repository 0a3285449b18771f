"""The sharded training step: EDM loss (or the noisy classifier's cross-entropy), Adam with lr ramp-up,
non-finite gradient guard, EMA; one jax.jit.

Loss normalisation is EDM's (``loss.sum() * loss_scaling / batch_gpu_total`` summed over GPUs): the per-element
weighted error is summed over (H, W, C) and averaged over the global batch, so EDM's lr (1e-3 for CIFAR-10)
means the same here. Randomness of step ``state.step``: ``fold_in(key, step)`` split into sigma / noise / dropout
(also label dropout) / augment keys (:func:`step_keys`); random draws are made for the global batch, so results do
not depend on the mesh. Non-finite gradient elements become 0 / +-1e5 as in the reference, and the step is counted
in ``state.nonfinite``.

task=noisy_classifier (:func:`classifier_loss`): softmax cross-entropy of the label on x + sigma n, with ln(sigma)
uniform over [loss.sigma_min, loss.sigma_max] (0.002..80, the EDM sampler's range). Dhariwal & Nichol draw t
uniformly; a uniform ln(sigma) is the analogue that gives every decade of noise the sampler visits the same
weight, not just the denoiser's P_mean/P_std band: guidance queries the classifier at every sampler step.
"""
from __future__ import annotations

import functools
import types
from typing import Optional

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from jax.sharding import Mesh

from jaxdiff import losses, parallel
from jaxdiff.train.ema import ema_beta, ema_update
from jaxdiff.nets.noisy_classifier import noisy_logits
from jaxdiff.train.model import denoiser_fn, is_classifier
from jaxdiff.train.optimizer import learning_rate, make_optimizer
from jaxdiff.train.state import TrainState, init_state


def step_keys(key: jax.Array, step) -> dict[str, jax.Array]:
    """Keys of one step: fold_in(key, step) split 4 ways into {'sigma', 'noise', 'dropout', 'augment'}."""
    sigma, noise, dropout, augment = jax.random.split(jax.random.fold_in(key, step), 4)
    return dict(sigma=sigma, noise=noise, dropout=dropout, augment=augment)


def noise_levels(config) -> losses.NoiseLevels:
    """The noise-level distribution and weight of ``config.model.precond`` (EDM uses config.loss / sigma_data)."""
    if config.model.precond == 'edm':
        return losses.edm_levels(config.loss.P_mean, config.loss.P_std, config.model.sigma_data)
    return losses.LEVELS[config.model.precond]()


def class_labels(net: nn.Module, label: jax.Array):
    """One-hot float32 (B, net.label_dim) from int labels (B,), or None for an unconditional net."""
    return jax.nn.one_hot(label, net.label_dim, dtype=jnp.float32) if net.label_dim else None


def batch_loss(config, net: nn.Module, variables: dict, batch: dict, keys: dict) -> jax.Array:
    """EDM training loss (): weighted error summed over pixels, mean over the batch.

    batch: image float32 (B, H, W, C) in [-1, 1], label int32 (B,) (ignored by unconditional nets). With
    ``config.loss.augment_p > 0`` the images go through ``jaxdiff.data.augment_pipe`` first and its (B, 9)
    labels condition the net; the augmented image is the target, as in the reference.
    """
    images = batch['image'].astype(jnp.float32)
    augment_labels = None
    if config.loss.augment_p > 0:
        from jaxdiff.data.augment import augment_pipe
        images, augment_labels = augment_pipe(keys['augment'], images, config.loss.augment_p)
    denoise = denoiser_fn(config, net, variables, train=True, rngs={'dropout': keys['dropout']},
                          augment_labels=augment_labels)
    levels = noise_levels(config)
    sigma = levels.sample(keys['sigma'], images.shape[0])
    noise = jax.random.normal(keys['noise'], images.shape, jnp.float32)
    error = losses.weighted_error(denoise, images, sigma, noise, levels.weight,
                                  class_labels(net, batch.get('label')))
    return error.reshape(error.shape[0], -1).sum(axis=1).mean()


def log_uniform_sigma(key: jax.Array, batch: int, sigma_min: float, sigma_max: float) -> jax.Array:
    """(batch,) float32 noise levels with ln(sigma) uniform over [ln sigma_min, ln sigma_max]."""
    log_sigma = jax.random.uniform(key, (batch,), jnp.float32, jnp.log(sigma_min), jnp.log(sigma_max))
    return jnp.exp(log_sigma)


def classifier_loss(config, net: nn.Module, variables: dict, batch: dict, keys: dict) -> jax.Array:
    """Noisy classifier loss (): mean softmax cross-entropy of batch['label'] (B,) on x + sigma n.

    batch: image float32 (B, H, W, C) in [-1, 1], label int32 (B,); sigma per :func:`log_uniform_sigma` over
    config.loss.sigma_min..sigma_max; the net sees EDM-preconditioned inputs (``noisy_logits``).
    """
    images = batch['image'].astype(jnp.float32)
    sigma = log_uniform_sigma(keys['sigma'], images.shape[0], config.loss.sigma_min, config.loss.sigma_max)
    noisy = images + sigma[:, None, None, None] * jax.random.normal(keys['noise'], images.shape, jnp.float32)
    logits = noisy_logits(net, variables, noisy, sigma, sigma_data=config.model.sigma_data, train=True,
                          rngs={'dropout': keys['dropout']})
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch['label']).mean()


def neutralise(grads):
    """(grads with NaN -> 0, +inf -> 1e5, -inf -> -1e5, int32 () 1 if any element was non-finite else 0)."""
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
    clean = jax.tree.map(lambda g: jnp.nan_to_num(g, nan=0.0, posinf=1e5, neginf=-1e5), grads)
    return clean, (~finite).astype(jnp.int32)


def train_step(config, net: nn.Module, state: TrainState, batch: dict, key: jax.Array) -> tuple[TrainState, dict]:
    """One optimizer step (unjitted): returns the new state and scalar metrics
    {loss, grad_norm (of the applied, neutralised grads), lr, nonfinite (this step, 0/1), ema_beta}."""
    keys = step_keys(key, state.step)
    loss_fn = classifier_loss if is_classifier(config) else batch_loss
    loss, grads = jax.value_and_grad(lambda p: loss_fn(config, net, state.variables(p), batch, keys))(state.params)
    grads, bad = neutralise(grads)
    updates, opt_state = make_optimizer(config).update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    beta = ema_beta(config, state.step)
    new_state = state.replace(step=state.step + 1, params=params, ema=ema_update(state.ema, params, beta),
                              opt_state=opt_state, nonfinite=state.nonfinite + bad)
    metrics = dict(loss=loss, grad_norm=optax.tree.norm(grads), lr=learning_rate(config, state.step),
                   nonfinite=bad, ema_beta=beta)
    return new_state, metrics


def abstract_state(config, net: nn.Module) -> TrainState:
    """ShapeDtypeStruct tree of :func:`init_state` for ``net`` (input shape from its img_resolution, in_channels)."""
    info = types.SimpleNamespace(resolution=net.img_resolution, channels=net.in_channels)
    return jax.eval_shape(functools.partial(init_state, config, net, info), jax.random.key(0))


def state_shardings(mesh: Mesh, state) -> TrainState:
    """NamedSharding per leaf of a TrainState (arrays or abstract): each array sharded over 'fsdp' on its largest
    divisible axis, replicated otherwise (everything replicated when the fsdp axis has size 1)."""
    return parallel.fsdp_shardings(mesh, state)


def init_sharded_state(config, net: nn.Module, info, key: jax.Array, mesh: Mesh,
                       compiler_options: Optional[dict] = None) -> TrainState:
    """:func:`init_state` computed under jit straight into :func:`state_shardings` (global arrays, multi-host safe).

    compiler_options: XLA options for this jit (e.g. {'xla_backend_optimization_level': 0} to compile fast).
    """
    init = functools.partial(init_state, config, net, info)
    return jax.jit(init, out_shardings=state_shardings(mesh, jax.eval_shape(init, key)),
                   compiler_options=compiler_options)(key)


def make_train_step(config, net: nn.Module, mesh: Mesh, compiler_options: Optional[dict] = None):
    """Jitted ``step_fn(state, batch, key) -> (state, metrics)`` over ``mesh``, donating the state.

    state: TrainState laid out as :func:`state_shardings`; batch: dict of global arrays (B_global, ...) sharded
    as :func:`jaxdiff.parallel.batch_sharding`; key: the run's base PRNG key (replicated), folded with state.step.
    compiler_options: XLA options for this jit (None = XLA's defaults).
    """
    shardings = state_shardings(mesh, abstract_state(config, net))
    replicated = parallel.replicated(mesh)
    return jax.jit(functools.partial(train_step, config, net),
                   in_shardings=(shardings, parallel.batch_sharding(mesh), replicated),
                   out_shardings=(shardings, replicated), donate_argnums=(0,),
                   compiler_options=compiler_options)
