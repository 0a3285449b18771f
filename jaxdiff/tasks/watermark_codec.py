"""Task ``watermark_codec``: the watermark encoder / decoder of Zhao et al. (2023), trained by the engine.

    python train.py --config configs/watermark/digits.py --workdir runs/wm_digits        # rerun to resume
    python watermark.py train_codec --config configs/watermark/digits.py --workdir runs/wm_digits   # the same

Loss per step: BCE-with-logits(dec(enc(bits, x)), bits) + l2 * MSE(enc(bits, x), x), with fresh random bits per
image and step. The weight ``l2`` is 0 until the batch bit accuracy first exceeds ``l2_start_acc``; then it waits
``l2_wait`` steps and ramps linearly over ``l2_ramp`` steps to ``l2_max`` (:func:`l2_weight`,
:func:`update_ramp`). The ramp counter is training state and is checkpointed.

State: the dict {'step', 'params' (the codec's variables {'params': ...}), 'opt_state' (Adam), 'l2_since' (the
ramp counter)}. Data: step-indexed (:func:`batch_indices`: consecutive slices of per-epoch permutations of (seed,
epoch)), each process reading its rows of the global batch from the random-access source.

Random keys are those of the codec's first trainer, not the engine's :class:`~jaxdiff.engine.task.RunKeys`, so
runs repeat its numbers bitwise: params from ``fold_in(PRNGKey(seed), 0)``, the bits of step s from
``fold_in(fold_in(PRNGKey(seed), 1), s)``. Both depend on (seed, step) alone, so a resumed run repeats the
uninterrupted one.

Outputs in the workdir: ``checkpoints/<step>/`` (the engine's orbax checkpoints of that state), ``config.json``,
``dataset_info.json``, ``metrics.jsonl`` (loss, bce, mse, bit_acc, psnr averaged over each logged interval; l2 the
weight of the interval's last step) and ``tb/``. Load a trained codec with :func:`load_codec` (through
:func:`jaxdiff.runs.load_run`).
"""
from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from jaxdiff import config_ranges as ranges
from jaxdiff import parallel
from jaxdiff.engine.task import RunKeys, Setup, Task
from jaxdiff.watermark.codec import WatermarkCodec, codec_from_config

TRAIN_HINT = 'python train.py --config configs/watermark/digits.py --workdir RUN'


# ----------------------------------------------------------------------------------------------- config

def codec_config() -> ml_collections.ConfigDict:
    """Every watermark-codec field with its default (the paper's CIFAR-10 settings where it has one)."""
    c = ml_collections.ConfigDict()
    c.task = 'watermark_codec'      # the watermark encoder / decoder (jaxdiff.tasks.watermark_codec)
    c.seed = 0                      # PRNG seed for init, data order and the random training bits
    c.num_bits = 64                 # bits in the watermark string (paper: 64)
    c.batch_size = 64               # global batch: images per step (paper: 64)
    c.total_steps = 100_000         # optimizer steps (paper CIFAR-10: 100 epochs of 782 steps)
    c.l2_max = 10.0                 # final weight of the image MSE term (paper: 10)
    c.l2_wait = 1_000               # steps at l2 = 0 after the bit accuracy first exceeds l2_start_acc (paper: 1000)
    c.l2_ramp = 3_000               # steps of the linear ramp from 0 to l2_max (paper: 3000)
    c.l2_start_acc = 0.9            # batch bit accuracy that starts the wait-then-ramp schedule (paper: 0.9)
    c.log_every = 500               # steps between progress lines (and metrics.jsonl rows)
    c.checkpoint_every = 5_000      # steps between checkpoints (also saved at the end and on SIGTERM/SIGINT)
    c.keep_checkpoints = 2          # recent checkpoints kept

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 1e-4               # Adam learning rate (paper: 1e-4)

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


def check(config) -> None:
    """One clear ValueError for values no run can use."""
    extra = sorted(set(config.keys()) - set(codec_config().keys()))
    if extra:
        raise ValueError(f'config has field(s) {extra} that task=watermark_codec does not use; start the config from '
                         'jaxdiff.tasks.watermark_codec.codec_config()')
    for name in ('num_bits', 'batch_size', 'total_steps'):
        if int(config[name]) <= 0:
            raise ValueError(f'config.{name}={config[name]} must be positive')
    for name in ('l2_wait', 'l2_ramp'):
        if int(config[name]) < 0:
            raise ValueError(f'config.{name}={config[name]} must be >= 0')
    if not config.optim.lr > 0 or not config.l2_max >= 0:
        raise ValueError(f'config.optim.lr={config.optim.lr} must be > 0 and config.l2_max={config.l2_max} >= 0')
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
    to ``l2_max`` one step after the wait. Works on Python numbers and (traced) int32 () arrays."""
    frac = (since - wait) / max(ramp, 1)
    if isinstance(since, (int, float)):
        return float(min(max(l2_max * frac, 0.0), l2_max))
    return jnp.clip(l2_max * frac, 0.0, l2_max)


def update_ramp(since, accuracy, start_acc: float):
    """The ramp counter after a step with batch bit accuracy ``accuracy``: -1 stays -1 until accuracy >
    ``start_acc`` (then 0); once started it counts up by one per step. Python numbers or (traced) () arrays."""
    if isinstance(since, (int, float)) and isinstance(accuracy, (int, float)):
        return (0 if accuracy > start_acc else -1) if since < 0 else since + 1
    return jnp.where(since < 0, jnp.where(accuracy > start_acc, 0, -1), since + 1).astype(jnp.int32)


def per_sample_psnr(x, y):
    """(B, H, W, C) x2 in [0, 1] -> PSNR (B,) in dB (finite: MSE floored at 1e-12)."""
    mse = jnp.mean((x - y) ** 2, axis=(1, 2, 3))
    return 10.0 * jnp.log10(1.0 / jnp.maximum(mse, 1e-12))


# ----------------------------------------------------------------------------------------------- state, step

def make_optimizer(config) -> optax.GradientTransformation:
    """Adam at ``config.optim.lr`` (the paper's optimizer)."""
    return optax.adam(config.optim.lr)


def init_state(config, codec: WatermarkCodec, info, key: jax.Array = None) -> dict:
    """Fresh state {'step' int32 (), 'params' {'params': ...}, 'opt_state', 'l2_since' int32 () -1} for images
    (info.resolution, info.resolution, info.channels). ``key`` (the engine's) is unused: params come from
    ``fold_in(PRNGKey(seed), 0)`` (module docstring)."""
    del key
    init_key = jax.random.fold_in(jax.random.PRNGKey(config.seed), 0)
    bits = jnp.zeros((1, config.num_bits), jnp.float32)
    image = jnp.zeros((1, info.resolution, info.resolution, info.channels), jnp.float32)
    params = codec.init(init_key, bits, image)
    return {'step': jnp.int32(0), 'params': params, 'opt_state': make_optimizer(config).init(params),
            'l2_since': jnp.int32(-1)}


def train_step(config, codec: WatermarkCodec, state: dict, batch: dict, key: jax.Array = None) -> tuple[dict, dict]:
    """One Adam step (unjitted) on ``batch['image']`` uint8 (B, H, W, C). Returns the new state and float32 ()
    metrics: loss, bce, mse, bit_acc, psnr (batch means) and l2 (the weight used in this step). ``key`` (the
    engine's) is unused: the bits come from ``fold_in(fold_in(PRNGKey(seed), 1), step)`` (module docstring)."""
    del key
    x = batch['image'].astype(jnp.float32) / 255.0
    bits_key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(config.seed), 1), state['step'])
    bits = jax.random.bernoulli(bits_key, 0.5, (x.shape[0], config.num_bits)).astype(jnp.float32)
    weight = l2_weight(state['l2_since'], float(config.l2_max), int(config.l2_wait), int(config.l2_ramp))

    def loss_fn(params):
        watermarked, logits = codec.apply(params, bits, x)
        bce = optax.sigmoid_binary_cross_entropy(logits, bits).mean()
        mse = jnp.mean((watermarked - x) ** 2)
        return bce + weight * mse, (bce, mse, logits, watermarked)

    (loss, (bce, mse, logits, watermarked)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state['params'])
    updates, opt_state = make_optimizer(config).update(grads, state['opt_state'], state['params'])
    accuracy = jnp.mean((logits > 0) == (bits > 0.5))
    new_state = {'step': state['step'] + 1, 'params': optax.apply_updates(state['params'], updates),
                 'opt_state': opt_state,
                 'l2_since': update_ramp(state['l2_since'], accuracy, float(config.l2_start_acc))}
    metrics = {'loss': loss, 'bce': bce, 'mse': mse, 'bit_acc': accuracy,
               'psnr': jnp.mean(per_sample_psnr(watermarked, x)), 'l2': weight}
    return new_state, metrics


# ----------------------------------------------------------------------------------------------- data

def batch_indices(step: int, batch_size: int, size: int, seed: int) -> np.ndarray:
    """int64 (batch_size,) indices of the global batch of ``step``: consecutive slices of per-epoch permutations
    drawn from (seed, epoch), so the order depends on the step alone (resume-exact)."""
    start = step * batch_size
    out = []
    while len(out) < batch_size:
        epoch, offset = divmod(start + len(out), size)
        perm = np.random.default_rng([int(seed), 0x0DA7A, epoch]).permutation(size)
        out.extend(perm[offset:offset + batch_size - len(out)].tolist())
    return np.asarray(out, np.int64)


class CodecBatches:
    """The engine's Batches over a random-access source: ``batch(step)`` -> {'image': uint8 (B / P, R, R, C)}, this
    process's rows [p B / P, (p + 1) B / P) of :func:`batch_indices`. The state records the position and the data
    size (a resume on data of another size warns: its order differs)."""

    def __init__(self, source, batch_size: int, seed: int):
        self.source, self.batch_size, self.seed = source, batch_size, seed
        self.rows = parallel.host_rows(batch_size)
        self.position = 0

    def batch(self, step: int) -> dict[str, np.ndarray]:
        indices = batch_indices(step, self.batch_size, len(self.source), self.seed)[self.rows]
        self.position = step + 1
        return {'image': np.stack([self.source[int(i)]['image'] for i in indices])}

    def get_state(self) -> dict:
        return {'step': self.position, 'size': len(self.source)}

    def set_state(self, state: dict) -> str:
        self.position = int(state.get('step', 0))
        if state.get('size') != len(self.source):
            logging.warning('the data have %d images, the checkpoint\'s %s', len(self.source), state.get('size'))
            return (f'warning: the data have {len(self.source)} images, the checkpoint\'s {state.get("size")}: the '
                    'batch order differs from the uninterrupted run')
        return ''


# ----------------------------------------------------------------------------------------------- loading

def load_codec(workdir: str):
    """A trained codec run as :class:`jaxdiff.runs.Run` (net: the WatermarkCodec, variables: its params of the
    newest usable checkpoint, info: the DatasetInfo it was trained on). FileNotFoundError / ValueError (one line)
    for a missing directory or a run of another task."""
    from jaxdiff.runs import load_run  # pylint: disable=import-outside-toplevel
    if not os.path.isdir(workdir):
        raise FileNotFoundError(f'codec run not found: {workdir!r}; train one with {TRAIN_HINT}')
    return load_run(workdir, want=TASK.name)


# ----------------------------------------------------------------------------------------------- task

def setup(config, workdir: str, mesh, keys: RunKeys) -> Setup:
    """Codec, state, step-indexed data; no callbacks (bit accuracy and PSNR are step metrics)."""
    from jaxdiff.data.sources import make_source  # pylint: disable=import-outside-toplevel
    del workdir, mesh, keys  # the codec keeps its own keys (module docstring)
    source, info = make_source(config.data)
    codec = codec_from_config(config)
    describe = [f'WatermarkCodec ({config.num_bits} bits) on {config.data.source} {info.resolution}x'
                f'{info.resolution}x{info.channels}, {info.size} images']
    return Setup(init=functools.partial(init_state, config, codec, info),
                 step=functools.partial(train_step, config, codec),
                 data=CodecBatches(source, config.batch_size, config.seed), batch_size=config.batch_size,
                 total_steps=config.total_steps, describe=describe,
                 progress=dict(bit_acc='.4f', psnr='.2f', l2='.3g'), last=('l2',), nan_policy='raise',
                 info=info)



# The valid values of every field of :func:`codec_config` (checked before any work: jaxdiff.config_ranges).
RANGES: dict[str, ranges.Rule] = {
    **ranges.COMMON, **ranges.DATA,
    'task': ranges.one_of('watermark_codec'), 'num_bits': ranges.COUNT, 'l2_max': ranges.NON_NEGATIVE,
    'l2_wait': ranges.at_least(0, integer=True), 'l2_ramp': ranges.at_least(0, integer=True),
    'l2_start_acc': ranges.FRACTION, 'data.use_labels': ranges.BOOL,
    'model.encoder_widths': ranges.integers(1), 'model.decoder_widths': ranges.integers(1),
    'model.decoder_strides': ranges.integers(1), 'model.decoder_hidden': ranges.COUNT,
}
TASK = Task('watermark_codec', codec_config, check, setup, ranges=RANGES, kind='watermark codec',
            use='watermark a dataset with it: python watermark.py embed --codec {dir} --out DIR',
            configs='configs/watermark/*.py')
