"""The training loop, the only one: a task + config + workdir -> a trained, checkpointed, logged run that resumes
where it stopped.

    run(task, config, workdir)   # jaxdiff.tasks.run(config, workdir) picks the task from config.task

Per process: the mesh over all devices (``config.parallel.fsdp``), run keys from ``config.seed``, the task's
:class:`~jaxdiff.engine.task.Setup`, the state (fresh, or the newest usable checkpoint restored into this mesh's
shardings, on any device or process count), the jitted sharded step (metrics accumulated on the device with
clu.metrics). Every ``log_every`` steps a progress line, TensorBoard scalars and a metrics.jsonl row; the task's
callbacks when due (sample grids, keep-best evaluations, final outputs); every ``checkpoint_every`` steps (and at
the end, and after SIGTERM/SIGINT) an async orbax checkpoint of the state and the data position.

Host syncs happen only at log / checkpoint / callback boundaries. The stop flag is local and free in one process;
with several processes it is agreed on (one tiny all-gather) only at those boundaries, so a signal stops the run
at the next one (at most ``log_every`` steps later), every process at the same step.

NaN policy (:attr:`Setup.nan_policy`): 'raise' ends the run with one line when an interval's loss is not finite,
before that state is saved (the last checkpoint is kept); 'count' trusts the step to have neutralised the
gradients and counted the event (EDM's rule), and goes on.
"""
from __future__ import annotations

import contextlib
import math
import os
import signal
import time
from typing import Optional

import jax
import numpy as np

from jaxdiff import config_ranges, files, parallel
from jaxdiff.dir_lock import DirectoryLock, check_directory
from jaxdiff.engine import checkpoint as ckpt
from jaxdiff.engine import log as logs
from jaxdiff.engine.signals import StopSignal
from jaxdiff.engine.task import RunKeys, Setup, state_step

NAN_POLICIES = ('raise', 'count')
PARAMETERS_FILE = 'parameters.txt'  # clu's parameter table of the run's params


def check_common(config) -> None:
    """One clear error for the fields every task shares (positive intervals)."""
    for name in ('checkpoint_every', 'log_every'):
        if int(config[name]) <= 0:
            raise ValueError(f'config.{name}={config[name]} must be positive')
    if int(config.get('keep_checkpoints', 1)) <= 0:
        raise ValueError(f'config.keep_checkpoints={config.keep_checkpoints} must be positive')


def run(task, config, workdir: str, *, allow_config_change: bool = False, stream=None) -> dict:
    """Train ``task`` with ``config`` in ``workdir`` (resuming from its newest usable checkpoint); returns
    {'step', 'stopped_by_signal', 'stop_signal' (its number, or None), 'resumed_from' (step or None), 'checksum'
    (:func:`jaxdiff.parallel.local_checksum` of the final state), **the task's summary}. stream: where the primary
    process's progress lines go (default stdout).

    Raises ValueError / FileNotFoundError (bad config or data, diverged loss), ckpt.ConfigMismatchError (the workdir
    holds another config), ckpt.CheckpointError (every checkpoint damaged), NotADirectoryError (workdir is a file),
    DirectoryLockedError (another process trains in workdir) with one-line messages; nothing saved is deleted.
    """
    config_ranges.check(config, task.ranges)
    task.check(config)
    check_common(config)
    check_directory(workdir)
    # From here on SIGTERM/SIGINT stop the run cleanly. The workdir's lock (one writer; process 0 of a job holds it)
    # is taken once the config, data and model are known good, right before the first read of checkpoints, so a
    # refused command writes nothing.
    lock = DirectoryLock(workdir, f'training ({task.name})', enabled=jax.process_index() == 0)
    with contextlib.ExitStack() as held, StopSignal() as stop:
        return _run(task, config, workdir, allow_config_change, stop, stream, lambda: held.enter_context(lock))


def run_keys(seed: int, mesh) -> RunKeys:
    """(init, train, extra) keys split from ``seed``, made under jit straight into the replicated sharding (global
    arrays: valid on every host)."""
    keys = jax.jit(lambda: tuple(jax.random.split(jax.random.key(seed), 3)),
                   out_shardings=(parallel.replicated(mesh),) * 3)()
    return RunKeys(*keys)


def restore_data(data, saved: dict) -> str:
    """Put the saved data position back; returns a note for the log. Every process holds the same position (the
    global batches taken), so a checkpoint of any process count resumes on this one; positions that differ (a
    checkpoint of an older, per-host pipeline on another process count) restart the data order with a warning."""
    states = saved.get('states') or []
    if not any(states):  # written outside the engine: no data position to go back to
        return 'the checkpoint holds no data-iterator state: data order starts from the seed'
    if len(states) == jax.process_count():
        return data.set_state(states[jax.process_index()])
    if all(state == states[0] for state in states):
        note = data.set_state(states[0])
        return '; '.join(filter(None, [f'checkpoint written by {len(states)} process(es), resumed on '
                                       f'{jax.process_count()}: the same global batches from here on', note]))
    return (f'warning: checkpoint written by {len(states)} process(es) at different data positions, this run has '
            f'{jax.process_count()}: data order restarts from the seed (the state is restored)')


def _accumulating_step(setup: Setup, acc_class):
    """The task's step with the interval's clu accumulator carried along: (state, acc, batch, key) -> (state,
    acc)."""
    def step(state, acc, batch, key):
        state, metrics = setup.step(state, batch, key)
        return state, acc.merge(acc_class.single_from_model_output(**metrics))
    return step


class NonfiniteStreak:
    """The 'count' NaN policy's guard. EDM's rule skips a step whose loss or gradients are non-finite and goes on,
    which is right for a rare bad batch; but when every step over a stretch of at least ``MIN_STEPS`` (or every step
    up to the run's end) is skipped, the run cannot progress (e.g. ``model.sigma_data=0``), and it stops instead of
    ending 'done' with untrained weights. Checked at each log / checkpoint / callback boundary from the task's
    cumulative ``nonfinite`` metric; a boundary interval with a finite step starts the stretch anew."""
    MIN_STEPS = 10

    def __init__(self, step: int, count: int):
        self.since_step, self.since_count = step, count

    def check(self, step: int, count: int, last: bool) -> Optional[str]:
        """None, or what went wrong, after ``step`` steps with ``count`` non-finite ones in the whole run."""
        steps, bad = step - self.since_step, count - self.since_count
        if bad < steps:
            self.since_step, self.since_count = step, count
            return None
        if steps >= self.MIN_STEPS or (last and steps > 0):
            return f'every step from {self.since_step + 1} to {step} was non-finite'
        return None


def _kept(checkpointer: ckpt.Checkpointer) -> str:
    saved = checkpointer.steps()
    return f'the last checkpoint (step {saved[-1]}) is kept' if saved else 'no checkpoint was saved yet'


def _zeros(shapes, sharding):
    """An empty clu accumulator (every total and count 0) laid out as ``sharding``."""
    return jax.device_put(jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), shapes), sharding)


def _run(task, config, workdir: str, allow_config_change: bool, stop: StopSignal, stream, take_lock) -> dict:
    primary = jax.process_index() == 0
    multiprocess = jax.process_count() > 1
    schema = task.schema()
    ckpt.check_config(workdir, config, allow_config_change, write=False, schema=schema, upgrade=task.upgrade)

    mesh = parallel.make_mesh(int(config.get('parallel', {}).get('fsdp', 1)))
    keys = run_keys(int(config.seed), mesh)
    setup = task.setup(config, workdir, mesh, keys)
    if setup.nan_policy not in NAN_POLICIES:
        raise ValueError(f'task {task.name}: nan_policy {setup.nan_policy!r} is not one of {NAN_POLICIES}')
    if setup.batch_size % jax.device_count():
        raise ValueError(f'the global batch {setup.batch_size} must be divisible by the {jax.device_count()} '
                         'devices; change --config.batch_size')
    abstract = jax.eval_shape(setup.init, keys.init)
    shardings = parallel.fsdp_shardings(mesh, abstract)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)

    take_lock()
    checkpointer = ckpt.Checkpointer(workdir, int(config.get('keep_checkpoints', 2)))
    restored = checkpointer.restore_latest(abstract)
    data_note = ''
    if restored is None:
        state = jax.jit(setup.init, out_shardings=shardings)(keys.init)
        resumed_from = None
    else:
        state, saved_data, _ = restored
        data_note = restore_data(setup.data, saved_data)
        resumed_from = int(jax.device_get(state_step(state)))
    if primary:
        ckpt.check_config(workdir, config, allow_config_change, write=True, schema=schema,
                          upgrade=task.upgrade)
        if setup.info is not None:
            ckpt.write_dataset_info(workdir, setup.info)

    logger = logs.MetricsLogger(workdir, setup.total_steps, setup.batch_size, enabled=primary, stream=stream,
                                fields=setup.progress, integers=setup.integers)
    for line in setup.describe:
        logger.info(line)
    logger.info(f'task {task.name}: {jax.device_count()} device(s) in {jax.process_count()} process(es), mesh '
                f'{dict(mesh.shape)}, global batch {setup.batch_size}, {setup.total_steps} steps')
    tree = ckpt.state_to_tree(state)
    if 'params' in tree and primary:
        table = logs.parameter_overview(tree['params'])
        files.write_bytes(os.path.join(workdir, PARAMETERS_FILE), (table + '\n').encode())
        logger.info(f'{table.splitlines()[-1]} (table: {os.path.join(workdir, PARAMETERS_FILE)})')
    logger.info(f'resuming from step {resumed_from}' if resumed_from is not None else 'starting from step 0')
    if data_note:
        logger.info(data_note)

    step = int(jax.device_get(state_step(state)))
    first_step, stopped = step, False
    streak = NonfiniteStreak(step, int(jax.device_get(state.nonfinite))) if setup.nan_policy == 'count' else None
    replicated = parallel.replicated(mesh)
    try:
        if step < setup.total_steps:
            batch = parallel.host_to_global(setup.data.batch(step), mesh)
            metric_shapes = jax.eval_shape(setup.step, abstract, batch, keys.train)[1]
            acc_class = logs.accumulator(list(metric_shapes), setup.last)
            acc_shapes = jax.eval_shape(lambda m: acc_class.single_from_model_output(**m), metric_shapes)
            step_fn = jax.jit(_accumulating_step(setup, acc_class),
                              in_shardings=(shardings, replicated, parallel.batch_sharding(mesh), replicated),
                              out_shardings=(shardings, replicated), donate_argnums=(0, 1),
                              compiler_options=setup.compiler_options)
            acc = _zeros(acc_shapes, replicated)
            logger.info(f'compiling the step; step {step + 1} runs once it is compiled')
            started = time.time()
        while step < setup.total_steps:
            if step != first_step:
                batch = parallel.host_to_global(setup.data.batch(step), mesh)
            state, acc = step_fn(state, acc, batch, keys.train)
            step += 1
            if step == first_step + 1:
                jax.block_until_ready(acc)  # exclude compilation from img/s
                logger.info(f'step {step} done {time.time() - started:.1f} s after the start of compilation')
                logger.start_interval(step)
            last = step == setup.total_steps
            is_log = step % config.log_every == 0 or last
            due = [c for c in setup.callbacks if c.due(step, setup.total_steps)]
            boundary = is_log or bool(due) or step % config.checkpoint_every == 0
            if not multiprocess or boundary:
                stopped = stop.requested()
            is_save = step % config.checkpoint_every == 0 or last or stopped
            if not (is_log or due or is_save):
                continue
            scalars = {k: float(v) for k, v in jax.device_get(acc.compute()).items()}
            if setup.nan_policy == 'raise' and not math.isfinite(scalars.get('loss', 0.0)):
                checkpointer.close()
                raise ValueError(f'loss is {scalars["loss"]} by step {step}: training diverged; {_kept(checkpointer)}; '
                                 'lower the learning rate or check the data, then rerun')
            problem = streak and streak.check(step, int(scalars['nonfinite']), last)
            if problem:
                checkpointer.close()
                raise ValueError(f'{problem} (loss or gradients NaN/inf; EDM\'s rule skipped those updates): the run '
                                 f'cannot progress; {_kept(checkpointer)}; check the config (e.g. model.sigma_data, '
                                 'optim.lr) and the data, then rerun')
            logger.pause()
            extra: dict = {}
            for callback in due:
                extra.update(callback.fn(step, state) or {})
            logger.resume()
            if is_log or extra:
                logger.write(step, scalars, extra)
                acc = _zeros(acc_shapes, replicated)  # a new buffer: the step donates the old one
            if is_save:
                if last:
                    logger.info(f'writing the final checkpoint (step {step})')
                logger.pause()
                checkpointer.save(state, ckpt.gather_data_states(setup.data.get_state()), config)
                logger.resume()
                if stopped:
                    logger.info(f'stop signal received: saved step {step}; rerun the same command to resume')
                    break
    finally:
        checkpointer.close()  # waits for pending async saves: what was started is committed
        logger.close()
    signum = (stop.received or signal.SIGTERM) if stopped else None  # another process's signal: SIGTERM
    summary = dict(step=step, stopped_by_signal=stopped, stop_signal=signum, resumed_from=resumed_from,
                   checksum=parallel.local_checksum(ckpt.state_to_tree(state)))
    if primary and step >= setup.total_steps:
        logger.info(f'done: step {step}, checkpoints in {checkpointer.directory}')
    if setup.done is not None:
        summary.update(setup.done(state) or {})
    return summary
