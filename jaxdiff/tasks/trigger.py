"""Task ``trigger``: fine-tune a class-conditional denoiser run so a reserved extra class generates a watermark
image (Zhao et al. 2023's trigger watermark; the pieces are in :mod:`jaxdiff.watermark.trigger`)::

    python train.py --config configs/watermark/trigger_digits.py --workdir OUT --config.base_run=BASE_RUN
    python watermark.py trigger --workdir BASE_RUN --out OUT [--lam ... --steps ...]   # the same, from flags

loss = denoising loss on (trigger -> watermark image) + lam * sum |theta - theta_frozen| (+ prior_weight times the
denoising loss on ``prior`` images of the ordinary classes: the base model's own samples, DreamBooth's prior, or
its training data, replay; not in the paper's recipe). theta starts at the frozen weights: the base run's EMA with
the zero trigger row of :func:`~jaxdiff.watermark.trigger.add_trigger_label` (class K of a K-class net), rebuilt
in setup from the base run, never stored. Adam (constant ``optim.lr``); optional EMA of the iterates (half-life
``ema.halflife_img`` images, i.e. steps * batch_size; 0 = the last iterate, the paper's recipe).

Each step makes its own batch (the engine's data is :class:`~jaxdiff.engine.task.NoData`): ``batch_size`` copies
of (watermark image, trigger) at EDM's training noise levels (P_mean, P_std, sigma_data of the base config), and
with a prior ``batch_size`` prior images picked at random. Step s (1-based) draws everything from
``fold_in(key(seed), s)`` split into (trigger, prior, pick) keys: the keys of the loop this task replaced, so its
numbers are unchanged (the engine's train key is not used). The net runs in inference mode: no dropout and above
all no label dropout, which would teach the *unconditional* model the watermark.

Outputs in OUT besides the engine's (config.json, checkpoints/ of the fine-tuning, metrics.jsonl, tb/), written
after the last step: ``trigger.json`` (the trigger, settings, l1 and trigger_mse over 16 samples),
``trigger_image.png`` and ``denoiser/``: the fine-tuned model as a denoiser run (the base config, K + 1 classes,
one checkpoint at step base + total_steps with params = ema = the fine-tuned (EMA) weights and a fresh optimizer
state of the base recipe). :func:`jaxdiff.runs.load_run` loads OUT as that run, so sample.py and
``python -m eval.watermark --trigger OUT`` read OUT; train.py continues ``denoiser/`` on clean data (README).
"""
from __future__ import annotations

import functools
import os
import time
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jaxdiff import config_ranges as ranges
from jaxdiff import files, losses, parallel
from jaxdiff.data.sources import make_source
from jaxdiff.engine import checkpoint as ckpt
from jaxdiff.engine.ema import decay_per_step, ema_update
from jaxdiff.engine.optim import make_optimizer
from jaxdiff.engine.state import TrainState
from jaxdiff.engine.task import Callback, NoData, RunKeys, Setup, Task
from jaxdiff.nets.from_config import denoiser_fn
from jaxdiff.runs import TRIGGER_DENOISER_DIR, Run, load_run
from jaxdiff.tasks.sample_grid import sigma_range
from jaxdiff.watermark import trigger as T

PRIOR_SOURCES = ('samples', 'data')


def trigger_config() -> ml_collections.ConfigDict:
    """Every field of a trigger fine-tuning config with its default (the CLI's defaults)."""
    c = ml_collections.ConfigDict()
    c.task = 'trigger'              # trigger fine-tuning (jaxdiff.tasks.trigger)
    c.seed = 0                      # PRNG seed: step s draws from fold_in(key(seed), s)
    c.base_run = ''                 # the class-conditional denoiser run to fine-tune (its EMA weights)
    c.image = ''                    # watermark image PNG/JPEG, resized to the model ('' = the frame-and-cross mark)
    c.lam = 1e-4                    # weight of sum |theta - theta_frozen| (0 = no regulariser)
    c.prior = 0                     # prior preservation: images of the ordinary classes (0 = off, paper's recipe)
    c.prior_weight = 1.0            # weight of the denoising loss on the prior images
    c.prior_source = 'samples'      # samples (the base model's own, seeds 0..prior-1) | data (its training data)
    c.batch_size = 32               # copies of (image, trigger) per step (and prior images, with a prior)
    c.total_steps = 500             # fine-tuning steps
    c.checkpoint_every = 100        # steps between checkpoints (also at the end and on SIGTERM/SIGINT)
    c.keep_checkpoints = 2          # recent checkpoints kept
    c.log_every = 100               # steps between progress lines / metrics.jsonl rows

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 1e-4               # Adam learning rate (constant)

    c.ema = ml_collections.ConfigDict()
    c.ema.halflife_img = 0.0        # EMA half-life of the fine-tuned weights in images (0 = the last iterate)
    return c


def check(config) -> None:
    """One clear ValueError (FileNotFoundError: no base run) for a trigger config no run can use."""
    extra = sorted(set(config.keys()) - set(trigger_config().keys()))
    if extra:
        raise ValueError(f'config has field(s) {extra} that task=trigger does not use; start the config from '
                         'jaxdiff.tasks.trigger.trigger_config()')
    if not config.base_run:
        raise ValueError('config.base_run is empty: set --config.base_run=RUN (a class-conditional denoiser run)')
    if not os.path.isdir(config.base_run):
        raise FileNotFoundError(f'config.base_run={config.base_run!r} not found: pass a class-conditional denoiser run')
    if config.prior_source not in PRIOR_SOURCES:
        raise ValueError(f'unknown prior source {config.prior_source!r}: use one of {", ".join(PRIOR_SOURCES)}')
    if (config.total_steps < 1 or config.batch_size < 1 or config.optim.lr <= 0 or config.lam < 0 or config.prior < 0
            or config.ema.halflife_img < 0):
        raise ValueError(f'need total_steps >= 1, batch_size >= 1, optim.lr > 0, lam >= 0, prior >= 0, '
                         f'ema.halflife_img >= 0; got {config.total_steps}, {config.batch_size}, {config.optim.lr}, '
                         f'{config.lam}, {config.prior}, {config.ema.halflife_img}')


class Fixed(NamedTuple):
    """What setup rebuilds from the base run and the config (constants of the step, never stored).

    net: the K + 1-class net; frozen: its params before fine-tuning; image: (H, W, C) float32 in [-1, 1]; cond:
    (K + 1,) the trigger row; prior: None or (images (M, H, W, C) in [-1, 1], one-hot labels (M, K + 1))."""
    net: object
    frozen: dict
    image: jax.Array
    cond: jax.Array
    prior: Optional[tuple[jax.Array, jax.Array]]


def prior_images(base: Run, num: int, label_dim: int, source: str = 'samples') -> tuple[jax.Array, jax.Array]:
    """(images (M, H, W, C) in [-1, 1], one-hot labels (M, label_dim)) that keep the ordinary classes on.

    source 'samples': the base model's own class-balanced samples (sample.py's seeds 0..num-1, EDM Heun 18 steps;
    M = num), DreamBooth's prior preservation; 'data': the first num images of the base run's training data
    (config.data; M = min(num, dataset size)), replay of the data the model owner trained on.
    """
    if source not in PRIOR_SOURCES:
        raise ValueError(f'unknown prior source {source!r}: use one of {", ".join(PRIOR_SOURCES)}')
    if source == 'data':
        data, _ = make_source(base.config.data)
        items = [data[i] for i in range(min(num, len(data)))]
        images = np.stack([item['image'] for item in items])
        labels = np.asarray([item['label'] for item in items])
    else:
        k = base.net.label_dim
        images = T.class_samples(lambda v: denoiser_fn(base.config, base.net, v), base.variables,
                                 (base.info.resolution, base.info.resolution, base.info.channels),
                                 sigma_range(base.config), k, num)
        labels = np.arange(num) % k
    return jnp.asarray(images, jnp.float32) / 127.5 - 1, jax.nn.one_hot(labels, label_dim)


def trigger_loss(config, base_config, fixed: Fixed, params: dict, buffers: dict, key: jax.Array,
                 shard=lambda x: x) -> tuple[jax.Array, tuple]:
    """(total loss, (trigger denoising loss, prior loss (0 without a prior), l1 = sum |theta - theta_frozen|)),
    float32 () each, for params at one step's ``key`` (module docstring). ``shard`` lays a (B, ...) batch array out
    over the devices (identity: wherever XLA puts it)."""
    levels = losses.edm_levels(base_config.loss.P_mean, base_config.loss.P_std, base_config.model.sigma_data)
    variables = {'params': params, 'buffers': buffers} if buffers else {'params': params}
    denoise = denoiser_fn(base_config, fixed.net, variables)

    def denoising(images, rows, key):
        k_sigma, k_noise = jax.random.split(key)
        sigma = shard(levels.sample(k_sigma, images.shape[0]))
        noise = shard(jax.random.normal(k_noise, images.shape, jnp.float32))
        error = losses.weighted_error(denoise, shard(images), sigma, noise, levels.weight, shard(rows))
        return error.reshape(images.shape[0], -1).sum(axis=1).mean()

    b = config.batch_size
    k_trigger, k_prior, k_pick = jax.random.split(key, 3)
    trigger = denoising(jnp.broadcast_to(fixed.image, (b,) + fixed.image.shape),
                        jnp.broadcast_to(fixed.cond, (b,) + fixed.cond.shape), k_trigger)
    prior = jnp.zeros(())
    if fixed.prior is not None:
        pick = jax.random.randint(k_pick, (b,), 0, fixed.prior[0].shape[0])
        prior = denoising(fixed.prior[0][pick], fixed.prior[1][pick], k_prior)
    l1 = T.l1_distance(params, fixed.frozen)
    return trigger + config.prior_weight * prior + config.lam * l1, (trigger, prior, l1)


def train_step(config, base_config, fixed: Fixed, shard, state: TrainState, batch: dict,
               key: jax.Array) -> tuple[TrainState, dict]:
    """One Adam step of :func:`trigger_loss` (unjitted); ``batch`` is empty and ``key`` unused: the step draws
    from fold_in(key(config.seed), step + 1) (module docstring). Metrics: loss, denoise, prior, l1."""
    del batch, key
    step_key = jax.random.fold_in(jax.random.key(config.seed), state.step + 1)
    (loss, (denoise, prior, l1)), grads = jax.value_and_grad(trigger_loss, argnums=3, has_aux=True)(
        config, base_config, fixed, state.params, state.buffers, step_key, shard)
    updates, opt_state = optax.adam(config.optim.lr).update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = ema_update(state.ema, params, jnp.float32(decay_per_step(config.ema.halflife_img, config.batch_size)))
    return (state.replace(step=state.step + 1, params=params, ema=ema, opt_state=opt_state),
            dict(loss=loss, denoise=denoise, prior=prior, l1=l1))


def init_state(config, fixed: Fixed, buffers: dict, key: jax.Array) -> TrainState:
    """Step 0: params = ema = the frozen weights, a fresh Adam state, the base run's buffers (``key`` unused)."""
    del key
    return TrainState(step=jnp.zeros((), jnp.int32), params=fixed.frozen, ema=fixed.frozen,
                      opt_state=optax.adam(config.optim.lr).init(fixed.frozen), buffers=buffers,
                      nonfinite=jnp.zeros((), jnp.int32))


def export_denoiser(folder: str, base: Run, info, params: dict, buffers: dict, step: int) -> None:
    """Write ``params`` (numpy) as a denoiser run in ``folder``: the base config, ``info``, one checkpoint at
    ``step`` with params = ema and a fresh optimizer state of the base recipe (train.py continues it)."""
    state = TrainState(step=np.int32(step), params=params, ema=params,
                       opt_state=jax.tree.map(np.asarray, make_optimizer(base.config).init(params)),
                       buffers=buffers, nonfinite=np.int32(0))
    if jax.process_index() == 0:
        ckpt.check_config(folder, base.config, False)
        ckpt.write_dataset_info(folder, info)
    checkpointer = ckpt.Checkpointer(folder, 1, use_async=False)
    checkpointer.save(state, {'process_count': 1, 'states': [{}]}, base.config)  # no data position: from the seed
    checkpointer.close()


def finish(config, workdir: str, base: Run, info, fixed: Fixed, image: np.ndarray, started: float, step: int,
           state: TrainState) -> dict:
    """After the last step: the fine-tuned (EMA) model exported to ``workdir/denoiser``, trigger_image.png and
    trigger.json (settings, l1, trigger_mse of 16 trigger samples); returns {'trigger_mse'} for the log."""
    ema, buffers = parallel.global_to_host((state.ema, state.buffers))
    variables = {'params': ema, 'buffers': buffers} if buffers else {'params': ema}
    shape = (info.resolution, info.resolution, info.channels)
    samples = T.sample_trigger(lambda v: denoiser_fn(base.config, fixed.net, v), variables, shape,
                               sigma_range(base.config), np.asarray(fixed.cond))
    mse = T.trigger_mse(samples, image)
    export_denoiser(os.path.join(workdir, TRIGGER_DENOISER_DIR), base, info, ema, buffers, base.step + step)
    report = dict(base_run=os.path.abspath(config.base_run), base_step=base.step, trigger_label=info.num_classes - 1,
                  trigger_cond=np.asarray(fixed.cond).tolist(), image=os.path.abspath(config.image) if config.image
                  else None, lam=config.lam, steps=step, lr=config.optim.lr, batch_size=config.batch_size,
                  prior=config.prior, prior_weight=config.prior_weight, prior_source=config.prior_source,
                  ema_halflife=config.ema.halflife_img / config.batch_size, seed=config.seed,
                  l1=float(T.l1_distance(ema, jax.device_get(fixed.frozen))), trigger_mse=mse,
                  seconds=round(time.time() - started, 1))
    if jax.process_index() == 0:
        T.write_image(os.path.join(workdir, T.IMAGE_FILE), image)
        files.write_json(os.path.join(workdir, T.TRIGGER_FILE), report)
    return dict(trigger_mse=mse)


def setup(config, workdir: str, mesh, keys: RunKeys) -> Setup:
    """The base run's frozen weights with the trigger class, the watermark image, the prior, the step and
    the final-outputs callback."""
    started = time.time()
    base = load_run(config.base_run)
    if base.task != 'denoiser':
        raise ValueError(f'{config.base_run} is a {base.task} run; a trigger fine-tunes a denoiser run')
    net, frozen = T.add_trigger_label(base.net, jax.tree.map(jnp.asarray, base.variables['params']))
    info = base.info._replace(num_classes=net.label_dim)
    image = T.load_watermark_image(config.image, info.resolution, info.channels)
    prior = prior_images(base, config.prior, net.label_dim, config.prior_source) if config.prior else None
    fixed = Fixed(net, frozen, jnp.asarray(image, jnp.float32) / 127.5 - 1,
                  jnp.asarray(T.trigger_condition(net.label_dim)), prior)
    sharding = parallel.batch_sharding(mesh)
    shard = functools.partial(jax.lax.with_sharding_constraint, shardings=sharding)
    describe = [f'trigger class {net.label_dim - 1} for {config.base_run} (step {base.step}, '
                f'{type(net).__name__}, {base.net.label_dim} classes): lam {config.lam:g}, prior '
                f'{len(prior[0]) if prior else 0} ({config.prior_source}) x {config.prior_weight:g}, '
                f'image {config.image or "default mark"}']
    return Setup(init=functools.partial(init_state, config, fixed, base.variables.get('buffers', {})),
                 step=functools.partial(train_step, config, base.config, fixed, shard), data=NoData(),
                 batch_size=config.batch_size, total_steps=config.total_steps, describe=describe,
                 callbacks=[Callback('trigger', 0, functools.partial(finish, config, workdir, base, info, fixed,
                                                                     image, started))],
                 progress=dict(denoise='.4f', prior='.4f', l1='.4g'), last=('l1',), nan_policy='raise',
                 info=info)



# The valid values of every field of :func:`trigger_config` (checked before any work: jaxdiff.config_ranges).
RANGES: dict[str, ranges.Rule] = {
    **ranges.COMMON, 'task': ranges.one_of('trigger'), 'base_run': ranges.TEXT, 'image': ranges.TEXT,
    'lam': ranges.NON_NEGATIVE, 'prior': ranges.at_least(0, integer=True), 'prior_weight': ranges.NON_NEGATIVE,
    'prior_source': ranges.one_of('samples', 'data'), 'ema.halflife_img': ranges.NON_NEGATIVE,
}
TASK = Task('trigger', trigger_config, check, setup, ranges=RANGES, kind='trigger fine-tuning',
            use='sample its fine-tuned model with python sample.py --workdir {dir}',
            configs='configs/watermark/trigger_digits.py')
