"""The run report as a function: :func:`build_report` writes one self-contained HTML page summarising a training
run (``python -m eval.report`` parses the flags; its docstring lists the sections).
"""
from __future__ import annotations

import datetime
import glob
import io
import json
import math
import os
import re
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from jaxdiff import files
from jaxdiff.evaluation.html import (READ_ERRORS, cell, esc, figure, flatten, format_value, key_value_table,
                                     png_bytes, read_json, read_json_object, read_png, reason, render_page,
                                     unavailable, write_text)
from jaxdiff.engine.log import METRICS_FILE, read_metrics
from jaxdiff.tasks.sample_grid import class_layout, grid_image

KEY_FIELDS = ('data.source', 'model.arch', 'model.model_channels', 'batch_size', 'total_steps')
METRIC_ORDER = ('label', 'features', 'fid', 'fd', 'is', 'precision', 'recall', 'num_samples')
SHARD_PREVIEW = 100        # images taken from the first shard when a sample folder has no grid.png
EARLIER_GRIDS = 3          # training grids shown besides the latest



# ----------------------------------------------------------------------------------------------- header

def checkpoint_steps(workdir: str) -> list[int]:
    """Steps of ``workdir/checkpoints/<step>/`` directories, ascending (orbax tmp dirs are not steps)."""
    directory = os.path.join(workdir, 'checkpoints')
    if not os.path.isdir(directory):
        return []
    return sorted(int(n) for n in os.listdir(directory)
                  if n.isdigit() and os.path.isdir(os.path.join(directory, n)))


def header_section(workdir: str, written: str) -> str:
    """Run name, date, key config fields with the last checkpoint step, and the full config collapsed."""
    name = os.path.basename(os.path.abspath(workdir))
    parts = [f'<h1>{esc(name)}</h1>',
             f'<p class="meta">report written {esc(written)} from {esc(os.path.abspath(workdir))}</p>']
    path = os.path.join(workdir, 'config.json')
    config: dict = {}
    if not os.path.exists(path):
        parts.append(unavailable(f'config: no config.json in {workdir}'))
    else:
        try:
            config = read_json_object(path)
        except READ_ERRORS as e:
            parts.append(unavailable(f'{path}: {reason(e)}'))
    fields = flatten(config)
    steps = checkpoint_steps(workdir)
    summary = {key: fields[key] for key in KEY_FIELDS if key in fields}
    summary['last checkpoint'] = steps[-1] if steps else 'none'
    parts.append(key_value_table(summary))
    if config:
        parts.append('<details><summary>full config</summary><pre>'
                     f'{esc(json.dumps(config, indent=2, sort_keys=True))}</pre></details>')
    return '\n'.join(parts)


# ----------------------------------------------------------------------------------------------- loss curve

def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def loss_plot_png(rows: Sequence[Mapping]) -> bytes:
    """Two panels against step: loss (log scale when every value is positive) and img/s; as PNG bytes."""
    # Figure + the Agg canvas directly, not pyplot: no global backend switch, no figure registry to leak into.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FormatStrFormatter
    fig = Figure(figsize=(10, 3.4), dpi=100)
    FigureCanvasAgg(fig)
    ax_loss, ax_speed = fig.subplots(1, 2)
    for ax, key, title in ((ax_loss, 'loss', 'loss'), (ax_speed, 'img_per_s', 'img/s')):
        points = [(r['step'], r[key]) for r in rows if _finite(r.get(key))]
        if points:
            steps, values = zip(*points)
            ax.plot(steps, values, marker='.' if len(points) < 50 else None, linewidth=1.2)
            if key == 'loss' and min(values) > 0:
                ax.set_yscale('log')
                # Plain numbers (0.4, not 4x10^-1) on the few decades a loss spans.
                ax.yaxis.set_major_formatter(FormatStrFormatter('%g'))
                ax.yaxis.set_minor_formatter(FormatStrFormatter('%g'))
        else:
            ax.text(0.5, 0.5, 'no values', ha='center', va='center', transform=ax.transAxes)
        ax.set_xlabel('step')
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format='png')
    return buffer.getvalue()


def loss_section(workdir: str) -> str:
    """The loss / img/s plot from ``metrics.jsonl`` and a line with the last logged values."""
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.exists(path):
        tb = os.path.join(workdir, 'tb')
        hint = f' (older runs log to TensorBoard only: tensorboard --logdir {tb})' if os.path.isdir(tb) else ''
        return unavailable(f'no {METRICS_FILE} in {workdir}{hint}')
    try:
        rows = read_metrics(path)
    except READ_ERRORS as e:
        return unavailable(f'{path}: {reason(e)}')
    if not rows:
        return unavailable(f'{path}: no complete rows')
    last = rows[-1]
    summary = (f'{len(rows)} logged steps; last step {last["step"]}: loss {format_value(last.get("loss"))}, '
               f'{format_value(last.get("img_per_s"))} img/s, nonfinite {format_value(last.get("nonfinite"))}')
    return figure(loss_plot_png(rows), 'loss and img/s against step', 'plot') + f'<p>{esc(summary)}</p>'


# ----------------------------------------------------------------------------------------------- training grids

def training_grids(workdir: str) -> list[tuple[int, str]]:
    """(step, path) of ``workdir/samples/step_<step>.png``, ascending."""
    pattern = re.compile(r'step_(\d+)\.png$')
    directory = os.path.join(workdir, 'samples')
    if not os.path.isdir(directory):
        return []
    found = ((pattern.match(n), n) for n in os.listdir(directory))
    return sorted((int(m.group(1)), os.path.join(directory, n)) for m, n in found if m)


def pick_grids(items: Sequence, earlier: int = EARLIER_GRIDS) -> list:
    """The last item and up to ``earlier`` earlier ones spread evenly from the first, in order."""
    if len(items) <= earlier + 1:
        return list(items)
    picks = sorted(set(np.linspace(0, len(items) - 2, earlier).round().astype(int).tolist()))
    return [items[i] for i in picks] + [items[-1]]


def training_grids_section(workdir: str) -> str:
    """The latest training sample grid first, then the earlier picks in step order."""
    grids = training_grids(workdir)
    if not grids:
        return unavailable(f'no samples/step_*.png in {workdir}')
    chosen = pick_grids(grids)
    latest, earlier = chosen[-1], chosen[:-1]
    parts = []
    for step, path in [latest] + earlier:
        try:
            png = read_png(path)
        except READ_ERRORS as e:
            parts.append(unavailable(f'{path}: {reason(e)}'))
            continue
        parts.append(figure(png, f'step {step}' + (' (latest)' if (step, path) == latest else '')))
    note = f'<p class="meta">{len(grids)} grids in {esc(os.path.join(workdir, "samples"))}; showing {len(chosen)}</p>'
    return note + '\n'.join(parts)


# ----------------------------------------------------------------------------------------------- sample folders

def shard_preview(shard_path: str, limit: int = SHARD_PREVIEW) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """The first ``limit`` images (uint8 NHWC) and labels (or None) of a sample shard; raises ValueError on bad data."""
    shard = files.read_npz(shard_path, 'a sample shard')
    if 'images' not in shard:
        raise ValueError(f'{shard_path} has no images array (found {sorted(shard)})')
    images = shard['images'][:limit]
    labels = shard['labels'][:limit] if 'labels' in shard else None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3, 4) or not len(images):
        raise ValueError(f'images must be non-empty uint8 (N, H, W, C) with C in 1, 3, 4; got {images.dtype} '
                         f'{images.shape}')
    if labels is not None and labels.size == 0:
        labels = None
    if labels is not None and labels.shape != (len(images),):
        raise ValueError(f'labels must be ({len(images)},) to match the images; got {labels.shape}')
    return images, labels


def folder_grid(directory: str) -> str:
    """``grid.png`` when the folder has one, else a grid built from the first shard."""
    grid_path = os.path.join(directory, 'grid.png')
    if os.path.exists(grid_path):
        try:
            return figure(read_png(grid_path), 'grid.png')
        except READ_ERRORS as e:
            return unavailable(f'{grid_path}: {reason(e)}')
    shards = sorted(glob.glob(os.path.join(glob.escape(directory), 'shard-*.npz')))
    if not shards:
        return unavailable(f'no grid.png and no shard-*.npz in {directory}')
    try:
        images, labels = shard_preview(shards[0])
    except READ_ERRORS as e:
        return unavailable(f'{shards[0]}: {reason(e)}')
    tiles, columns = class_layout(images, labels)
    by_class = labels is not None and columns == len(np.unique(labels))
    caption = (f'first {len(images)} images of {os.path.basename(shards[0])}'
               + (', one column per class' if by_class else ''))
    return figure(png_bytes(grid_image(tiles, columns)), caption)


def folder_manifest(directory: str) -> str:
    """The fields of ``manifest.json`` (nested dicts flattened to dotted names) and the shard count on disk."""
    shards = len(glob.glob(os.path.join(glob.escape(directory), 'shard-*.npz')))
    on_disk = f'<p class="meta">{shards} shard file(s) on disk</p>'
    path = os.path.join(directory, 'manifest.json')
    if not os.path.exists(path):
        return unavailable(f'no manifest.json in {directory}') + on_disk
    try:
        manifest = read_json_object(path)
    except READ_ERRORS as e:
        return unavailable(f'{path}: {reason(e)}') + on_disk
    return key_value_table(flatten(manifest)) + on_disk


def samples_section(directories: Sequence[str]) -> str:
    """One subsection per ``--samples`` folder: its grid and its manifest."""
    if not directories:
        return unavailable('no --samples folders given')
    parts = []
    for directory in directories:
        parts.append(f'<h3>{esc(directory)}</h3>')
        if not os.path.isdir(directory):
            parts.append(unavailable(f'{directory}: no such directory'))
            continue
        parts += [folder_grid(directory), folder_manifest(directory)]
    return '\n'.join(parts)


# ----------------------------------------------------------------------------------------------- metrics

def metric_objects(path: str) -> list[dict]:
    """The metric objects in a JSON file holding one object or a list of objects (raises on anything else)."""
    data = read_json(path)
    objects = data if isinstance(data, list) else [data]
    if not all(isinstance(o, dict) for o in objects):
        raise ValueError('expected a JSON object or a list of JSON objects')
    return objects


def metric_columns(rows: Sequence[Mapping]) -> list[str]:
    """The union of the rows' keys: :data:`METRIC_ORDER` first (those present), then the rest alphabetically."""
    keys = {key for row in rows for key in row}
    return [k for k in METRIC_ORDER if k in keys] + sorted(keys - set(METRIC_ORDER))


def metrics_table(entries: Sequence[tuple[str, Mapping]]) -> str:
    """One row per (file, metric object); nested values flattened to dotted columns; the file in the last column."""
    rows = [flatten(obj) for _, obj in entries]
    columns = metric_columns(rows)
    head = ''.join(f'<th>{esc(c)}</th>' for c in columns) + '<th>file</th>'
    body = ''.join('<tr>' + ''.join(cell(row[c]) if c in row else '<td></td>' for c in columns)
                   + f'<td class="file">{esc(source)}</td></tr>' for (source, _), row in zip(entries, rows))
    return f'<table><tr>{head}</tr>{body}</table>'


def unique_paths(paths: Sequence[str]) -> list[str]:
    """``paths`` in order without the ones naming a file already listed (same real path)."""
    seen: set[str] = set()
    unique = []
    for path in paths:
        if os.path.realpath(path) not in seen:
            seen.add(os.path.realpath(path))
            unique.append(path)
    return unique


def metrics_section(workdir: str, metric_files: Sequence[str]) -> str:
    """Every object from ``workdir/eval/*.json`` and the ``--metrics`` files in one table; unreadable files listed."""
    paths = sorted(glob.glob(os.path.join(glob.escape(workdir), 'eval', '*.json'))) + list(metric_files)
    paths = unique_paths(paths)  # a --metrics file may also be one of RUN/eval/*.json: its rows once
    if not paths:
        return unavailable(f'no eval/*.json in {workdir} and no --metrics files given')
    entries, problems = [], []
    for path in paths:
        try:
            entries += [(path, obj) for obj in metric_objects(path)]
        except READ_ERRORS as e:
            problems.append(unavailable(f'{path}: {reason(e)}'))
    table = metrics_table(entries) if entries else unavailable('no metric objects in ' + ', '.join(paths))
    return table + '\n'.join(problems)


# ----------------------------------------------------------------------------------------------- page


def build_report(workdir: str, samples_dirs: Sequence[str] = (), metric_files: Sequence[str] = (),
                 out: Optional[str] = None) -> str:
    """Write the HTML report of run ``workdir`` to ``out`` (default ``workdir/report.html``); returns its path.

    Raises FileNotFoundError when ``workdir`` is not a directory; missing or corrupt inputs show in the page.
    """
    if not os.path.isdir(workdir):
        raise FileNotFoundError(f'workdir {workdir!r} is not a directory (pass the --workdir of a train.py run)')
    out = out or os.path.join(workdir, 'report.html')
    written = datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M:%S %Z')
    sections = [(None, header_section(workdir, written)),
                ('Training loss', loss_section(workdir)),
                ('Training sample grids', training_grids_section(workdir)),
                ('Sample folders', samples_section(samples_dirs)),
                ('Metrics', metrics_section(workdir, metric_files))]
    write_text(out, render_page(f'{os.path.basename(os.path.abspath(workdir))}: jaxdiff run report', sections))
    return out
