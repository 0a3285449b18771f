"""Training logs: a progress line (step, loss, img/s, ETA, lr, non-finite count), TensorBoard scalars via
tensorboardX in ``workdir/tb``, the same scalars as JSON lines in ``workdir/metrics.jsonl``, and the parameter
overview printed at start.

``metrics.jsonl`` holds one object per written interval, ``{"step", "loss", "lr", "grad_norm", "img_per_s",
"nonfinite", "time"}`` (``time`` in unix seconds; non-finite values as ``null`` so the file is strict JSON). Each
line is flushed as written, so a killed run keeps its lines; a resumed run appends, so a step may appear more than
once and :func:`read_metrics` keeps the last row per step.

Only the primary process (process 0) prints and writes event files and JSON lines; the others construct a silent
logger.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import sys
import time
from typing import Mapping, Optional

import numpy as np

SCALARS = ('loss', 'lr', 'grad_norm', 'img_per_s', 'nonfinite')
METRICS_FILE = 'metrics.jsonl'


def format_eta(seconds: float) -> str:
    """Seconds -> 'H:MM:SS' (or '?' when unknown)."""
    if not np.isfinite(seconds) or seconds < 0:
        return '?'
    return str(datetime.timedelta(seconds=int(round(seconds))))


def progress_line(step: int, total_steps: int, scalars: Mapping[str, float], eta_s: float) -> str:
    """'step 1200/5000 | loss 0.4321 | 812.3 img/s | ETA 0:04:41 | lr 1.00e-03 | grad 0.53 | nonfinite 0'."""
    return (f'step {step}/{total_steps} | loss {scalars["loss"]:.4f} | {scalars["img_per_s"]:.1f} img/s | '
            f'ETA {format_eta(eta_s)} | lr {scalars["lr"]:.2e} | grad {scalars["grad_norm"]:.3g} | '
            f'nonfinite {int(scalars["nonfinite"])}')


def metrics_record(step: int, scalars: Mapping[str, float], unix_time: float) -> str:
    """One ``metrics.jsonl`` line (no newline): step, the :data:`SCALARS` to 7 significant digits, time; non-finite
    floats become null."""
    row = {'step': int(step)}
    for name in SCALARS:
        value = float(scalars[name])
        # 7 digits: the float32 precision the device computed them in (1e-3, not 0.0010000000474974513).
        row[name] = float(f'{value:.7g}') if math.isfinite(value) else None
    row['nonfinite'] = int(scalars['nonfinite'])  # a count: keep it an integer in the JSON
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


class MetricsLogger:
    """Accumulates per-step metrics and, every call to :meth:`write`, prints a progress line, writes
    TensorBoard scalars (tags: ``train/loss``, ``train/lr``, ``train/grad_norm``, ``train/img_per_s``,
    ``train/nonfinite`` — the last one cumulative) and appends one line to ``workdir/metrics.jsonl``.

    Timing: :meth:`start_interval` marks the start of a measured interval; :meth:`pause` / :meth:`resume`
    exclude checkpointing and sampling time from img/s.
    """

    def __init__(self, workdir: str, total_steps: int, batch_size: int, *, enabled: bool = True,
                 stream=None):
        self.total_steps, self.batch_size, self.enabled = total_steps, batch_size, enabled
        self.stream = stream or sys.stdout
        self.writer = None
        self._jsonl = None
        if enabled:
            from tensorboardX import SummaryWriter
            self.writer = SummaryWriter(os.path.join(workdir, 'tb'), flush_secs=30)
            os.makedirs(workdir, exist_ok=True)
            # Append: a resumed run continues the file (readers keep the last row per step).
            self._jsonl = open(os.path.join(workdir, METRICS_FILE), 'a')
        self._pending: list[Mapping] = []
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

    def record(self, metrics: Mapping) -> None:
        """Keep one step's metrics (device scalars; fetched only at :meth:`write`)."""
        self._pending.append(metrics)

    def write(self, step: int, nonfinite_total: int) -> Optional[dict]:
        """Average the pending metrics, print the progress line, write the scalars; returns them (or None)."""
        if not self._pending:
            return None
        import jax  # local: keeps this module importable without initialising a backend
        fetched = jax.device_get(self._pending)
        self._pending = []
        now = time.perf_counter()
        if self._t0 is None or step <= self._interval_start_step:
            img_per_s = float('nan')
        else:
            elapsed = max(now - self._t0 - self._paused, 1e-9)
            img_per_s = (step - self._interval_start_step) * self.batch_size / elapsed
        scalars = dict(loss=float(np.mean([m['loss'] for m in fetched])),
                       grad_norm=float(np.mean([m['grad_norm'] for m in fetched])),
                       lr=float(fetched[-1]['lr']), img_per_s=img_per_s, nonfinite=int(nonfinite_total))
        eta = (self.total_steps - step) * self.batch_size / img_per_s if img_per_s > 0 else float('nan')
        if self.enabled:
            print(progress_line(step, self.total_steps, scalars, eta), file=self.stream, flush=True)
            for name in SCALARS:
                if np.isfinite(scalars[name]):
                    self.writer.add_scalar(f'train/{name}', scalars[name], step)
            self._jsonl.write(metrics_record(step, scalars, time.time()) + '\n')
            self._jsonl.flush()  # per line: a killed run keeps every interval it logged
        self.start_interval(step)
        return scalars

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


def parameter_overview(params, max_rows: int = 40) -> str:
    """A short table of parameter counts per top-level module (and the total), for a params pytree.

    Example::

        module        params     shape-of-largest
        map_layer0     66,048    (128, 512)
        ...
        total      55,734,147
    """
    import jax
    rows = []
    for name, sub in (params.items() if isinstance(params, Mapping) else [('params', params)]):
        leaves = jax.tree.leaves(sub)
        count = int(sum(np.prod(np.shape(x)) for x in leaves))
        largest = max(leaves, key=lambda x: np.prod(np.shape(x))) if leaves else None
        rows.append((str(name), count, tuple(np.shape(largest)) if largest is not None else ()))
    total = sum(r[1] for r in rows)
    width = max([len(r[0]) for r in rows] + [6])
    lines = [f'{"module":<{width}}  {"params":>12}  largest']
    shown = rows if len(rows) <= max_rows else rows[:max_rows - 1]
    lines += [f'{n:<{width}}  {c:>12,}  {s}' for n, c, s in shown]
    if len(shown) < len(rows):
        rest = rows[len(shown):]
        lines.append(f'{f"... {len(rest)} more":<{width}}  {sum(r[1] for r in rest):>12,}')
    lines.append(f'{"total":<{width}}  {total:>12,}')
    return '\n'.join(lines)
