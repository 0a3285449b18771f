"""A fake task for the engine's tests: a 2-layer MLP regressing a fixed random target on step-indexed Gaussian
data, with Adam, EMA and a dropout key, small enough to compile in a second. Its global batch of step s comes from
``default_rng([seed, s])``, so the run is a function of (seed, step) and each process reads its rows.

Run as a script (one process of a run) for the subprocess tests:

    python tests/fake_task.py WORKDIR [--total_steps N] [--checkpoint_every K] [--sleep S]
        [--coordinator ADDR --num_processes P --process_id I]

prints one JSON line {"step", "checksum", "stopped_by_signal", "resumed_from"} at the end and, like train.py, exits
128 + the signal's number after a stop signal.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jaxdiff.cli import exit_if_stopped
from jaxdiff.engine.state import TrainState
from jaxdiff.engine.task import Callback, Setup, Task

DIM, HIDDEN = 8, 16


def schema() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.task = 'fake'                 # the fake task
    c.seed = 0                      # PRNG seed
    c.batch_size = 16               # global batch
    c.total_steps = 30              # steps
    c.log_every = 5                 # steps between progress lines
    c.checkpoint_every = 5          # steps between checkpoints
    c.keep_checkpoints = 10         # checkpoints kept
    c.lr = 1e-2                     # Adam learning rate
    c.nan_at = -1                   # step whose loss is made NaN (-1 = never)
    c.skip_from = -1                # EDM's 'count' NaN policy: from this step on every update is non-finite,
                                    # skipped and counted (-1 = 'raise' policy, no skipping)
    c.sleep = 0.0                   # seconds to sleep after each step (so a test can signal a running job)
    c.parallel = ml_collections.ConfigDict()
    c.parallel.fsdp = 1             # fsdp axis size
    return c


class Crash(RuntimeError):
    """The fake crash of :func:`crashing`."""


def crashing(task: Task, at: int) -> Task:
    """``task`` that raises :class:`Crash` after step ``at`` (before that step's checkpoint is written): a process
    dying mid-run, in-process. Same name, schema and config as ``task``, so a rerun with ``task`` resumes the run."""
    def setup(config, workdir, mesh, keys) -> Setup:
        out = task.setup(config, workdir, mesh, keys)

        def crash(step, state):
            if step == at:
                raise Crash(f'crash after step {step}')
        out.callbacks = [*out.callbacks, Callback('crash', 1, crash, at_end=False)]
        return out
    return dataclasses.replace(task, setup=setup)


class StepData:
    """Rows of the global batch of each step, drawn from (seed, step) alone."""

    def __init__(self, config):
        self.seed, self.size = int(config.seed), int(config.batch_size)
        local = self.size // jax.process_count()
        self.rows = slice(jax.process_index() * local, (jax.process_index() + 1) * local)
        self.taken = 0

    def batch(self, step: int) -> dict:
        rng = np.random.default_rng([self.seed, step])
        x = rng.normal(size=(self.size, DIM)).astype(np.float32)
        self.taken = step + 1
        return {'x': x[self.rows]}

    def get_state(self) -> dict:
        return {'taken': self.taken}

    def set_state(self, state: dict) -> str:
        self.taken = int(state['taken'])
        return ''


def init(key) -> TrainState:
    k1, k2 = jax.random.split(key)
    params = {'w1': jax.random.normal(k1, (DIM, HIDDEN)) / np.sqrt(DIM),
              'w2': jax.random.normal(k2, (HIDDEN, DIM)) / np.sqrt(HIDDEN)}
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema=jax.tree.map(jnp.copy, params),
                      opt_state=optax.adam(1e-2).init(params), buffers={}, nonfinite=jnp.zeros((), jnp.int32))


def make_step(config):
    optimizer = optax.adam(config.lr)
    target = jax.random.normal(jax.random.key(123), (DIM, DIM))

    def step(state, batch, key):
        keep = jax.random.bernoulli(jax.random.fold_in(key, state.step), 0.9, (batch['x'].shape[0], HIDDEN))

        def loss_fn(p):
            h = jnp.tanh(batch['x'] @ p['w1']) * keep
            loss = jnp.mean((h @ p['w2'] - batch['x'] @ target) ** 2)
            return jnp.where(state.step == config.nan_at, jnp.nan, loss)

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = jax.tree.map(lambda e, p: 0.9 * e + 0.1 * p, state.ema, params)
        bad = (config.skip_from >= 0) & (state.step >= config.skip_from)
        params, ema = (jax.tree.map(lambda new, old: jnp.where(bad, old, new), a, b)
                       for a, b in ((params, state.params), (ema, state.ema)))
        nonfinite = state.nonfinite + bad.astype(jnp.int32)
        metrics = dict(loss=loss, lr=jnp.float32(config.lr), nonfinite=nonfinite)
        return state.replace(step=state.step + 1, params=params, ema=ema, opt_state=opt_state,
                             nonfinite=nonfinite), metrics

    return step


def check(config) -> None:
    if config.batch_size <= 0:
        raise ValueError('config.batch_size must be positive')


def setup(config, workdir, mesh, keys) -> Setup:
    callbacks = []
    if config.sleep:
        callbacks.append(Callback('sleep', 1, lambda step, state: time.sleep(config.sleep)))
    return Setup(init=init, step=make_step(config), data=StepData(config), batch_size=config.batch_size,
                 total_steps=config.total_steps, callbacks=callbacks, describe=['fake task'],
                 last=('lr', 'nonfinite'), nan_policy='count' if config.skip_from >= 0 else 'raise')


TASK = Task('fake', schema, check, setup)


def config_of(**overrides) -> ml_collections.ConfigDict:
    c = schema()
    for key, value in overrides.items():
        node = c
        *parents, leaf = key.split('.')
        for p in parents:
            node = node[p]
        node[leaf] = value
    c.lock()
    return c


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument('workdir')
    parser.add_argument('--total_steps', type=int, default=30)
    parser.add_argument('--checkpoint_every', type=int, default=5)
    parser.add_argument('--sleep', type=float, default=0.0)
    parser.add_argument('--allow_config_change', action='store_true')
    parser.add_argument('--coordinator')
    parser.add_argument('--num_processes', type=int)
    parser.add_argument('--process_id', type=int)
    args = parser.parse_args()
    if args.coordinator:
        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    from jaxdiff.engine import loop
    config = config_of(total_steps=args.total_steps, checkpoint_every=args.checkpoint_every, sleep=args.sleep)
    summary = loop.run(TASK, config, args.workdir, allow_config_change=args.allow_config_change)
    print(json.dumps({k: summary[k] for k in ('step', 'checksum', 'stopped_by_signal', 'resumed_from')}), flush=True)
    exit_if_stopped(summary)  # train.py's convention: 128 + the signal after a stop-signal save


if __name__ == '__main__':
    main()
