"""What a task hands the engine: the contract between :func:`jaxdiff.engine.loop.run` and ``jaxdiff/tasks/*.py``.

A task is a :class:`Task` record, one per ``jaxdiff/tasks/*.py`` file (``TASK = Task(...)``):

- ``name``: the value of ``config.task`` that selects it;
- ``schema() -> ConfigDict``: every config field with its default and a one-line comment (unlocked);
- ``check(config)``: one clear ``ValueError`` for settings no run can use (called before any backend starts);
- ``setup(config, workdir, mesh, keys) -> Setup``: build model(s), data and callbacks for this process;
- ``upgrade(saved: dict) -> dict``: a run's saved config.json in today's field names (renamed fields), so an
  older run resumes and loads without a config change (default: unchanged);
- ``ranges``: {dotted key: :class:`jaxdiff.config_ranges.Rule`} for every schema field, checked by the engine
  before ``check``;
- ``kind``, ``use``, ``configs``: what a run of the task is, what to do with one and where its configs are, for
  the one message of a run passed where another kind is needed (:func:`jaxdiff.runs.wrong_kind`).

``keys`` is :class:`RunKeys`: three replicated PRNG keys split from ``config.seed`` (init, train, extra); the train
key reaches every step, which folds in the step number, so a resumed run repeats the uninterrupted one.

The engine owns everything else (mesh, sharding, checkpoints, resume, signals, logging, NaN policy, periodic
calls); a task has no loop of its own.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, NamedTuple, Optional, Protocol

import jax
import numpy as np

from jaxdiff.config_ranges import Rule

class RunKeys(NamedTuple):
    """Replicated PRNG keys of a run, ``split(key(config.seed), 3)``: init (fresh state), train (folded with the
    step inside the step function), extra (callbacks: sample grids, keep-best evaluations)."""
    init: jax.Array
    train: jax.Array
    extra: jax.Array


class Batches(Protocol):
    """A task's training data as the engine reads it: this process's rows of the global batch of each step.

    The global batch of step s is a function of (seed, s, data) alone; process p of P reads rows
    [p B / P, (p + 1) B / P). ``get_state`` / ``set_state`` carry the position (JSON) through checkpoints.
    """

    def batch(self, step: int) -> dict[str, np.ndarray]: ...

    def get_state(self) -> dict: ...

    def set_state(self, state: dict) -> str: ...  # returns a note for the log ('' when nothing to say)


class NoData:
    """The data of a task whose batches are made inside its step (e.g. trigger fine-tuning): empty batches."""

    def batch(self, step: int) -> dict[str, np.ndarray]:
        return {}

    def get_state(self) -> dict:
        return {}

    def set_state(self, state: dict) -> str:
        return ''


@dataclasses.dataclass
class Callback:
    """A periodic action: ``fn(step, state) -> scalars to log or None``, called after steps divisible by
    ``every`` (0 = never) and, when ``at_end``, after the last step. Scalars go to the progress line, metrics.jsonl
    and TensorBoard (``eval/`` tags). The time spent is left out of img/s."""
    name: str
    every: int
    fn: Callable[[int, Any], Optional[dict]]
    at_end: bool = True

    def due(self, step: int, total_steps: int) -> bool:
        """Whether to call after ``step`` (1-based count of steps taken)."""
        return bool((self.every and step % self.every == 0) or (self.at_end and step == total_steps))


@dataclasses.dataclass
class Setup:
    """What :meth:`Task.setup` returns.

    init: key -> fresh state, a pytree with an int32 () ``step`` (a flax struct's field or a dict key);
    step: (state, batch, key) -> (state, metrics): one update, unjitted (the engine jits it with the state's
        shardings, the batch split over the data axis, and donates the state); metrics: float scalars;
    data: :class:`Batches`; batch_size: the global batch (for img/s); total_steps: when the run is done;
    describe: lines logged at start (model, data, devices are added by the engine);
    callbacks: periodic actions (:class:`Callback`);
    progress: metric names shown in the progress line after the loss ({name: format spec});
    last: metric names logged as their last value in an interval (lr, a cumulative count); the others averaged;
    integers: metric names written as integers;
    nan_policy: 'raise' (a non-finite loss ends the run with one line, the last checkpoint kept and the bad state
        never saved) or 'count' (the step has already neutralised non-finite gradients and counted them in
        ``state.nonfinite`` and a last-value ``nonfinite`` metric, EDM's rule: the run goes on, unless every step of
        a stretch is non-finite: :class:`jaxdiff.engine.loop.NonfiniteStreak`);
    info: the DatasetInfo the model was built for (written to dataset_info.json), or None;
    done: called with the final state when the loop ends, finished or stopped by a signal (outputs that need a
        finished run belong in an at-end :class:`Callback`); its returned dict is merged into :func:`run`'s
        summary;
    compiler_options: XLA options for the jitted step (None = XLA's defaults).
    """
    init: Callable[[jax.Array], Any]
    step: Callable[[Any, dict, jax.Array], tuple[Any, dict]]
    data: Any
    batch_size: int
    total_steps: int
    describe: list[str] = dataclasses.field(default_factory=list)
    callbacks: list[Callback] = dataclasses.field(default_factory=list)
    progress: dict[str, str] = dataclasses.field(default_factory=dict)
    last: tuple[str, ...] = ('lr',)
    integers: tuple[str, ...] = ()
    nan_policy: str = 'raise'
    info: Any = None
    done: Optional[Callable[[Any], dict]] = None
    compiler_options: Optional[dict] = None


def unchanged(saved: dict) -> dict:
    """The saved config as it is (a task whose fields were never renamed)."""
    return saved


@dataclasses.dataclass(frozen=True)
class Task:
    """A trainable thing (module docstring)."""
    name: str
    schema: Callable[[], Any]
    check: Callable[[Any], None]
    setup: Callable[[Any, str, Any, RunKeys], Setup]
    upgrade: Callable[[dict], dict] = unchanged
    ranges: Mapping[str, Rule] = dataclasses.field(default_factory=dict)
    kind: str = ''     # what a run of this task is, for messages: 'diffusion model'
    use: str = ''      # what to do with such a run ('{dir}' stands for it), for a run passed where it does not fit
    configs: str = ''  # where its shipped configs are: 'configs/diffusion/*.py'


def state_step(state) -> Any:
    """The ``step`` leaf of a state (flax struct field or dict key)."""
    return state['step'] if isinstance(state, dict) else state.step
