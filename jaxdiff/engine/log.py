"""Training logs for every task: a progress line (step, loss, img/s, ETA and the task's chosen metrics),
TensorBoard scalars via tensorboardX in ``workdir/tb``, the same scalars as JSON lines in ``workdir/metrics.jsonl``,
and the parameter table (clu's ``parameter_overview``) at start.

Per-step metrics are accumulated on the device inside the jitted step with ``clu.metrics`` (:func:`accumulator`:
an Average per metric, LastValue for the task's ``last`` names), so nothing is fetched between log boundaries.

``metrics.jsonl`` holds one object per written interval: ``{"step", <metrics>, "img_per_s", <callback
scalars>, "time"}`` (``time`` in unix seconds; floats to 7 significant digits; non-finite values as ``null`` so the
file is strict JSON). Each line is flushed as written, so a killed run keeps its lines; a resumed run appends, so a
step may appear more than once and :func:`read_metrics` keeps the last row per step.

Only the primary process (process 0) prints and writes event files and JSON lines; the others construct a silent
logger.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Mapping, Optional, Sequence

import numpy as np

from jaxdiff.progress import format_eta

METRICS_FILE = 'metrics.jsonl'


def _format(name: str, value: float, spec: str) -> str:
    if name == 'nonfinite' or spec == 'd':
        return f'{name} {int(value)}' if math.isfinite(value) else f'{name} ?'
    return f'{name} {value:{spec}}'


def progress_line(step: int, total_steps: int, scalars: Mapping[str, float], eta_s: float,
                  fields: Optional[Mapping[str, str]] = None) -> str:
    """'step 1200/5000 | loss 0.4321 | 812.3 img/s | ETA 0:04:41 | lr 1.00e-03 | grad 0.53 | nonfinite 0'.

    fields: {metric name: format spec} shown after the ETA, in order (default: the diffusion task's lr, grad_norm
    (shown as 'grad') and nonfinite); names missing from ``scalars`` are skipped.
    """
    fields = dict(lr='.2e', grad_norm='.3g', nonfinite='d') if fields is None else fields
    speed = f'{scalars["img_per_s"]:.1f} img/s' if math.isfinite(scalars['img_per_s']) else '? img/s'
    parts = [f'step {step}/{total_steps}', f'loss {scalars["loss"]:.4f}', speed, f'ETA {format_eta(eta_s)}']
    parts += [_format('grad' if name == 'grad_norm' else name, float(scalars[name]), spec)
              for name, spec in fields.items() if name in scalars]
    return ' | '.join(parts)


def metrics_record(step: int, scalars: Mapping[str, float], unix_time: float,
                   integers: Sequence[str] = ('nonfinite',)) -> str:
    """One ``metrics.jsonl`` line (no newline): step, every scalar to 7 significant digits (``integers`` as ints),
    time; non-finite floats become null."""
    row: dict = {'step': int(step)}
    for name, value in scalars.items():
        if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
            row[name] = int(value)
            continue
        value = float(value)
        if not math.isfinite(value):
            row[name] = None
        elif name in integers:
            row[name] = int(value)  # a count: keep it an integer in the JSON
        else:
            # 7 digits: the float32 precision the device computed them in (1e-3, not 0.0010000000474974513).
            row[name] = float(f'{value:.7g}')
    row['time'] = float(unix_time)
    return json.dumps(row)


def read_metrics(path: str) -> list[dict]:
    """Rows of a ``metrics.jsonl`` file sorted by step, the last row kept per step (a resumed run rewrites the
    steps after its checkpoint). Lines that are not JSON objects with an integer step (e.g. a line cut short when a
    run was killed mid-write) are skipped."""
    rows: dict[int, dict] = {}
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and isinstance(row.get('step'), int):
                rows[row['step']] = row
    return [rows[step] for step in sorted(rows)]


def accumulator(names: Sequence[str], last: Sequence[str] = ()):
    """A ``clu.metrics.Collection`` class with one metric per name: ``LastValue`` for names in ``last``,
    ``Average`` (over steps and the batch's devices) otherwise. ``cls.empty()`` starts an interval,
    ``acc.merge(cls.single_from_model_output(**metrics))`` adds one step, ``acc.compute()`` -> {name: value}."""
    from clu import metrics as clu_metrics
    fields = {name: (clu_metrics.LastValue if name in last else clu_metrics.Average).from_output(name)
              for name in names}
    return clu_metrics.Collection.create(**fields)


def parameter_overview(params) -> str:
    """clu's table of a params pytree (name, shape, dtype, size per array) and the total count."""
    from clu import parameter_overview as overview
    return overview.get_parameter_overview(params, include_stats=False)


class MetricsLogger:
    """Writes one interval's metrics: :meth:`write` prints a progress line, writes TensorBoard scalars
    (``train/<name>``; callback scalars as ``eval/<name>``) and appends one line to ``workdir/metrics.jsonl``.

    Timing: :meth:`start_interval` marks the start of a measured interval; :meth:`pause` / :meth:`resume`
    exclude checkpointing, sampling and evaluation time from img/s.
    """

    def __init__(self, workdir: str, total_steps: int, batch_size: int, *, enabled: bool = True, stream=None,
                 fields: Optional[Mapping[str, str]] = None, integers: Sequence[str] = ('nonfinite',)):
        self.total_steps, self.batch_size, self.enabled = total_steps, batch_size, enabled
        self.fields, self.integers = fields, tuple(integers)
        self.stream = stream or sys.stdout
        self.writer = None
        self._jsonl = None
        if enabled:
            os.makedirs(workdir, exist_ok=True)
            try:
                from tensorboardX import SummaryWriter
                self.writer = SummaryWriter(os.path.join(workdir, 'tb'), flush_secs=30)
            except ImportError:  # TensorBoard files are optional; metrics.jsonl holds the same numbers
                self.writer = None
            # Append: a resumed run continues the file (readers keep the last row per step).
            self._jsonl = open(os.path.join(workdir, METRICS_FILE), 'a')
        self._t0: Optional[float] = None
        self._paused = 0.0
        self._pause_t: Optional[float] = None
        self._interval_start_step = 0

    def start_interval(self, step: int) -> None:
        """Start timing from ``step`` (call after the first, compiling step so img/s excludes compilation)."""
        self._t0, self._paused, self._interval_start_step = time.perf_counter(), 0.0, step

    def pause(self) -> None:
        """Stop the clock (checkpointing, sampling) until :meth:`resume`."""
        self._pause_t = time.perf_counter()

    def resume(self) -> None:
        """Restart the clock stopped by :meth:`pause`."""
        if self._pause_t is not None:
            self._paused += time.perf_counter() - self._pause_t
            self._pause_t = None

    def img_per_s(self, step: int) -> float:
        """Images per second since :meth:`start_interval` (nan before the first measured step)."""
        if self._t0 is None or step <= self._interval_start_step:
            return float('nan')
        elapsed = max(time.perf_counter() - self._t0 - self._paused, 1e-9)
        return (step - self._interval_start_step) * self.batch_size / elapsed

    def write(self, step: int, scalars: Mapping[str, float], extra: Optional[Mapping[str, float]] = None) -> dict:
        """Log one interval: ``scalars`` (host floats, the interval's metrics) plus img/s and ``extra`` (callback
        scalars). Returns the logged dict."""
        row = {name: float(value) for name, value in scalars.items()}
        row['img_per_s'] = self.img_per_s(step)
        eta = (self.total_steps - step) * self.batch_size / row['img_per_s'] if row['img_per_s'] > 0 \
            else float('nan')
        extra = {name: value if isinstance(value, int) else float(value) for name, value in (extra or {}).items()}
        if self.enabled:
            line = progress_line(step, self.total_steps, row, eta, self.fields)
            if extra:
                line += ' | ' + ' | '.join(f'{name} {value:.4g}' for name, value in extra.items())
            print(line, file=self.stream, flush=True)
            if self.writer is not None:
                for name, value in row.items():
                    if math.isfinite(value):
                        self.writer.add_scalar(f'train/{name}', value, step)
                for name, value in extra.items():
                    if math.isfinite(value):
                        self.writer.add_scalar(f'eval/{name}', value, step)
            self._jsonl.write(metrics_record(step, {**row, **extra}, time.time(), self.integers) + '\n')
            self._jsonl.flush()  # per line: a killed run keeps every interval it logged
        self.start_interval(step)
        return {**row, **extra}

    def info(self, message: str) -> None:
        """Print a line (primary process only)."""
        if self.enabled:
            print(message, file=self.stream, flush=True)

    def close(self) -> None:
        """Flush and close the event file and ``metrics.jsonl`` (idempotent)."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
