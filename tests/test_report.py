"""metrics.jsonl (written by MetricsLogger, read back last-row-per-step) and the HTML run report of eval.report,
on a fake run directory: no training, no network."""
import base64
import io
import json
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from eval import report as report_cli
from jaxdiff.evaluation import html, report
from jaxdiff.engine import log as logs

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
EVIL = "<script>alert('x')</script>"
IMG_SRC = re.compile(r'<img[^>]*src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


def log_intervals(workdir, intervals, start=None):
    """Drive a MetricsLogger: for each (step, loss) write one interval of fake scalars."""
    logger = logs.MetricsLogger(str(workdir), total_steps=1000, batch_size=8, stream=io.StringIO())
    if start is not None:
        logger.start_interval(start)
    for step, loss in intervals:
        logger.write(step, {'loss': np.float32(loss), 'grad_norm': np.float32(0.5), 'lr': np.float32(1e-3),
                            'nonfinite': 0})
    logger.close()


def png_file(path, value, size=(20, 30)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.full(size, value, np.uint8)).save(path)


@pytest.fixture
def run(tmp_path):
    """A run dir as train.py leaves it (plus metrics.jsonl, eval/a.json), a sample folder, a --metrics list file."""
    workdir = tmp_path / 'digits_run'
    workdir.mkdir()
    config = {'batch_size': 128, 'total_steps': 600, 'data': {'source': 'digits', 'path': EVIL},
              'model': {'arch': 'ddpmpp', 'model_channels': 32, 'channel_mult': [1, 2]}}
    (workdir / 'config.json').write_text(json.dumps(config))
    for name in ('100', '600', '700.orbax-checkpoint-tmp-1700000000'):
        (workdir / 'checkpoints' / name).mkdir(parents=True)
    log_intervals(workdir, [(100, 1.0), (200, 0.6), (300, 0.4)], start=0)
    log_intervals(workdir, [(300, 0.35), (400, 0.3), (500, 0.25), (600, 0.2)])  # resumed from the step-200 ckpt
    for i, step in enumerate(range(100, 700, 100)):
        png_file(str(workdir / 'samples' / f'step_{step:07d}.png'), 40 * i)
    (workdir / 'eval').mkdir()
    (workdir / 'eval' / 'a.json').write_text(json.dumps(
        {'fd': 12.3456789, 'features': 'digits_classifier', 'samples': 'out/demo/samples', 'ref': 'digits:train',
         'num_samples': 2000, 'label': EVIL}))

    samples = tmp_path / 'samples'
    samples.mkdir()
    labels = np.arange(30, dtype=np.int32) % 3
    images = np.repeat((labels * 100).astype(np.uint8)[:, None, None, None], 64, axis=1).reshape(30, 8, 8, 1)
    np.savez(samples / 'shard-00000.npz', images=images, labels=labels, seeds=np.arange(30, dtype=np.int64))
    (samples / 'manifest.json').write_text(json.dumps(
        {'num_samples': 30, 'shards': 1, 'checkpoint': 'digits_run/checkpoints/600',
         'solver': {'name': 'heun', 'num_steps': 18, 'S_churn': 0.0, 'guidance': {'scale': 1.5}}, 'seeds': [0, 29]}))
    gridded = tmp_path / 'gridded'
    png_file(str(gridded / 'grid.png'), 200, size=(50, 50))

    extra = tmp_path / 'extra.json'
    extra.write_text(json.dumps([{'fid': 2.123456, 'is': 9.87654, 'is_std': 0.1, 'precision': 0.7, 'recall': 0.6,
                                  'label': 'EDM heun 18', 'num_samples': 50000},
                                 {'fid': 3.5, 'label': 'no guidance', 'notes': {'seed': 1}}]))
    return dict(workdir=workdir, samples=samples, gridded=gridded, extra=extra)


def make_report(run, capsys, *extra_args):
    args = ['--workdir', str(run['workdir']), '--samples', str(run['samples']), '--samples', str(run['gridded']),
            '--metrics', str(run['extra']), *extra_args]
    assert report_cli.main(args) == 0
    out = capsys.readouterr().out.strip().splitlines()
    with open(out[-1], encoding='utf-8') as f:
        return out[-1], f.read()


def images_in(page):
    """The decoded <img> PNGs of a page, in order."""
    decoded = []
    for data in IMG_SRC.findall(page):
        image = Image.open(io.BytesIO(base64.b64decode(data)))
        image.load()
        assert image.format == 'PNG'
        decoded.append(image)
    return decoded


# ----------------------------------------------------------------------------------------------- metrics.jsonl

def test_metrics_jsonl_lines_and_resume(run):
    before = time.time()
    path = run['workdir'] / 'metrics.jsonl'
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r['step'] for r in lines] == [100, 200, 300, 300, 400, 500, 600]  # appended on resume
    assert set(lines[0]) == {'step', 'loss', 'lr', 'grad_norm', 'img_per_s', 'nonfinite', 'time'}
    assert lines[0]['loss'] == pytest.approx(1.0) and lines[0]['lr'] == pytest.approx(1e-3)
    assert lines[0]['nonfinite'] == 0 and isinstance(lines[0]['nonfinite'], int)
    assert lines[0]['img_per_s'] > 0
    assert lines[3]['img_per_s'] is None  # no timed interval yet after the restart: NaN is written as null
    assert before - 600 < lines[-1]['time'] <= time.time()

    rows = logs.read_metrics(str(path))
    assert [r['step'] for r in rows] == [100, 200, 300, 400, 500, 600]
    assert rows[2]['loss'] == pytest.approx(0.35)  # the resumed run's row for step 300 wins


def test_read_metrics_skips_a_cut_line(tmp_path):
    path = tmp_path / 'metrics.jsonl'
    path.write_text('{"step": 1, "loss": 0.5}\nnot json\n[1, 2]\n{"step": 2, "loss": 0.4}\n{"step": 3, "lo')
    assert [r['step'] for r in logs.read_metrics(str(path))] == [1, 2]


def test_silent_logger_writes_no_file(tmp_path):
    logger = logs.MetricsLogger(str(tmp_path), 10, 2, enabled=False)
    logger.write(1, {'loss': 1.0, 'grad_norm': 1.0, 'lr': 1.0, 'nonfinite': 0})
    logger.close()
    assert not (tmp_path / 'metrics.jsonl').exists()


# ----------------------------------------------------------------------------------------------- the report

def test_report_contents(run, capsys):
    path, page = make_report(run, capsys, '--metrics', str(run['workdir'] / 'eval' / 'a.json'))
    assert path == str(run['workdir'] / 'report.html')
    assert '<h1>digits_run</h1>' in page
    for field in ('data.source', 'digits', 'model.arch', 'ddpmpp', 'model.model_channels', 'batch_size',
                  'total_steps', 'last checkpoint', 'full config'):
        assert field in page
    assert re.search(r'last checkpoint</th><td[^>]*>600<', page)  # the tmp dir of an unfinished save is no step

    # metrics: 4 significant digits, and every object of the list file has a row
    for text in ('12.35', 'digits_classifier', '2000', '2.123', '9.877', '0.7', '50000', 'EDM heun 18', 'no guidance',
                 'notes.seed'):
        assert text in page
    assert page.count('12.35') == 1  # eval/a.json also passed as --metrics: its row once
    header = re.search(r'<table><tr>((?:<th>[^<]*</th>)+)</tr><tr><td', page.split('<h2>Metrics</h2>')[1]).group(1)
    assert re.findall(r'<th>([^<]*)</th>', header) == [
        'label', 'features', 'fid', 'fd', 'is', 'precision', 'recall', 'num_samples', 'is_std', 'notes.seed', 'ref',
        'samples', 'file']

    # manifest: top-level scalars and nested dicts flattened
    for text in ('num_samples', 'solver.name', 'heun', 'solver.num_steps', 'solver.guidance.scale', '1.5',
                 '[0, 29]', '1 shard file(s) on disk'):
        assert text in page

    # escaping: the label and the config value stay text
    assert '<script>' not in page
    assert '&lt;script&gt;' in page

    # loss plot + latest and 3 earlier training grids + 2 sample-folder grids
    images = images_in(page)
    assert len(images) == len(re.findall('<img', page)) == 7
    captions = re.findall(r'<figcaption>([^<]*)</figcaption>', page)
    assert captions[1:5] == ['step 600 (latest)', 'step 100', 'step 300', 'step 500']
    assert page.count('not available') == 1 and f'not available: no manifest.json in {run["gridded"]}' in page


def test_shard_grid_columns_are_classes(run, capsys):
    _, page = make_report(run, capsys)
    grid = np.asarray(images_in(page)[5])  # the first sample folder's grid, built from its shard
    tile = 8 * 4 + 2  # 8x8 images upscaled to 32 pixels plus the 2-pixel gap
    assert grid.shape[:2] == (10 * tile + 2, 3 * tile + 2)  # 30 images, 3 classes: 3 columns of 10
    centres = grid[tile // 2::tile, tile // 2::tile]
    assert (centres == np.array([0, 100, 200])).all()  # column j holds class j only


def test_class_layout_unbalanced_and_unlabelled():
    images = np.arange(5, dtype=np.uint8).reshape(5, 1, 1, 1) + 1
    tiles, columns = report.class_layout(images, np.array([1, 0, 1, 1, 0]))
    assert columns == 2
    assert tiles[:, 0, 0, 0].tolist() == [2, 1, 5, 3, 0, 4]  # rows: r-th image of each class, blank when short
    tiles, columns = report.class_layout(images, None)
    assert columns == 3 and tiles is images
    tiles, columns = report.class_layout(images, np.zeros(5, int))  # one class: a square grid, not one column
    assert columns == 3


def test_pick_grids_spread():
    assert report.pick_grids([1, 2, 3]) == [1, 2, 3]
    assert report.pick_grids(list(range(10))) == [0, 4, 8, 9]


def test_format_value():
    assert [html.format_value(v) for v in (0.123456, 12345.678, 2000, True, None, [1, 2.5], list(range(20)))] == [
        '0.1235', '1.235e+04', '2000', 'true', 'null', '[1, 2.5]', '[20 items]']


def test_corrupt_inputs_are_reported_and_the_rest_renders(run, capsys, tmp_path):
    workdir = run['workdir']
    (workdir / 'eval' / 'b.json').write_text('{"fid": 1.0')
    (workdir / 'samples' / 'step_0000700.png').write_bytes(b'\x89PNG\r\n\x1a\n garbage')
    (run['samples'] / 'manifest.json').write_text('[1, 2]')
    (workdir / 'config.json').write_text('{"batch_size": ')
    missing = tmp_path / 'missing.json'
    out = tmp_path / 'reports' / 'r.html'
    listing = sorted((p, p.stat().st_mtime_ns) for p in workdir.rglob('*'))
    path, page = make_report(run, capsys, '--metrics', str(missing), '--out', str(out))
    assert path == str(out)
    assert sorted((p, p.stat().st_mtime_ns) for p in workdir.rglob('*')) == listing  # the run is only read

    assert f'not available: {workdir / "eval" / "b.json"}: ' in page
    assert f'not available: {workdir / "samples" / "step_0000700.png"}: ' in page
    assert f'not available: {run["samples"] / "manifest.json"}: not a JSON object' in page
    assert f'not available: {missing}: No such file or directory' in page
    assert f'not available: {workdir / "config.json"}: ' in page and 'last checkpoint' in page
    assert '12.35' in page and '2.123' in page  # the readable metric files still fill the table
    assert len(images_in(page)) == 6  # the corrupt latest grid is the one missing


def test_empty_run_dir_reports_each_section_unavailable(tmp_path, capsys):
    workdir = tmp_path / 'empty'
    workdir.mkdir()
    assert report_cli.main(['--workdir', str(workdir)]) == 0
    page = (workdir / 'report.html').read_text()
    assert page.count('not available: ') == 5  # config, loss, grids, sample folders, metrics
    assert '<img' not in page


def test_missing_workdir_is_one_error_line(tmp_path, monkeypatch, capsys):
    """One 'eval.report: error:' line and exit 2 (cli.fail's exit made a SystemExit here: the CLI in this process)."""
    from jaxdiff import cli as cli_module

    def fail(prog, message, code):
        raise SystemExit((code, f'{prog}: error: {message}'))
    monkeypatch.setattr(report_cli, 'fail', fail)
    monkeypatch.setattr(cli_module, 'fail', fail)  # argument errors
    for argv, needle in ((['--workdir', str(tmp_path / 'nope')], 'nope'), (['--samples', 'x'], '--workdir')):
        with pytest.raises(SystemExit) as exit:
            report_cli.main(argv)
        code, line = exit.value.code
        assert code == 2 and line.startswith('eval.report: error:') and needle in line, line
    assert capsys.readouterr().out == ''


def test_cli_prints_path_last(run):
    out = run['workdir'].parent / 'cli.html'
    result = subprocess.run([sys.executable, '-m', 'eval.report', '--workdir', str(run['workdir']), '--out', str(out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == str(out)
    assert out.read_text().startswith('<!DOCTYPE html>')
