"""Training the watermark codec (Zhao et al. 2023): config, the l2 ramp, the jitted step, the resumable loop.

    train(config, workdir)     # what ``python watermark.py train_codec --config ... --workdir RUN`` calls

Loss per step: BCE-with-logits(dec(enc(bits, x)), bits) + l2 * MSE(enc(bits, x), x), with fresh random bits per
image and step. The weight ``l2`` is 0 until the batch bit accuracy first exceeds ``l2_start_acc``; then it waits
``l2_wait`` steps and ramps linearly over ``l2_ramp`` steps to ``l2_max`` (:func:`l2_weight`,
:func:`update_ramp`). The ramp counter is training state and is checkpointed.

Run directory: ``config.json`` (the config; a rerun with another config is refused unless allowed),
``dataset_info.json`` (resolution, channels, size), ``checkpoint.msgpack`` (step, params, Adam state, ramp
counter) and ``metrics.jsonl`` (one line per progress line).

Checkpoint format: one msgpack file (flax.serialization) written atomically (temp file + rename), not orbax. The
whole state is a few MB on one host, so orbax's async, sharded, multi-host machinery buys nothing here; one file
is read back by ``embed`` without a model template from orbax metadata, and a crash mid-write leaves the previous
checkpoint intact. Randomness depends on (seed, step) only: bits from ``fold_in(key, step)``, the data order
from a per-epoch permutation of ``(seed, epoch)``, so a resumed run repeats the uninterrupted one.
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jaxdiff import files
from jaxdiff.watermark.codec import WatermarkCodec, codec_from_config

CHECKPOINT_FILE = 'checkpoint.msgpack'
INFO_FILE = 'dataset_info.json'
METRICS_FILE = 'metrics.jsonl'


# ----------------------------------------------------------------------------------------------- config

def base_config() -> ml_collections.ConfigDict:
    """Every watermark-codec field with its default (the paper's CIFAR-10 settings where it has one)."""
    c = ml_collections.ConfigDict()
    c.seed = 0                      # PRNG seed for init, data order and the random training bits
    c.num_bits = 64                 # bits in the watermark string (paper: 64)
    c.batch_size = 64               # images per step (paper: 64)
    c.lr = 1e-4                     # Adam learning rate (paper: 1e-4)
    c.total_steps = 100_000         # optimizer steps (paper CIFAR-10: 100 epochs of 782 steps)
    c.l2_max = 10.0                 # final weight of the image MSE term (paper: 10)
    c.l2_wait = 1_000               # steps at l2 = 0 after the bit accuracy first exceeds l2_start_acc (paper: 1000)
    c.l2_ramp = 3_000               # steps of the linear ramp from 0 to l2_max (paper: 3000)
    c.l2_start_acc = 0.9            # batch bit accuracy that starts the wait-then-ramp schedule (paper: 0.9)
    c.log_every = 500               # steps between progress lines (and metrics.jsonl rows)
    c.checkpoint_every = 5_000      # steps between checkpoints (also saved at the end and on SIGTERM/SIGINT)

    c.data = ml_collections.ConfigDict()
    c.data.source = 'digits'        # digits | fashion_mnist | npz | folder | array_record | tfds (as train.py)
    c.data.path = ''                # file or folder for npz / folder / array_record / fashion_mnist ('' = Debian's)
    c.data.tfds_name = ''           # TFDS dataset name (source=tfds), e.g. 'cifar10'
    c.data.split = 'train'          # dataset split
    c.data.resolution = 0           # image side after padding/upsampling (0 = the source's own)
    c.data.use_labels = True        # embed: keep the class labels in the watermarked .npz

    c.model = ml_collections.ConfigDict()
    c.model.encoder_widths = (32, 32, 64, 128, 256)  # U-Net: first conv, then one per 2x downsampling (paper)
    c.model.decoder_widths = (32, 32, 64, 64, 64, 128, 128)  # decoder conv3x3 widths (paper)
    c.model.decoder_strides = (2, 1, 2, 1, 2, 2, 2)  # decoder conv strides (paper; stride 2 stops at 1x1)
    c.model.decoder_hidden = 512    # decoder dense layer width (paper: 512)
    return c


def locked(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The config locked against new keys (unknown overrides then raise)."""
    config.lock()
    return config


def config_from_dict(saved: dict) -> ml_collections.ConfigDict:
    """A run's config.json dict -> locked ConfigDict on top of :func:`base_config` (lists back to tuples);
    ValueError naming a key that base_config does not have."""
    config = base_config()

    def fill(target: ml_collections.ConfigDict, values: dict, prefix: str) -> None:
        for key, value in values.items():
            if key not in target:
                raise ValueError(f'saved config has an unknown field {prefix + key!r}; is this a watermark codec run?')
            if isinstance(value, dict):
                fill(target[key], value, f'{prefix}{key}.')
            else:
                target[key] = tuple(value) if isinstance(value, list) else value

    fill(config, saved, '')
    return locked(config)


def check_config(config) -> None:
    """One clear ValueError for values no run can use."""
    for name in ('num_bits', 'batch_size', 'total_steps', 'log_every', 'checkpoint_every'):
        if int(config[name]) <= 0:
            raise ValueError(f'config.{name}={config[name]} must be positive')
    for name in ('l2_wait', 'l2_ramp'):
        if int(config[name]) < 0:
            raise ValueError(f'config.{name}={config[name]} must be >= 0')
    if not config.lr > 0 or not config.l2_max >= 0:
        raise ValueError(f'config.lr={config.lr} must be > 0 and config.l2_max={config.l2_max} >= 0')
    if not 0 <= config.l2_start_acc < 1:
        raise ValueError(f'config.l2_start_acc={config.l2_start_acc} must be in [0, 1)')
    m = config.model
    if len(m.decoder_widths) != len(m.decoder_strides):
        raise ValueError(f'config.model.decoder_widths {tuple(m.decoder_widths)} and decoder_strides '
                         f'{tuple(m.decoder_strides)} must have the same length')
    if len(m.encoder_widths) < 2:
        raise ValueError('config.model.encoder_widths needs at least 2 entries (first conv + one level)')


# ----------------------------------------------------------------------------------------------- l2 ramp

def l2_weight(since, l2_max: float, wait: int, ramp: int):
    """Weight of the MSE term given the ramp counter ``since`` (-1 = not started; else steps since the batch bit
    accuracy first exceeded ``l2_start_acc``): clip(l2_max * (since - wait) / ramp, 0, l2_max). ``ramp`` 0 jumps
    to ``l2_max`` one step after the wait. Works on Python numbers and (traced) arrays."""
    frac = (since - wait) / max(ramp, 1)
    if isinstance(since, (int, float)):
        return float(min(max(l2_max * frac, 0.0), l2_max))
    return jnp.clip(l2_max * frac, 0.0, l2_max)


def update_ramp(since, accuracy, start_acc: float):
    """The ramp counter after a step with batch bit accuracy ``accuracy``: -1 stays -1 until accuracy >
    ``start_acc`` (then 0); once started it counts up by one per step. Python numbers or (traced) arrays."""
    if isinstance(since, (int, float)) and isinstance(accuracy, (int, float)):
        return (0 if accuracy > start_acc else -1) if since < 0 else since + 1
    return jnp.where(since < 0, jnp.where(accuracy > start_acc, 0, -1), since + 1).astype(jnp.int32)


# ----------------------------------------------------------------------------------------------- state, step

def make_optimizer(config) -> optax.GradientTransformation:
    """Adam at ``config.lr`` (the paper's optimizer)."""
    return optax.adam(config.lr)


def init_state(config, codec: WatermarkCodec, resolution: int, channels: int) -> dict:
    """Fresh training state {'step', 'params', 'opt_state', 'l2_since'} for images (resolution, resolution,
    channels); params from ``PRNGKey(seed)`` folded with 0."""
    key = jax.random.fold_in(jax.random.PRNGKey(config.seed), 0)
    bits = jnp.zeros((1, config.num_bits), jnp.float32)
    image = jnp.zeros((1, resolution, resolution, channels), jnp.float32)
    params = codec.init(key, bits, image)
    return {'step': jnp.int32(0), 'params': params, 'opt_state': make_optimizer(config).init(params),
            'l2_since': jnp.int32(-1)}


def per_sample_psnr(x, y):
    """(B, H, W, C) x2 in [0, 1] -> PSNR (B,) in dB (finite: MSE floored at 1e-12)."""
    mse = jnp.mean((x - y) ** 2, axis=(1, 2, 3))
    return 10.0 * jnp.log10(1.0 / jnp.maximum(mse, 1e-12))


def make_train_step(config, codec: WatermarkCodec) -> Callable:
    """Jitted ``step(state, images uint8 (B, H, W, C)) -> (state, metrics)``; metrics: loss, bce, mse, bit_acc,
    psnr (batch means, float32 scalars) and l2 (the weight used in this step). Bits come from
    ``fold_in(PRNGKey(seed) folded with 1, step)``."""
    optimizer = make_optimizer(config)
    base_key = jax.random.fold_in(jax.random.PRNGKey(config.seed), 1)
    l2_max, wait, ramp, start = float(config.l2_max), int(config.l2_wait), int(config.l2_ramp), float(config.l2_start_acc)

    def step(state, images):
        x = images.astype(jnp.float32) / 255.0
        key = jax.random.fold_in(base_key, state['step'])
        bits = jax.random.bernoulli(key, 0.5, (x.shape[0], config.num_bits)).astype(jnp.float32)
        weight = l2_weight(state['l2_since'], l2_max, wait, ramp)

        def loss_fn(params):
            watermarked, logits = codec.apply(params, bits, x)
            bce = optax.sigmoid_binary_cross_entropy(logits, bits).mean()
            mse = jnp.mean((watermarked - x) ** 2)
            return bce + weight * mse, (bce, mse, logits, watermarked)

        (loss, (bce, mse, logits, watermarked)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state['params'])
        updates, opt_state = optimizer.update(grads, state['opt_state'], state['params'])
        accuracy = jnp.mean((logits > 0) == (bits > 0.5))
        new_state = {'step': state['step'] + 1, 'params': optax.apply_updates(state['params'], updates),
                     'opt_state': opt_state, 'l2_since': update_ramp(state['l2_since'], accuracy, start)}
        metrics = {'loss': loss, 'bce': bce, 'mse': mse, 'bit_acc': accuracy,
                   'psnr': jnp.mean(per_sample_psnr(watermarked, x)), 'l2': weight}
        return new_state, metrics

    return jax.jit(step, donate_argnums=0)


# ----------------------------------------------------------------------------------------------- data

def load_images(data_config) -> tuple[np.ndarray, np.ndarray, Any]:
    """All images of ``make_source(data_config)`` in memory: (uint8 (N, R, R, C), labels int32 (N,), DatasetInfo).
    Labels are zeros when the data has none or ``use_labels`` is false."""
    from jaxdiff.data.sources import make_source  # pylint: disable=import-outside-toplevel
    source, info = make_source(data_config)
    inner = getattr(source, 'source', None)
    if hasattr(inner, 'images') and data_config.resolution in (0, info.resolution) and \
            inner.images.shape[1] == info.resolution:
        images = np.asarray(inner.images)  # array sources at native size: no per-item copies
        labels = np.asarray(inner.labels, np.int32) if info.num_classes else np.zeros(len(images), np.int32)
    else:
        items = [source[i] for i in range(len(source))]
        images = np.stack([item['image'] for item in items])
        labels = np.asarray([item['label'] for item in items], np.int32)
    return images, labels, info


def batch_indices(step: int, batch_size: int, size: int, seed: int) -> np.ndarray:
    """Indices of the images of ``step``: consecutive slices of per-epoch permutations drawn from (seed, epoch),
    so the order depends on the step alone (resume-exact)."""
    start = step * batch_size
    out = []
    while len(out) < batch_size:
        epoch, offset = divmod(start + len(out), size)
        perm = np.random.default_rng([int(seed), 0x0DA7A, epoch]).permutation(size)
        out.extend(perm[offset:offset + batch_size - len(out)].tolist())
    return np.asarray(out, np.int64)


# ----------------------------------------------------------------------------------------------- checkpoints

def save_checkpoint(workdir: str, state: dict) -> None:
    """Write ``state`` to ``workdir/checkpoint.msgpack`` atomically (the old file survives a crash mid-write)."""
    from flax import serialization  # pylint: disable=import-outside-toplevel
    files.write_bytes(os.path.join(workdir, CHECKPOINT_FILE), serialization.msgpack_serialize(
        serialization.to_state_dict(jax.device_get(state))))


def restore_checkpoint(workdir: str, template: dict) -> dict | None:
    """The state saved in ``workdir`` laid out like ``template``, or None if there is no checkpoint; ValueError
    (one line) for an unreadable file or one whose arrays do not fit the model of this config."""
    from flax import serialization  # pylint: disable=import-outside-toplevel
    path = os.path.join(workdir, CHECKPOINT_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path, 'rb') as f:
            raw = serialization.msgpack_restore(f.read())
        state = serialization.from_state_dict(template, raw)
    except Exception as e:  # msgpack / flax raise several types for damaged or mismatched files
        raise ValueError(f'{path} is unreadable or does not fit this config ({type(e).__name__}: '
                         f'{" ".join(str(e).split())[:200]}); move it away to start afresh') from e
    shapes = jax.tree.map(np.shape, template), jax.tree.map(np.shape, state)
    if shapes[0] != shapes[1]:
        raise ValueError(f'{path} holds arrays of other shapes than this config\'s codec; use a new --workdir')
    return jax.tree.map(jnp.asarray, state)


def read_run(workdir: str) -> tuple[ml_collections.ConfigDict, dict]:
    """(config, dataset info dict) of a codec run; FileNotFoundError / ValueError (one line) otherwise."""
    config_path, info_path = os.path.join(workdir, 'config.json'), os.path.join(workdir, INFO_FILE)
    if not os.path.isdir(workdir):
        raise FileNotFoundError(f'codec run not found: {workdir!r}; train one with python watermark.py train_codec '
                                '--config configs/watermark/digits.py --workdir RUN')
    for path in (config_path, info_path, os.path.join(workdir, CHECKPOINT_FILE)):
        if not os.path.isfile(path):
            raise FileNotFoundError(f'{workdir} is not a finished codec run (no {os.path.basename(path)}); train it '
                                    'with python watermark.py train_codec --workdir ' + workdir)
    try:
        with open(config_path) as f:
            config = config_from_dict(json.load(f))
        with open(info_path) as f:
            info = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f'{workdir}: unreadable run files ({" ".join(str(e).split())[:200]})') from e
    return config, info


def load_codec(workdir: str) -> tuple[WatermarkCodec, Any, ml_collections.ConfigDict, dict]:
    """(codec, params, config, info) of a trained codec run (the newest checkpoint's params)."""
    config, info = read_run(workdir)
    codec = codec_from_config(config)
    template = jax.eval_shape(lambda: init_state(config, codec, info['resolution'], info['channels']))
    template = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), template)
    state = restore_checkpoint(workdir, template)
    return codec, state['params'], config, info


# ----------------------------------------------------------------------------------------------- loop

def _eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f'{seconds // 3600}h{seconds % 3600 // 60:02d}m' if seconds >= 3600 else f'{seconds // 60}m{seconds % 60:02d}s'


def train(config, workdir: str, *, allow_config_change: bool = False, print_fn: Callable = print,
          max_steps: int | None = None) -> dict:
    """Train (or resume) the codec of ``config`` in ``workdir``. ``max_steps``: stop after this many steps of this
    call (tests). Returns {'step', 'resumed_from', 'bit_acc', 'psnr', 'l2', 'seconds'} (last step's metrics).

    Raises ValueError / FileNotFoundError (config, data, damaged checkpoint, NaN loss) with one-line messages;
    the NaN case keeps the last checkpoint untouched.
    """
    from jaxdiff.train import checkpoint as ckpt  # pylint: disable=import-outside-toplevel
    from jaxdiff.train.signals import StopSignal  # pylint: disable=import-outside-toplevel

    check_config(config)
    images, _, info = load_images(config.data)
    ckpt.check_config(workdir, config, allow_config_change)
    files.write_json(os.path.join(workdir, INFO_FILE), {'resolution': info.resolution, 'channels': info.channels,
                                                        'size': info.size, 'num_classes': info.num_classes})
    codec = codec_from_config(config)
    state = init_state(config, codec, info.resolution, info.channels)
    restored = restore_checkpoint(workdir, state)
    resumed_from = None
    if restored is not None:
        state, resumed_from = restored, int(restored['step'])
        print_fn(f'resuming from step {resumed_from} ({os.path.join(workdir, CHECKPOINT_FILE)})')
    step_fn = make_train_step(config, codec)
    total = int(config.total_steps)
    step = int(state['step'])
    end = total if max_steps is None else min(total, step + max_steps)
    metrics_host: dict = {}
    start_time, start_step, last_saved = time.time(), step, step
    with StopSignal() as stop:
        while step < end:
            batch = images[batch_indices(step, config.batch_size, len(images), config.seed)]
            state, metrics = step_fn(state, batch)
            step += 1
            metrics_host = {k: float(v) for k, v in jax.device_get(metrics).items()}
            if not math.isfinite(metrics_host['loss']):
                raise ValueError(
                    f'loss became {metrics_host["loss"]} at step {step} (bit acc {metrics_host["bit_acc"]:.3f}, l2 '
                    f'weight {metrics_host["l2"]:.3g}); stopped without saving, the checkpoint of step {last_saved} '
                    'is kept: lower config.lr or config.l2_max and rerun')
            if step % config.log_every == 0 or step == end:
                rate = (step - start_step) / max(time.time() - start_time, 1e-9)
                print_fn(f'step {step}/{total}  loss {metrics_host["loss"]:.4f}  bit_acc {metrics_host["bit_acc"]:.4f}'
                         f'  psnr {metrics_host["psnr"]:.2f} dB  l2 {metrics_host["l2"]:.3g}  {rate:.1f} steps/s'
                         f'  ETA {_eta((total - step) / max(rate, 1e-9))}')
                with open(os.path.join(workdir, METRICS_FILE), 'a') as f:
                    f.write(json.dumps({'step': step, **metrics_host}) + '\n')
            stopping = stop.received is not None
            if step % config.checkpoint_every == 0 or step == end or stopping:
                save_checkpoint(workdir, state)
                last_saved = step
            if stopping:
                print_fn(f'stopped by signal at step {step}; rerun the same command to resume')
                break
    return {'step': step, 'resumed_from': resumed_from, 'seconds': time.time() - start_time,
            **{k: metrics_host.get(k) for k in ('bit_acc', 'psnr', 'l2', 'loss')}}
