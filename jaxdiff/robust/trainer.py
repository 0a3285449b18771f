"""Adversarial training with generated data (TRADES / PGD-AT, Wang et al. 2023), launched by train.py:

    python train.py --config configs/robust/digits.py --workdir runs/robust_digits   # rerun to resume

``config.task == 'adversarial'`` makes :func:`jaxdiff.train.loop.run` call :func:`run` here. Fields and defaults:
:func:`adversarial_config` (configs/robust_*.py override them). The step is :mod:`jaxdiff.robust.adv_step`, the
data :mod:`jaxdiff.robust.mixed_data`.

Epoch: ceil(N_real_train / batch_size) steps, N_real_train the whole real training set before the held-out slice is
cut, however much generated data is mixed in (DM-Improves-AT's dataset_size; :func:`run_lengths`). The one-cycle
schedule (stepped per epoch, pct_start of the epochs) and the EMA warm-up (:func:`ema_warmup_steps`) count these
epochs: CIFAR-10 with 1M generated images at batch 512 is 98 steps/epoch, 400 epochs = 39,200 steps, peak lr in
epoch 10 (steps 882-979, 0-based) and the EMA averaging from update 980 (1-based) on.

Outputs in the workdir: ``checkpoints/<step>/`` (orbax via :class:`jaxdiff.train.checkpoint.Checkpointer`: step,
params, ema, opt_state {'momentum'}, buffers (BatchNorm statistics), nonfinite, plus the data-stream state and the
config), ``best/checkpoints/<step>/`` (the same, of the evaluation with the highest PGD accuracy of the EMA model
on the held-out slice; ties go to the later one, as the reference's ``>=``) with ``best/best.json`` {step,
clean_acc, pgd_acc}, ``config.json``, ``dataset_info.json``, ``metrics.jsonl`` (one row per logged step:
loss, ce, kl, clean_acc, adv_acc (training batch, training-mode BN), lr, momentum, grad_norm, img_per_s, and at
evaluation steps eval_clean_acc, eval_pgd_acc, best_pgd_acc, best_step) and ``tb/`` (TensorBoard).

Load a trained model: ``checkpoint.load_arrays(workdir + '/best')`` -> {'ema', 'buffers', ...}; the classifier is
``adv_step.build_net(config, info).apply({'params': ema, 'batch_stats': buffers}, x, train=False)``.
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Optional

import jax
import ml_collections
import numpy as np
from absl import logging

from jaxdiff import files, parallel

BEST_DIR = 'best'
BEST_FILE = 'best.json'


def adversarial_config() -> ml_collections.ConfigDict:
    """Every field of an adversarial-training config, with the CIFAR-10 recipe of Wang et al. (2023) as defaults."""
    c = ml_collections.ConfigDict()
    c.task = 'adversarial'          # adversarial training (train.py dispatches here)
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
    c.data.real = ml_collections.ConfigDict()
    c.data.real.source = 'tfds'     # real data: digits | fashion_mnist | npz | folder | array_record | tfds
    c.data.real.path = ''           # file or folder for npz / folder / array_record / fashion_mnist ('' = Debian's)
    c.data.real.tfds_name = 'cifar10'  # TFDS dataset name (source=tfds)
    c.data.real.split = 'train'     # split of the real training data (its first eval.size examples are held out)
    c.data.real.resolution = 0      # image side after padding/upsampling (0 = native)
    c.data.generated = ''           # sample.py output folder (class-conditional; filter it first with filter.py)
    c.data.crop_padding = 4         # random crop after zero-padding this many pixels (0 = off; reference: 4)
    c.data.hflip = True             # random horizontal flips (reference: on for CIFAR)

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
    c.ema.decay = 0.995             # EMA decay tau (reference --tau 0.995)
    c.ema.warmup_steps = -1         # EMA copies the params before this step (-1 = reference rule, see trainer)

    c.eval = ml_collections.ConfigDict()
    c.eval.size = 1024              # held-out slice: the first N real training examples (0 = no evaluation)
    c.eval.every = 0                # steps between evaluations of the EMA model (0 = once per epoch)
    c.eval.batch_size = 512         # evaluation batch, divisible by the device count
    c.eval.attack_steps = 40        # PGD steps of the selection attack (reference: 4 * attack_steps)
    c.eval.attack_loss = 'cw'       # cw (reference's CWLoss margin) | ce
    return c


def locked(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The config locked against unknown keys."""
    c.lock()
    return c


# ------------------------------------------------------------------------------------------------------ config

def check_config(config) -> None:
    """One clear error for an adversarial config no run can use."""
    from jaxdiff.robust.adv_step import ARCHS, METHODS
    known = set(adversarial_config().keys())
    extra = sorted(set(config.keys()) - known)
    if extra:
        raise ValueError(f'config has field(s) {extra} that task=adversarial does not use; start the config from '
                         'jaxdiff.robust.trainer.adversarial_config()')
    rules = [
        (config.method in METHODS, f'config.method={config.method!r} is not supported: use one of {list(METHODS)}'),
        (config.model.arch in ARCHS, f'config.model.arch={config.model.arch!r} is not supported: use one of '
                                     f'{list(ARCHS)}'),
        (config.norm in ('Linf', 'L2'), f"config.norm={config.norm!r}: use 'Linf' or 'L2'"),
        (config.eps > 0 and config.attack_step > 0 and config.attack_steps > 0,
         'config.eps, attack_step and attack_steps must be positive'),
        (0 <= config.generated_fraction < 1, f'config.generated_fraction={config.generated_fraction} must lie in '
                                             '[0, 1) (some real data in every batch)'),
        (config.generated_fraction == 0 or config.data.generated,
         f'config.generated_fraction={config.generated_fraction} but data.generated is empty: set '
         '--config.data.generated=DIR (a sample.py folder) or --config.generated_fraction=0'),
        (config.epochs > 0 or config.total_steps > 0, 'set config.epochs or config.total_steps'),
        (config.eval.attack_loss in ('cw', 'ce'), f"config.eval.attack_loss={config.eval.attack_loss!r}: use 'cw' "
                                                  "or 'ce'"),
        (config.model.dtype in ('float32', 'bfloat16'), f'config.model.dtype={config.model.dtype!r}: use float32 '
                                                        'or bfloat16'),
        (config.eval.size >= 0 and config.eval.every >= 0, 'config.eval.size and eval.every must be >= 0'),
    ]
    for ok, message in rules:
        if not ok:
            raise ValueError(message)
    for name in ('batch_size', 'checkpoint_every', 'keep_checkpoints', 'log_every'):
        if int(config[name]) <= 0:
            raise ValueError(f'config.{name}={config[name]} must be positive')
    from jaxdiff.robust.mixed_data import split_counts
    n_real, _ = split_counts(config.batch_size, config.generated_fraction)
    if n_real < 1:
        raise ValueError(f'batch_size={config.batch_size} with generated_fraction={config.generated_fraction} '
                         'leaves no real example per batch')
    for name, value in (('batch_size', config.batch_size), ('eval.batch_size', config.eval.batch_size)):
        if value % jax.device_count():
            raise ValueError(f'config.{name}={value} must be divisible by the {jax.device_count()} devices')


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


def run_keys(config, mesh) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(init, train, eval) keys of a run, split from ``config.seed`` under jit into the replicated sharding; the
    eval key drives every keep-best evaluation (:func:`selection_accuracy` recomputes one with it)."""
    return jax.jit(lambda: tuple(jax.random.split(jax.random.key(config.seed), 3)),
                   out_shardings=(parallel.replicated(mesh),) * 3)()


def selection_accuracy(config, net, variables: dict, data) -> tuple[float, float]:
    """(clean, PGD) accuracy of ``variables`` ({'params', 'batch_stats'}) on the run's held-out slice
    ``data.eval_images`` / ``eval_labels`` (:func:`jaxdiff.robust.mixed_data.load`) with the run's selection attack
    and eval key, in ``eval.batch_size`` batches on one device: the numbers training's keep-best records
    (``best/best.json``) for the checkpoint it saved."""
    from jaxdiff.robust import adv_step
    mesh = parallel.make_mesh(1)
    _, _, k_eval = run_keys(config, mesh)
    return adv_step.evaluate(adv_step.jit_eval(config, net, mesh), variables['params'], variables['batch_stats'],
                             data.eval_images, data.eval_labels, config.eval.batch_size, mesh, k_eval)


def run_lengths(config, n_real_train: int) -> dict:
    """The step counts of a run on a real training set of ``n_real_train`` examples (the whole set, held-out slice
    included; generated data never count): {'steps_per_epoch': ceil(n_real_train / B), 'total_steps':
    config.total_steps or epochs * steps_per_epoch, 'ema_warmup_steps': :func:`ema_warmup_steps`, 'eval_every':
    eval.every or steps_per_epoch}. CIFAR-10 recipe (configs/robust/cifar10.py): 98, 39,200, 980.0, 98."""
    from jaxdiff.robust.mixed_data import steps_per_epoch
    spe = steps_per_epoch(config.batch_size, n_real_train)
    return dict(steps_per_epoch=spe, total_steps=int(config.total_steps) or int(config.epochs) * spe,
                ema_warmup_steps=ema_warmup_steps(config, n_real_train), eval_every=int(config.eval.every) or spe)


# ------------------------------------------------------------------------------------------------------ logging

class Log:
    """Progress lines (primary process), metrics.jsonl rows and TensorBoard scalars."""

    def __init__(self, workdir: str, total_steps: int, batch_size: int, enabled: bool):
        self.total, self.batch_size, self.enabled = total_steps, batch_size, enabled
        self.pending: list = []
        self.jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a') if enabled else None
        self.writer = None
        if enabled:
            try:
                from tensorboardX import SummaryWriter
                self.writer = SummaryWriter(os.path.join(workdir, 'tb'), flush_secs=30)
            except ImportError:  # TensorBoard files are optional
                pass
        self.t0, self.step0, self.paused = None, 0, 0.0

    def info(self, message: str) -> None:
        if self.enabled:
            print(message, flush=True)

    def start(self, step: int) -> None:
        self.t0, self.step0, self.paused = time.perf_counter(), step, 0.0

    def fetch(self) -> list[dict]:
        """The pending metrics as floats (clears them)."""
        fetched = [{k: float(v) for k, v in m.items()} for m in jax.device_get(self.pending)]
        self.pending = []
        return fetched

    def write(self, step: int, epoch: float, rows: list[dict], extra: Optional[dict] = None) -> None:
        now = time.perf_counter()
        speed = float('nan')
        if self.t0 is not None and step > self.step0:
            speed = (step - self.step0) * self.batch_size / max(now - self.t0 - self.paused, 1e-9)
        row = {'step': int(step), 'epoch': round(epoch, 4)}
        if rows:
            for name in rows[0]:
                value = float(np.mean([r[name] for r in rows])) if name not in ('lr', 'momentum', 'ema_decay') \
                    else rows[-1][name]
                row[name] = float(f'{value:.7g}') if math.isfinite(value) else None
        row['img_per_s'] = float(f'{speed:.5g}') if math.isfinite(speed) else None
        row.update(extra or {})
        row['time'] = time.time()
        if self.enabled:
            eta = (self.total - step) * self.batch_size / speed if speed > 0 else float('nan')
            from jaxdiff.train.metrics_log import format_eta
            line = f'step {step}/{self.total} | epoch {epoch:.2f}'
            if rows:
                line += (f' | loss {row["loss"]:.4f} | clean {row["clean_acc"]:.3f} | adv {row["adv_acc"]:.3f} | '
                         f'lr {row["lr"]:.3e}')
            line += f' | {speed:.1f} img/s' if math.isfinite(speed) else ' | ? img/s'
            line += f' | ETA {format_eta(eta)}'
            if extra:
                line += (f' | eval clean {extra["eval_clean_acc"]:.4f} pgd {extra["eval_pgd_acc"]:.4f} (best '
                         f'{extra["best_pgd_acc"]:.4f} @ {extra["best_step"]})')
            print(line, flush=True)
            self.jsonl.write(json.dumps(row) + '\n')
            self.jsonl.flush()
            if self.writer is not None:
                for name, value in row.items():
                    if name not in ('step', 'time') and value is not None:
                        self.writer.add_scalar(('eval/' if name.startswith(('eval_', 'best_')) else 'train/') + name,
                                               value, step)
        self.start(step)

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
            self.jsonl = None
        if self.writer is not None:
            self.writer.close()
            self.writer = None


# ------------------------------------------------------------------------------------------------------ run

def read_best(workdir: str) -> Optional[dict]:
    """``workdir/best/best.json`` ({step, clean_acc, pgd_acc, ...}) or None."""
    path = os.path.join(workdir, BEST_DIR, BEST_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def run(config, workdir: str, *, allow_config_change: bool = False) -> dict:
    """Train (or resume) ``config`` in ``workdir``; returns {'step', 'stopped_by_signal', 'resumed_from',
    'best' (best.json dict or None), 'checksum'}. Raises ValueError / FileNotFoundError / CheckpointError with
    one-line messages (bad config, missing data, NaN loss: the last checkpoint is kept)."""
    from jaxdiff.train.signals import StopSignal
    check_config(config)
    with StopSignal() as stop:
        return _run(config, workdir, allow_config_change, stop)


def _run(config, workdir: str, allow_config_change: bool, stop) -> dict:
    from jaxdiff.robust import adv_step, mixed_data
    from jaxdiff.train import checkpoint as ckpt

    primary = jax.process_index() == 0
    os.makedirs(workdir, exist_ok=True)
    ckpt.check_config(workdir, config, allow_config_change, write=False)

    data = mixed_data.load(config)
    batches = mixed_data.MixedBatches(data, config.batch_size, config.generated_fraction, config.seed)
    lengths = run_lengths(config, mixed_data.real_train_size(data))
    spe, total_steps = lengths['steps_per_epoch'], lengths['total_steps']
    warmup, eval_every = lengths['ema_warmup_steps'], lengths['eval_every']
    assert spe == batches.steps_per_epoch
    net = adv_step.build_net(config, data.info)
    image_shape = data.real_images.shape[1:]

    mesh = parallel.make_mesh(1)
    rep = parallel.replicated(mesh)
    k_init, k_train, k_eval = run_keys(config, mesh)
    init = adv_step.jit_init(net, image_shape, mesh)
    abstract = jax.eval_shape(init, k_init)
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep), abstract)
    checkpointer = ckpt.Checkpointer(workdir, config.keep_checkpoints)
    best_ckpt = ckpt.Checkpointer(os.path.join(workdir, BEST_DIR), 1, use_async=False)
    restored = checkpointer.restore_latest(abstract)
    if restored is None:
        state, resumed_from = init(k_init), None
    else:
        state, stream_data, _ = restored
        resumed_from = int(jax.device_get(state.step))
        saved = (stream_data.get('states') or [{}])[0]
        now = batches.state(resumed_from)
        if any(saved.get(k) != now[k] for k in ('n_real', 'n_generated', 'n_real_per_batch')):
            logging.warning('the data differ from the checkpoint\'s (%s vs %s): the batch order differs from the '
                            'uninterrupted run', saved, now)
    if primary:
        ckpt.check_config(workdir, config, allow_config_change, write=True)
        ckpt.write_dataset_info(workdir, data.info)

    log = Log(workdir, total_steps, config.batch_size, primary)
    n_gen = 0 if data.gen_labels is None else len(data.gen_labels)
    log.info(f'{type(net).__name__} ({config.model.arch}) {config.method} eps={config.eps:.4g} {config.norm} on '
             f'{config.data.real.source} {image_shape}, {data.info.num_classes} classes: {len(data.real_labels)} '
             f'real + {n_gen} generated, {batches.n_real}+{batches.n_gen} per batch, {spe} steps/epoch (ceil of '
             f'{mixed_data.real_train_size(data)} real / {config.batch_size}), {total_steps} steps; held-out '
             f'{len(data.eval_labels)}; {jax.device_count()} device(s)')
    log.info(f'resuming from step {resumed_from}' if resumed_from is not None else 'starting from step 0')

    step_fn = adv_step.jit_train_step(config, net, mesh, spe, total_steps, warmup)
    eval_fn = adv_step.jit_eval(config, net, mesh) if len(data.eval_labels) else None
    best = read_best(workdir) if resumed_from is not None else None  # (a later best is re-found: evals repeat)
    rows = jax.process_count()
    local = config.batch_size // rows
    mine = slice(jax.process_index() * local, (jax.process_index() + 1) * local)

    def save(s) -> None:
        checkpointer.save(s, {'process_count': rows, 'states': [batches.state(int(jax.device_get(s.step)))] * rows},
                          config)

    def check_finite(step: int, fetched: list[dict]) -> None:
        bad = [r for r in fetched if not math.isfinite(r['loss'])]
        if bad:
            checkpointer.close()
            last = checkpointer.steps()
            kept = f'the last checkpoint (step {last[-1]}) is kept' if last else 'no checkpoint was saved yet'
            raise ValueError(f'loss is {bad[0]["loss"]} by step {step}: training diverged; {kept}; lower '
                             '--config.optim.lr or check the data, then rerun')

    step = int(jax.device_get(state.step))
    first = step
    stopped = False
    fetched_rows: list[dict] = []
    try:
        while step < total_steps:
            host = batches.batch(step, mine)
            host.pop('generated')
            batch = parallel.host_to_global(host, mesh)
            state, metrics = step_fn(state, batch, k_train)
            step += 1
            log.pending.append(metrics)
            if step == first + 1:
                jax.block_until_ready(metrics['loss'])
                log.start(step)
            is_eval = eval_fn is not None and (step % eval_every == 0 or step == total_steps)
            is_log = step % config.log_every == 0 or step == total_steps or is_eval
            stopped = stop.requested()
            is_save = step % config.checkpoint_every == 0 or step == total_steps or stopped
            if is_log or is_save:
                fetched_rows += log.fetch()
                check_finite(step, fetched_rows)
            extra = None
            if is_eval:
                t = time.perf_counter()
                clean, robust = adv_step.evaluate(eval_fn, state.ema, state.buffers, data.eval_images,
                                                  data.eval_labels, config.eval.batch_size, mesh, k_eval)
                if best is None or robust >= best['pgd_acc']:
                    best = dict(step=step, clean_acc=clean, pgd_acc=robust, eval_size=len(data.eval_labels),
                                attack=f'PGD-{config.eval.attack_steps} ({config.eval.attack_loss}) eps '
                                       f'{config.eps:.6g} {config.norm}')
                    best_ckpt.save(state, {'process_count': rows, 'states': [batches.state(step)] * rows}, config)
                    if primary:
                        files.write_json(os.path.join(workdir, BEST_DIR, BEST_FILE), best)
                extra = dict(eval_clean_acc=clean, eval_pgd_acc=robust, best_pgd_acc=best['pgd_acc'],
                             best_step=best['step'])
                log.paused += time.perf_counter() - t
            if is_log:
                log.write(step, step / spe, fetched_rows, extra)
                fetched_rows = []
            if is_save:
                t = time.perf_counter()
                save(state)
                log.paused += time.perf_counter() - t
                if stopped:
                    log.info(f'stop signal received: saved step {step}; rerun the same command to resume')
                    break
    finally:
        checkpointer.close()
        best_ckpt.close()
        log.close()
    if step >= total_steps:
        log.info(f'done: step {step}, checkpoints in {checkpointer.directory}' +
                 (f'; best PGD accuracy {best["pgd_acc"]:.4f} (clean {best["clean_acc"]:.4f}) at step '
                  f'{best["step"]} in {os.path.join(workdir, BEST_DIR)}' if best else ''))
    return dict(step=step, stopped_by_signal=stopped, resumed_from=resumed_from, best=best,
                checksum=parallel.local_checksum((state.params, state.ema)))
