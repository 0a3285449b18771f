"""Task ``denoiser``: an EDM diffusion model (DDPM++ / NCSN++ / ADM / the 2-D MLP) trained with EDM's loss, Adam
with lr ramp-up, the non-finite gradient guard and EMA; PNG sample grids as a callback. The noise-conditional
classifier (:mod:`jaxdiff.tasks.noisy_classifier`) is the same recipe with another loss.

    python train.py --config configs/diffusion/digits.py --workdir runs/digits

Config: :func:`jaxdiff.config.base_config` (EDM's CIFAR-10 DDPM++ recipe as defaults). Data: any
``data.source`` of :func:`jaxdiff.data.make_iterator`, the gmm2d toy included (a registered source, no special
case here).

Loss normalisation is EDM's (``loss.sum() * loss_scaling / batch_gpu_total`` summed over GPUs): the per-element
weighted error is summed over (H, W, C) and averaged over the global batch, so EDM's lr (1e-3 for CIFAR-10)
means the same here. Randomness of step ``state.step``: ``fold_in(key, step)`` split into sigma / noise / dropout
(also label dropout) / augment keys (:func:`step_keys`); random draws are made for the global batch, so results do
not depend on the mesh. Non-finite gradient elements become 0 / +-1e5 as in the reference, and the step is counted
in ``state.nonfinite`` (the engine's 'count' NaN policy).
"""
from __future__ import annotations

import functools
import os
import types
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from jax.sharding import Mesh

from jaxdiff import losses, parallel
from jaxdiff.config import RANGES, base_config
from jaxdiff.data.pipeline import IteratorBatches, make_iterator
from jaxdiff.engine import checkpoint as ckpt
from jaxdiff.engine.ema import ema_beta, ema_update
from jaxdiff.engine.optim import learning_rate, make_optimizer
from jaxdiff.engine.state import TrainState
from jaxdiff.engine.task import Callback, RunKeys, Setup, Task
from jaxdiff.nets.from_config import build_net, check_task, denoiser_fn, is_classifier
from jaxdiff.tasks import sample_grid

LossFn = Callable[[object, nn.Module, dict, dict, dict], jax.Array]


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
    """EDM training loss: weighted error summed over pixels, mean over the batch.

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


def neutralise(grads):
    """(grads with NaN -> 0, +inf -> 1e5, -inf -> -1e5, int32 () 1 if any element was non-finite else 0)."""
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
    clean = jax.tree.map(lambda g: jnp.nan_to_num(g, nan=0.0, posinf=1e5, neginf=-1e5), grads)
    return clean, (~finite).astype(jnp.int32)


def train_step(config, net: nn.Module, loss_fn: LossFn, state: TrainState, batch: dict,
               key: jax.Array) -> tuple[TrainState, dict]:
    """One optimizer step of ``loss_fn`` (unjitted): returns the new state and scalar metrics {loss, grad_norm (of
    the applied, neutralised grads), lr, nonfinite (the run's count of non-finite steps so far), ema_beta}."""
    keys = step_keys(key, state.step)
    loss, grads = jax.value_and_grad(lambda p: loss_fn(config, net, state.variables(p), batch, keys))(state.params)
    grads, bad = neutralise(grads)
    updates, opt_state = make_optimizer(config).update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    beta = ema_beta(config, state.step)
    new_state = state.replace(step=state.step + 1, params=params, ema=ema_update(state.ema, params, beta),
                              opt_state=opt_state, nonfinite=state.nonfinite + bad)
    metrics = dict(loss=loss, grad_norm=optax.tree.norm(grads), lr=learning_rate(config, state.step),
                   nonfinite=new_state.nonfinite, ema_beta=beta)
    return new_state, metrics


# ----------------------------------------------------------------------------------------------- state

def dummy_inputs(net: nn.Module, info) -> tuple:
    """Batch-1 zero inputs (x (1,res,res,C), noise_labels (1,), class_labels, augment_labels) for net.init."""
    x = jnp.zeros((1, info.resolution, info.resolution, info.channels), jnp.float32)
    labels = jnp.zeros((1, net.label_dim), jnp.float32) if net.label_dim else None
    augment = jnp.zeros((1, net.augment_dim), jnp.float32) if net.augment_dim else None
    return x, jnp.zeros((1,), jnp.float32), labels, augment


def init_variables(config, net: nn.Module, info, key: jax.Array) -> dict:
    """net.init on batch-1 zero inputs: (x, noise_labels) for the noisy classifier, :func:`dummy_inputs` else."""
    if is_classifier(config):
        x = jnp.zeros((1, info.resolution, info.resolution, info.channels), jnp.float32)
        return net.init({'params': key}, x, jnp.zeros((1,), jnp.float32))
    x, noise, labels, augment = dummy_inputs(net, info)
    return net.init({'params': key}, x, noise, labels, augment_labels=augment)


def init_state(config, net: nn.Module, info, key: jax.Array) -> TrainState:
    """Fresh state: params (and buffers) from net.init with ``key``, ema = params, Adam state, step 0."""
    variables = jax.jit(lambda k: init_variables(config, net, info, k))(key)
    params = variables['params']
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema=jax.tree.map(jnp.copy, params),
                      opt_state=make_optimizer(config).init(params), buffers=variables.get('buffers', {}),
                      nonfinite=jnp.zeros((), jnp.int32))


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


def make_train_step(config, net: nn.Module, mesh: Mesh, compiler_options: Optional[dict] = None,
                    loss_fn: LossFn = batch_loss):
    """Jitted ``step_fn(state, batch, key) -> (state, metrics)`` over ``mesh``, donating the state (what the engine
    runs, without its metric accumulation: benchmarks and step tests call it directly).

    state: TrainState laid out as :func:`state_shardings`; batch: dict of global arrays (B_global, ...) sharded
    as :func:`jaxdiff.parallel.batch_sharding`; key: the run's base PRNG key (replicated), folded with state.step.
    compiler_options: XLA options for this jit (None = XLA's defaults).
    """
    shardings = state_shardings(mesh, abstract_state(config, net))
    replicated = parallel.replicated(mesh)
    return jax.jit(functools.partial(train_step, config, net, loss_fn),
                   in_shardings=(shardings, parallel.batch_sharding(mesh), replicated),
                   out_shardings=(shardings, replicated), donate_argnums=(0,),
                   compiler_options=compiler_options)


# ----------------------------------------------------------------------------------------------- task

def make_data(config):
    """(this process's endless batch iterator, DatasetInfo) for ``config.data`` (every source, gmm2d included)."""
    return make_iterator(config.data, global_batch_size=config.batch_size, seed=config.seed,
                         process_index=jax.process_index(), process_count=jax.process_count())


def check(config) -> None:
    """One clear error for values no diffusion (or noisy-classifier) run can use."""
    check_task(config)
    for name in ('batch_size', 'total_steps'):
        if int(config[name]) <= 0:
            raise ValueError(f'config.{name}={config[name]} must be positive')
    if config.sample_every < 0:
        raise ValueError(f'config.sample_every={config.sample_every} must be >= 0 (0 = never)')


def setup(loss_fn: LossFn, sample_grids: bool, config, workdir: str, mesh: Mesh, keys: RunKeys) -> Setup:
    """Net, state, data and (``sample_grids``) the sample-grid callback of a run of the EDM recipe with the loss
    ``loss_fn``: the ``denoiser`` task here, ``noisy_classifier`` with its own loss."""
    iterator, data_info = make_data(config)
    info = ckpt.net_info(workdir, data_info)  # a fine-tuned run keeps its classes (e.g. a trigger class)
    net = build_net(config, info)
    arch = '' if is_classifier(config) else f' ({config.model.arch})'  # the classifier does not read arch
    describe = [f'{type(net).__name__}{arch} on {config.data.source} {info.resolution}x{info.resolution}x'
                f'{info.channels}, {info.num_classes} classes, {info.size} examples']
    init = functools.partial(init_state, config, net, info)
    callbacks, outputs = [], {'last_samples': None}
    if sample_grids and config.sample_every:
        callbacks.append(sample_callback(config, workdir, mesh, keys, net, info, init, outputs))
    return Setup(init=init, step=functools.partial(train_step, config, net, loss_fn),
                 data=IteratorBatches(iterator), batch_size=config.batch_size, total_steps=config.total_steps,
                 describe=describe, callbacks=callbacks,
                 progress=dict(lr='.2e', grad_norm='.3g', nonfinite='d'), last=('lr', 'nonfinite', 'ema_beta'),
                 integers=('nonfinite',), nan_policy='count', info=info, done=lambda state: dict(outputs))


def sample_callback(config, workdir, mesh, keys, net, info, init, outputs: dict) -> Callback:
    """Every ``sample_every`` steps (and at the end): a PNG grid of the EMA params' samples (decoded to images
    for a run on latents)."""
    shardings = parallel.fsdp_shardings(mesh, jax.eval_shape(init, keys.init))
    variables_shardings = {'params': shardings.params}
    if shardings.buffers:
        variables_shardings['buffers'] = shardings.buffers
    sampler = sample_grid.make_sampler(config, net, info, mesh, variables_shardings)
    decode = None
    if config.data.source == 'latents':  # show images: decode through the latents' autoencoder
        from jaxdiff.autoencoders import latent_decoder
        decoder = latent_decoder(config.data.path)
        decode = jax.jit(functools.partial(decoder.decode, decoder.variables))

    def write_samples(step: int, state: TrainState) -> None:
        samples = sampler(state.variables(state.ema), keys.extra)
        samples = np.asarray(jax.device_get(samples if decode is None else decode(samples)))
        path = os.path.join(workdir, 'samples', f'step_{step:07d}.png')
        if jax.process_index() == 0:
            sample_grid.save_samples(samples, path, net.label_dim)
            print(f'samples: {path}', flush=True)
        outputs['last_samples'] = path

    return Callback('samples', config.sample_every, write_samples)


TASK = Task('denoiser', base_config, check, functools.partial(setup, batch_loss, True), ranges=RANGES,
            kind='diffusion model', use='sample it with python sample.py --workdir {dir}',
            configs='configs/diffusion/*.py')
