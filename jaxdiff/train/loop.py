"""The training loop: config + workdir -> a trained, checkpointed, logged run that resumes where it stopped.

    run(config, workdir)   # what ``python train.py --config configs/FAMILY/NAME.py --workdir DIR`` calls

Per process: mesh over all devices (``config.parallel.fsdp``), this host's data shard, net + state (fresh, or the
latest usable checkpoint restored into the current mesh's shardings), the jitted sharded step; every
``log_every`` steps a progress line and TensorBoard scalars, every ``sample_every`` steps a PNG grid from the EMA
params, every ``checkpoint_every`` steps (and at the end, and on SIGTERM/SIGINT after the current step) an async
checkpoint. Randomness: one base key from ``config.seed`` split into init / train / sample keys; the train key is
folded with the step inside the step function, so a resumed run repeats the uninterrupted one bit for bit.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np

from jaxdiff import parallel
from jaxdiff.train import checkpoint as ckpt
from jaxdiff.train import metrics_log, sample_grid
from jaxdiff.train.signals import StopSignal

# Everything a run needs from the model / state / step modules is imported lazily in run(), so the CLI can print
# config errors before initialising a backend.


def check_config(config) -> None:
    """One clear error for values no run can use (and task settings that contradict each other)."""
    from jaxdiff.train.model import check_task
    check_task(config)
    for name in ('batch_size', 'total_steps', 'checkpoint_every', 'log_every', 'keep_checkpoints'):
        if int(config[name]) <= 0:
            raise ValueError(f'config.{name}={config[name]} must be positive')
    if config.sample_every < 0:
        raise ValueError(f'config.sample_every={config.sample_every} must be >= 0 (0 = never)')
    if config.batch_size % jax.device_count():
        raise ValueError(f'config.batch_size={config.batch_size} must be divisible by the {jax.device_count()} '
                         'devices; change --config.batch_size')


def make_data(config) -> tuple[Any, Any]:
    """(this process's endless batch iterator, DatasetInfo) for ``config.data`` (gmm2d handled here)."""
    kwargs = dict(global_batch_size=config.batch_size, seed=config.seed, process_index=jax.process_index(),
                  process_count=jax.process_count())
    if config.data.source == 'gmm2d':
        from jaxdiff.train.toy_data import make_gmm2d_iterator
        return make_gmm2d_iterator(config.data, **kwargs)
    from jaxdiff.data import make_iterator
    return make_iterator(config.data, **kwargs)


def _restore_data(iterator, data: dict) -> str:
    """Put the saved iterator position back; returns what happened, for the log. Every process holds the same position (the global batches taken,
    jaxdiff.data.pipeline), so a checkpoint of any process count resumes on this one; positions that differ (a
    checkpoint of an older, per-host pipeline on another process count) restart the data order with a warning."""
    states = data.get('states') or []
    if not any(states):  # written outside train.py (e.g. a trigger fine-tune): no data position to go back to
        return 'the checkpoint holds no data-iterator state: data order starts from the seed'
    if len(states) == jax.process_count():
        iterator.set_state(states[jax.process_index()])
        return ''
    if all(state == states[0] for state in states):
        iterator.set_state(states[0])
        return (f'checkpoint written by {len(states)} process(es), resumed on {jax.process_count()}: the same '
                'global batches from here on')
    return (f'warning: checkpoint written by {len(states)} process(es) at different data positions, this run has '
            f'{jax.process_count()}: data order restarts from the seed (params, EMA and optimizer state restored)')


def run(config, workdir: str, *, allow_config_change: bool = False) -> dict:
    """Train ``config`` in ``workdir`` (resuming from its latest usable checkpoint); returns a summary dict
    {'step', 'stopped_by_signal', 'last_samples' (PNG path or None), 'resumed_from' (step or None),
    'checksum' (:func:`jaxdiff.parallel.local_checksum` of the final params and EMA)}.

    Raises ValueError / FileNotFoundError (bad config or data), ckpt.ConfigMismatchError (the workdir holds another
    config), ckpt.CheckpointError (every checkpoint damaged) with one-line messages; nothing saved is deleted.
    """
    if config.get('task') == 'adversarial':  # TRADES / PGD-AT with generated data: its own config and loop
        from jaxdiff.robust import trainer
        return trainer.run(config, workdir, allow_config_change=allow_config_change)
    check_config(config)
    with StopSignal() as stop:  # from here on, SIGTERM/SIGINT stop the run cleanly (at the latest after one step)
        return _run(config, workdir, allow_config_change, stop)


def _run(config, workdir: str, allow_config_change: bool, stop: StopSignal) -> dict:
    from jaxdiff.train.model import build_net
    from jaxdiff.train.step import abstract_state, init_sharded_state, make_train_step, state_shardings

    primary = jax.process_index() == 0
    os.makedirs(workdir, exist_ok=True)
    ckpt.check_config(workdir, config, allow_config_change, write=False)

    mesh = parallel.make_mesh(config.parallel.fsdp)
    iterator, data_info = make_data(config)
    info = ckpt.net_info(workdir, data_info)
    net = build_net(config, info)
    abstract = abstract_state(config, net)
    shardings = state_shardings(mesh, abstract)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)

    replicated = parallel.replicated(mesh)
    # Keys are made under jit straight into the replicated sharding (global arrays: valid on every host).
    k_init, k_train, k_sample = jax.jit(lambda: tuple(jax.random.split(jax.random.key(config.seed), 3)),
                                        out_shardings=(replicated,) * 3)()
    checkpointer = ckpt.Checkpointer(workdir, config.keep_checkpoints)
    restored = checkpointer.restore_latest(abstract)
    data_note = ''
    if restored is None:
        state = init_sharded_state(config, net, info, k_init, mesh)
        resumed_from = None
    else:
        state, data, _ = restored
        data_note = _restore_data(iterator, data)
        resumed_from = int(jax.device_get(state.step))
    if primary:
        ckpt.check_config(workdir, config, allow_config_change, write=True)
        ckpt.write_dataset_info(workdir, info)

    logger = metrics_log.MetricsLogger(workdir, config.total_steps, config.batch_size, enabled=primary)
    from jaxdiff.train.model import is_classifier
    arch = '' if is_classifier(config) else f' ({config.model.arch})'  # the classifier does not read model.arch
    logger.info(f'{type(net).__name__}{arch} on {config.data.source} {info.resolution}x'
                f'{info.resolution}x{info.channels}, {info.num_classes} classes, {info.size} examples; '
                f'{jax.device_count()} device(s) in {jax.process_count()} process(es), mesh {dict(mesh.shape)}')
    logger.info(metrics_log.parameter_overview(state.params))
    logger.info(f'resuming from step {resumed_from}' if resumed_from is not None else 'starting from step 0')
    if data_note:
        logger.info(data_note)

    step_fn = make_train_step(config, net, mesh)
    train_key, sample_key = k_train, k_sample
    variables_shardings = {'params': shardings.params}
    if state.buffers:
        variables_shardings['buffers'] = shardings.buffers
    sampler = sample_grid.make_sampler(config, net, info, mesh, variables_shardings) if config.sample_every else None

    def write_samples(step: int) -> str:
        variables = {'params': state.ema}
        if state.buffers:
            variables['buffers'] = state.buffers
        samples = np.asarray(jax.device_get(sampler(variables, sample_key)))
        path = os.path.join(workdir, 'samples', f'step_{step:07d}.png')
        if primary:
            sample_grid.save_samples(samples, path, net.label_dim)
            logger.info(f'samples: {path}')
        return path

    def save(step_state) -> None:
        data_states = ckpt.gather_data_states(iterator.get_state())
        checkpointer.save(step_state, data_states, config)

    step = int(jax.device_get(state.step))
    first_step = step
    last_samples, stopped = None, False
    try:
        while step < config.total_steps:
            batch = parallel.host_to_global(next(iterator), mesh)
            state, metrics = step_fn(state, batch, train_key)
            step += 1
            logger.record(metrics)
            if step == first_step + 1:
                jax.block_until_ready(metrics['loss'])  # exclude compilation from img/s
                logger.start_interval(step)
            if step % config.log_every == 0 or step == config.total_steps:
                logger.write(step, int(jax.device_get(state.nonfinite)))
            logger.pause()
            if sampler is not None and (step % config.sample_every == 0 or step == config.total_steps):
                last_samples = write_samples(step)
            stopped = stop.requested()
            if step % config.checkpoint_every == 0 or step == config.total_steps or stopped:
                save(state)
                if stopped:
                    logger.info(f'stop signal received: saved step {step}; rerun the same command to resume')
            logger.resume()
            if stopped:
                break
    finally:
        checkpointer.close()  # waits for pending async saves: what was started is committed
        logger.close()
    if primary and step >= config.total_steps:
        logger.info(f'done: step {step}, checkpoints in {checkpointer.directory}'
                    + (f', samples {last_samples}' if last_samples else ''))
    return dict(step=step, stopped_by_signal=stopped, last_samples=last_samples, resumed_from=resumed_from,
                checksum=parallel.local_checksum((state.params, state.ema)))
