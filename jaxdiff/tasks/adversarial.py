"""Adversarial training with generated data (TRADES / PGD-AT, Wang et al. 2023), launched by train.py:

    python train.py --config configs/robust/digits.py --workdir runs/robust_digits   # rerun to resume

``config.task == 'adversarial'`` makes train.py run :data:`TASK` through the engine. Fields and defaults:
:func:`adversarial_config` (configs/robust/*.py override them); runs saved with the older field names resume and
load unchanged (:func:`upgrade`). The step is :mod:`jaxdiff.robust.adv_step`, the
data :mod:`jaxdiff.robust.mixed_data`.

Epoch: ceil(N_real_train / batch_size) steps, N_real_train the whole real training set before the held-out slice is
cut, however much generated data is mixed in (DM-Improves-AT's dataset_size; :func:`run_lengths`). The one-cycle
schedule (stepped per epoch, pct_start of the epochs) and the EMA warm-up (:func:`ema_warmup_steps`) count these
epochs: CIFAR-10 with 1M generated images at batch 512 is 98 steps/epoch, 400 epochs = 39,200 steps, peak lr in
epoch 10 (steps 882-979, 0-based) and the EMA averaging from update 980 (1-based) on.

Outputs in the workdir: ``checkpoints/<step>/`` (the engine's orbax checkpoints: step, params, ema, opt_state
{'momentum'}, buffers (BatchNorm statistics), nonfinite, plus the data-stream state and the config), ``best/checkpoints/<step>/`` (the same, of the evaluation with the highest PGD accuracy of the EMA model
on the held-out slice; ties go to the later one, as the reference's ``>=``) with ``best/best.json`` {step,
clean_acc, pgd_acc}, ``config.json``, ``dataset_info.json``, ``metrics.jsonl`` (one row per logged step:
loss, ce, kl, clean_acc, adv_acc (training batch, training-mode BN), lr, momentum, ema_decay, grad_norm, epoch,
img_per_s, and at evaluation steps eval_clean_acc, eval_pgd_acc, best_pgd_acc, best_step) and ``tb/``.

Load a trained model: ``jaxdiff.runs.load_run(workdir, checkpoint='best')``.
"""
from __future__ import annotations

import copy
import functools
import json
import math
import os
from typing import Optional

import jax
import ml_collections
import numpy as np
from absl import logging

from jaxdiff import config_ranges as ranges
from jaxdiff import files, parallel
from jaxdiff.engine import checkpoint as ckpt
from jaxdiff.engine.ema import decay_per_step
from jaxdiff.engine.loop import run_keys
from jaxdiff.engine.task import Callback, RunKeys, Setup, Task
from jaxdiff.robust import adv_step, mixed_data

BEST_DIR = 'best'
BEST_FILE = 'best.json'


def adversarial_config() -> ml_collections.ConfigDict:
    """Every field of an adversarial-training config, with the CIFAR-10 recipe of Wang et al. (2023) as defaults."""
    c = ml_collections.ConfigDict()
    c.task = 'adversarial'          # adversarial training (jaxdiff.tasks.adversarial)
    c.seed = 0                      # PRNG seed: init, data order, augmentation, attacks
    c.method = 'trades'             # trades | pgd_at (Madry et al.: CE on PGD(CE) examples)
    c.beta = 5.0                    # TRADES weight of KL(f(x) || f(x_adv))
    c.label_smoothing = 0.1         # label smoothing of the CE term (reference --ls 0.1)
    c.norm = 'Linf'                 # threat model: Linf | L2
    c.eps = 8 / 255                 # attack radius in [0, 1] pixel units
    c.attack_step = 2 / 255         # PGD step size (training and evaluation attacks)
    c.attack_steps = 10             # PGD steps of the training attack
    c.batch_size = 512              # global batch (real + generated), divisible by the device count
    c.generated_fraction = 0.7      # fraction of every batch from data.generated (floor(B * f)); 0 = real only
    c.epochs = 400                  # epochs of ceil(N_real_train / batch_size) steps (whole real train set, slice
                                    # included; generated data not counted: the reference's dataset_size)
    c.total_steps = 0               # optimizer steps (0 = epochs * steps per epoch)
    c.checkpoint_every = 2_000      # steps between checkpoints (also at the end and on SIGTERM/SIGINT)
    c.keep_checkpoints = 2          # recent checkpoints kept (best/ is kept separately)
    c.log_every = 100               # steps between progress lines / metrics.jsonl rows

    c.data = ml_collections.ConfigDict()
    c.data.source = 'tfds'          # real data: digits | fashion_mnist | npz | folder | array_record | tfds
    c.data.path = ''                # file or folder for npz / folder / array_record / fashion_mnist ('' = Debian's)
    c.data.tfds_name = 'cifar10'    # TFDS dataset name (source=tfds)
    c.data.split = 'train'          # split of the real training data (its first eval.size examples are held out)
    c.data.resolution = 0           # image side after padding/upsampling (0 = native)
    c.data.generated = ''           # sample.py output folder (class-conditional; filter it first with filter.py)
    c.data.crop_padding = 4         # random crop after zero-padding this many pixels (0 = off; reference: 4)
    c.data.xflip = True             # random horizontal flips, p = 1/2 per image (reference: on for CIFAR)

    c.model = ml_collections.ConfigDict()
    c.model.arch = 'wrn'            # wrn | preact_resnet18
    c.model.depth = 28              # WideResNet depth (6n + 4)
    c.model.width = 10              # WideResNet width factor
    c.model.activation = 'swish'    # relu | swish
    c.model.dataset_stats = 'cifar10'  # input standardisation by wide_resnet.dataset_stats(name) ('' = none)
    c.model.bn_momentum = 0.01      # BatchNorm running-stat momentum, PyTorch convention (reference: 0.01)
    c.model.bn_reset_first_step = True  # first step sets the running stats to the batch stats (reference)
    c.model.dtype = 'float32'       # compute dtype: float32 | bfloat16 (params stay float32)

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 0.2                # peak learning rate of the one-cycle schedule
    c.optim.momentum = 0.9          # SGD momentum (used when cycle_momentum is False)
    c.optim.nesterov = True         # Nesterov momentum
    c.optim.weight_decay = 5e-4     # coupled L2 weight decay (torch SGD); none on 'batchnorm*' params
    c.optim.no_decay_bn = True      # skip weight decay on params of modules named batchnorm* (reference)
    c.optim.pct_start = 0.025       # fraction of the schedule spent warming up (OneCycleLR pct_start)
    c.optim.div_factor = 25.0       # initial lr = lr / div_factor (OneCycleLR default)
    c.optim.final_div_factor = 1e4  # final lr = initial lr / final_div_factor (OneCycleLR default)
    c.optim.cycle_momentum = True   # cycle momentum max->base->max as torch OneCycleLR does by default (reference)
    c.optim.base_momentum = 0.85    # momentum at the lr peak (cycle_momentum)
    c.optim.max_momentum = 0.95     # momentum at the start and end (cycle_momentum)
    c.optim.per_epoch = True        # step the schedule once per epoch (reference 'cosinew'); False = every step

    c.ema = ml_collections.ConfigDict()
    c.ema.halflife_img = 70_801.0   # EMA half-life in images: per-update decay tau = 0.5 ** (batch_size / this)
                                    # (reference --tau 0.995 at batch 512: 512 ln 0.5 / ln 0.995 = 70,800.7)
    c.ema.warmup_steps = -1         # EMA copies the params before this step (-1 = reference rule, see trainer)

    c.eval = ml_collections.ConfigDict()
    c.eval.size = 1024              # held-out slice: the first N real training examples (0 = no evaluation)
    c.eval.every = 0                # steps between evaluations of the EMA model (0 = once per epoch)
    c.eval.batch_size = 512         # evaluation batch, divisible by the device count
    c.eval.attack_steps = 40        # PGD steps of the selection attack (reference: 4 * attack_steps)
    c.eval.attack_loss = 'cw'       # cw (reference's CWLoss margin) | ce
    return c


# The valid values of every field of :func:`adversarial_config` (checked before any work: jaxdiff.config_ranges).
RANGES: dict[str, ranges.Rule] = {
    **ranges.COMMON, **ranges.DATA,
    'task': ranges.one_of('adversarial'), 'method': ranges.one_of(*adv_step.METHODS), 'beta': ranges.NON_NEGATIVE,
    'label_smoothing': ranges.between(0, 1, open_hi=True), 'norm': ranges.one_of('Linf', 'L2'),
    'eps': ranges.POSITIVE, 'attack_step': ranges.POSITIVE, 'attack_steps': ranges.COUNT,
    'generated_fraction': ranges.between(0, 1, open_hi=True), 'epochs': ranges.at_least(0, integer=True),
    'data.generated': ranges.TEXT, 'data.crop_padding': ranges.at_least(0, integer=True), 'data.xflip': ranges.BOOL,
    'model.arch': ranges.one_of(*adv_step.ARCHS), 'model.depth': ranges.COUNT, 'model.width': ranges.COUNT,
    'model.activation': ranges.one_of('relu', 'swish'), 'model.dataset_stats': ranges.TEXT,
    'model.bn_momentum': ranges.FRACTION, 'model.bn_reset_first_step': ranges.BOOL,
    'model.dtype': ranges.one_of('float32', 'bfloat16'),
    'optim.momentum': ranges.between(0, 1, open_hi=True), 'optim.nesterov': ranges.BOOL,
    'optim.weight_decay': ranges.NON_NEGATIVE, 'optim.no_decay_bn': ranges.BOOL, 'optim.pct_start': ranges.FRACTION,
    'optim.div_factor': ranges.POSITIVE, 'optim.final_div_factor': ranges.POSITIVE, 'optim.cycle_momentum': ranges.BOOL,
    'optim.base_momentum': ranges.between(0, 1, open_hi=True), 'optim.max_momentum': ranges.between(0, 1, open_hi=True),
    'optim.per_epoch': ranges.BOOL, 'ema.halflife_img': ranges.NON_NEGATIVE,
    'ema.warmup_steps': ranges.Rule(lambda v: ranges.SEED.ok(v) and v >= -1,
                                    'an integer >= -1 (-1: the reference rule)'),
    'eval.size': ranges.at_least(0, integer=True), 'eval.every': ranges.at_least(0, integer=True),
    'eval.batch_size': ranges.COUNT, 'eval.attack_steps': ranges.COUNT, 'eval.attack_loss': ranges.one_of('cw', 'ce'),
}


def locked(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The config locked against unknown keys."""
    c.lock()
    return c


# ------------------------------------------------------------------------------------------------------ config

def check_config(config) -> None:
    """One clear error for an adversarial config no run can use."""
    known = set(adversarial_config().keys())
    extra = sorted(set(config.keys()) - known)
    if extra:
        raise ValueError(f'config has field(s) {extra} that task=adversarial does not use; start the config from '
                         'jaxdiff.tasks.adversarial.adversarial_config()')
    ranges.check(config, RANGES)  # each field's valid values; what follows ties fields together
    rules = [
        (config.generated_fraction == 0 or config.data.generated,
         f'config.generated_fraction={config.generated_fraction} but data.generated is empty: set '
         '--config.data.generated=DIR (a sample.py folder) or --config.generated_fraction=0'),
        (config.epochs > 0 or config.total_steps > 0, 'set config.epochs or config.total_steps'),
    ]
    for ok, message in rules:
        if not ok:
            raise ValueError(message)
    n_real, _ = mixed_data.split_counts(config.batch_size, config.generated_fraction)
    if n_real < 1:
        raise ValueError(f'batch_size={config.batch_size} with generated_fraction={config.generated_fraction} '
                         'leaves no real example per batch')
    for name, value in (('batch_size', config.batch_size), ('eval.batch_size', config.eval.batch_size)):
        if value % jax.device_count():
            raise ValueError(f'config.{name}={value} must be divisible by the {jax.device_count()} devices')


def halflife_of_tau(tau: float, batch_size: int) -> float:
    """The EMA half-life in images of a per-update decay ``tau`` at ``batch_size``: batch_size ln 0.5 / ln tau, to
    the fewest decimals that give the same float32 tau back (0.995 at 512 -> 70,801; 0.99 at 128 -> 8,827.85)."""
    if tau <= 0:
        return 0.0
    exact = batch_size * math.log(0.5) / math.log(tau)
    for decimals in range(8):
        if np.float32(decay_per_step(round(exact, decimals), batch_size)) == np.float32(tau):
            return round(exact, decimals)
    return exact


def upgrade(saved: dict) -> dict:
    """A saved config.json in today's field names (the vocabulary every task shares): ``data.real.*`` ->
    ``data.*``, ``data.hflip`` -> ``data.xflip``, ``ema.decay`` (the reference's per-update tau) ->
    ``ema.halflife_img`` (:func:`halflife_of_tau`, the same float32 decay). Fields already current are kept."""
    out = copy.deepcopy(saved)
    data, ema = out.get('data', {}), out.get('ema', {})
    data.update(data.pop('real', {}))
    if 'hflip' in data:
        data['xflip'] = data.pop('hflip')
    if 'decay' in ema:
        ema['halflife_img'] = halflife_of_tau(float(ema.pop('decay')), int(out['batch_size']))
    return out


def ema_warmup_steps(config, n_real_total: int) -> float:
    """config.ema.warmup_steps, or the reference's rule pct_start * epochs * (floor(n_real_total / B) + 1), with
    n_real_total the whole real training set (before the held-out slice is cut).

    The reference (gowal21uncovering/utils/watrain.py, ``WATrainer.__init__``): ``update_steps =
    int(np.floor(num_samples / batch_size) + 1)`` with num_samples = 50,000 for CIFAR, and ``warmup_steps = 0.025 *
    num_adv_epochs * update_steps`` -> 0.025 * 400 * 98 = 980 at batch 512; its ``ema_update`` averages from the
    update whose 1-based count reaches it (:func:`jaxdiff.robust.adv_step.ema_decay`). The reference writes 0.025;
    here it is ``optim.pct_start`` (0.025 in the CIFAR-10 recipe), so the EMA starts averaging at the last step of
    the one-cycle warm-up (the epoch at the peak lr). floor(N / B) + 1 equals the epoch length ceil(N / B) unless B
    divides N."""
    if config.ema.warmup_steps >= 0:
        return float(config.ema.warmup_steps)
    return config.optim.pct_start * config.epochs * (math.floor(n_real_total / config.batch_size) + 1)


def selection_accuracy(config, net, variables: dict, data) -> tuple[float, float]:
    """(clean, PGD) accuracy of ``variables`` ({'params', 'batch_stats'}) on the run's held-out slice
    ``data.eval_images`` / ``eval_labels`` (:func:`jaxdiff.robust.mixed_data.load`) with the run's selection attack
    and eval key (the engine's extra key), in ``eval.batch_size`` batches on one device: the numbers training's keep-best records
    (``best/best.json``) for the checkpoint it saved."""
    mesh = parallel.make_mesh(1)
    k_eval = run_keys(int(config.seed), mesh).extra
    return adv_step.evaluate(adv_step.jit_eval(config, net, mesh), variables['params'], variables['batch_stats'],
                             data.eval_images, data.eval_labels, config.eval.batch_size, mesh, k_eval)


def run_lengths(config, n_real_train: int) -> dict:
    """The step counts of a run on a real training set of ``n_real_train`` examples (the whole set, held-out slice
    included; generated data never count): {'steps_per_epoch': ceil(n_real_train / B), 'total_steps':
    config.total_steps or epochs * steps_per_epoch, 'ema_warmup_steps': :func:`ema_warmup_steps`, 'eval_every':
    eval.every or steps_per_epoch}. CIFAR-10 recipe (configs/robust/cifar10.py): 98, 39,200, 980.0, 98."""
    spe = mixed_data.steps_per_epoch(config.batch_size, n_real_train)
    return dict(steps_per_epoch=spe, total_steps=int(config.total_steps) or int(config.epochs) * spe,
                ema_warmup_steps=ema_warmup_steps(config, n_real_train), eval_every=int(config.eval.every) or spe)


# ------------------------------------------------------------------------------------------------------ task

def read_best(workdir: str) -> Optional[dict]:
    """``workdir/best/best.json`` ({step, clean_acc, pgd_acc, ...}) or None."""
    path = os.path.join(workdir, BEST_DIR, BEST_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


class StreamBatches:
    """:class:`jaxdiff.robust.mixed_data.MixedBatches` as the engine's Batches: this process's rows of the global
    batch of each step (real + generated, step-indexed: the order depends on (seed, step, data) alone)."""

    def __init__(self, batches: mixed_data.MixedBatches, batch_size: int):
        self.batches, self.rows = batches, parallel.host_rows(batch_size)
        self.position = 0

    def batch(self, step: int) -> dict:
        host = self.batches.batch(step, self.rows)
        host.pop('generated')
        self.position = step + 1
        return host

    def get_state(self) -> dict:
        return self.batches.state(self.position)

    def set_state(self, state: dict) -> str:
        now = self.batches.state(int(state.get('step', 0)))
        if any(state.get(k) != now[k] for k in ('n_real', 'n_generated', 'n_real_per_batch')):
            logging.warning('the data differ from the checkpoint\'s (%s vs %s): the batch order differs from the '
                            'uninterrupted run', state, now)
            return 'warning: the data differ from the checkpoint\'s: the batch order differs from the uninterrupted run'
        return ''


def keep_best(config, workdir: str, net, data: mixed_data.AdvData, stream: StreamBatches, mesh, key: jax.Array,
              every: int) -> tuple[Callback, dict]:
    """Every ``eval_every`` steps (and at the end): clean and PGD accuracy of the EMA model on the held-out slice
    (:func:`selection_accuracy`'s attack and key); the best (ties to the later, as the reference's ``>=``) is saved
    to ``best/`` with ``best/best.json``. Returns (the callback, {'value': the best.json dict or None})."""
    eval_fn = adv_step.jit_eval(config, net, mesh)
    best_ckpt = ckpt.Checkpointer(os.path.join(workdir, BEST_DIR), 1, use_async=False)
    best = {'value': read_best(workdir)}

    def evaluate(step: int, state) -> dict:
        clean, robust = adv_step.evaluate(eval_fn, state.ema, state.buffers, data.eval_images, data.eval_labels,
                                          config.eval.batch_size, mesh, key)
        if best['value'] is None or robust >= best['value']['pgd_acc']:
            best['value'] = dict(step=step, clean_acc=clean, pgd_acc=robust, eval_size=len(data.eval_labels),
                                 attack=f'PGD-{config.eval.attack_steps} ({config.eval.attack_loss}) eps '
                                        f'{config.eps:.6g} {config.norm}')
            best_ckpt.save(state, {'process_count': jax.process_count(),
                                   'states': [stream.batches.state(step)] * jax.process_count()}, config)
            best_ckpt.close()
            if jax.process_index() == 0:
                files.write_json(os.path.join(workdir, BEST_DIR, BEST_FILE), best['value'])
        return dict(eval_clean_acc=clean, eval_pgd_acc=robust, best_pgd_acc=best['value']['pgd_acc'],
                    best_step=best['value']['step'])

    return Callback('keep_best', every, evaluate), best


def report_best(workdir: str, best: dict, total_steps: int, state) -> dict:
    """The run's summary entry {'best': best.json dict or None}; a finished run also prints the keep-best line."""
    value = best['value']
    if value and jax.process_index() == 0 and int(jax.device_get(state.step)) >= total_steps:
        print(f'best PGD accuracy {value["pgd_acc"]:.4f} (clean {value["clean_acc"]:.4f}) at step {value["step"]} in '
              f'{os.path.join(workdir, BEST_DIR)}', flush=True)
    return dict(best=value)


def setup(config, workdir: str, mesh, keys: RunKeys) -> Setup:
    """Data (real + generated stream), net, state, step with its schedule lengths, keep-best callback."""
    data = mixed_data.load(config)
    batches = mixed_data.MixedBatches(data, config.batch_size, config.generated_fraction, config.seed)
    lengths = run_lengths(config, mixed_data.real_train_size(data))
    spe, total_steps = lengths['steps_per_epoch'], lengths['total_steps']
    net = adv_step.build_net(config, data.info)
    image_shape = data.real_images.shape[1:]
    stream = StreamBatches(batches, config.batch_size)
    n_gen = 0 if data.gen_labels is None else len(data.gen_labels)
    describe = [f'{type(net).__name__} ({config.model.arch}) {config.method} eps={config.eps:.4g} {config.norm} on '
                f'{config.data.source} {image_shape}, {data.info.num_classes} classes: '
                f'{len(data.real_labels)} real + {n_gen} generated, {batches.n_real}+{batches.n_gen} per batch, '
                f'{spe} steps/epoch (ceil of {mixed_data.real_train_size(data)} real / {config.batch_size}); '
                f'held-out {len(data.eval_labels)}']
    step = functools.partial(adv_step.train_step, config, net, spe, total_steps,
                             float(lengths['ema_warmup_steps']))

    def step_with_epoch(state, batch, key):
        state, metrics = step(state, batch, key)
        return state, dict(metrics, epoch=state.step / spe)

    callbacks, best = [], {'value': read_best(workdir)}
    if len(data.eval_labels):
        callback, best = keep_best(config, workdir, net, data, stream, mesh, keys.extra, lengths['eval_every'])
        callbacks.append(callback)

    return Setup(init=functools.partial(adv_step.init_state, net, image_shape), step=step_with_epoch,
                 data=stream, batch_size=config.batch_size, total_steps=total_steps, describe=describe,
                 callbacks=callbacks, progress=dict(epoch='.2f', clean_acc='.3f', adv_acc='.3f', lr='.3e'),
                 last=('lr', 'momentum', 'ema_decay', 'epoch'), nan_policy='raise', info=data.info,
                 done=functools.partial(report_best, workdir, best, total_steps))



TASK = Task('adversarial', adversarial_config, check_config, setup, upgrade, RANGES,
            kind='adversarial-training (robust classifier)',
            use='evaluate it with python -m eval.robustness --workdir {dir}', configs='configs/robust/*.py')
