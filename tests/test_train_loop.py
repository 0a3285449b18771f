"""The training loop in-process: logs (TensorBoard scalars, PNG grids, progress line), config checks, checkpoint
fingerprints, fallback past a damaged checkpoint, the gmm2d MLP path. Tiny configs; CPU."""
import importlib.util
import json
import os
import struct

import numpy as np
import pytest
from PIL import Image

from conftest import truncate_largest_file
from jaxdiff.engine import checkpoint as ckpt
from jaxdiff.engine import log as logs
from jaxdiff.engine import signals
from jaxdiff.tasks import registry
from jaxdiff.tasks import sample_grid

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
# orbax leaves un-awaited read coroutines behind when a damaged checkpoint fails to restore; harmless here.


def load_config(path, **overrides):
    spec = importlib.util.spec_from_file_location('cfg', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split('.')
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


def tiny(**overrides):
    return load_config(os.path.join(HERE, 'tiny', 'denoiser.py'), **overrides)


def read_scalars(tb_dir):
    """{tag: [(step, value)]} from tensorboardX event files (TFRecord framing, Event protos)."""
    from tensorboardX.proto import event_pb2
    out = {}
    for name in sorted(os.listdir(tb_dir)):
        with open(os.path.join(tb_dir, name), 'rb') as f:
            data = f.read()
        pos = 0
        while pos + 12 <= len(data):
            (length,) = struct.unpack('<Q', data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for v in event.summary.value:
                out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


@pytest.fixture(scope='module')
def trained(tiny_runs):
    """The session's 20-step tiny denoiser run: a sample grid at 20 and checkpoints at 10 and 20 (copy to change)."""
    return tiny_runs('denoiser')


def test_run_writes_tensorboard_scalars_png_and_checkpoints(trained):
    workdir, summary = trained
    assert summary['step'] == 20 and summary['resumed_from'] is None
    scalars = read_scalars(os.path.join(workdir, 'tb'))
    for tag in ('loss', 'lr', 'grad_norm', 'img_per_s', 'nonfinite'):
        assert f'train/{tag}' in scalars, scalars.keys()
    assert [s for s, _ in scalars['train/loss']] == [10, 20]
    assert all(np.isfinite(v) for _, v in scalars['train/loss'])
    png = os.path.join(workdir, 'samples', 'step_0000020.png')
    assert summary['last_samples'] == png
    image = np.asarray(Image.open(png))
    # 10 samples (one per class) in one row of 10 columns; 8x8 tiles upscaled 4x plus 2-px gaps.
    assert image.shape == (2 + 32 + 2, 10 * 34 + 2)
    assert image.std() > 0
    assert sorted(ckpt.verify(workdir).items()) == [(10, None), (20, None)]
    with open(os.path.join(workdir, 'config.json')) as f:
        assert json.load(f)['total_steps'] == 20


def test_resume_continues_from_the_latest_checkpoint(trained, tmp_path):
    import shutil
    workdir = str(tmp_path / 'run')
    shutil.copytree(trained[0], workdir)
    with pytest.raises(ckpt.ConfigMismatchError, match='total_steps'):
        registry.run(tiny(total_steps=30), workdir)
    partial = os.path.join(workdir, 'checkpoints', '30.orbax-checkpoint-tmp')  # as kill -9 mid-save leaves it
    os.makedirs(os.path.join(partial, 'state'))
    with open(os.path.join(partial, 'state', 'junk'), 'w') as f:
        f.write('x')
    summary = registry.run(tiny(total_steps=30), workdir, allow_config_change=True)
    assert summary['resumed_from'] == 20 and summary['step'] == 30
    moved = os.listdir(os.path.join(workdir, 'corrupt_checkpoints'))
    assert len(moved) == 1 and moved[0].startswith('30.orbax-checkpoint-tmp-')  # ignored, kept, not deleted
    assert sorted(ckpt.verify(workdir)) == [10, 20, 30]
    kept = [n for n in os.listdir(workdir) if n.startswith('config.') and n != 'config.json']
    assert len(kept) == 1  # the previous config.json is kept, not overwritten


# A damaged newest checkpoint skipped and set aside, and every checkpoint damaged: tests/test_train_cli.py, through
# train.py as users meet them.


def test_damaged_checkpoint_is_named_without_tracebacks_from_reader_threads(trained, tmp_path):
    """Orbax's concurrent reads of a torn file used to print a traceback per failing read thread (CI saw them in
    train.py's stderr); the pre-read (plain tensorstore reads) reports the first unreadable array and nothing else."""
    import shutil
    import subprocess
    import sys
    workdir = str(tmp_path / 'run')
    shutil.copytree(trained[0], workdir)
    truncate_largest_file(os.path.join(workdir, 'checkpoints', '20'))
    code = ('import gc, json, sys; from jaxdiff.engine import checkpoint as c; r = c.verify(sys.argv[1]); '
            'gc.collect(); print(json.dumps(r))')
    result = subprocess.run([sys.executable, '-c', code, workdir], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    reasons = json.loads(result.stdout.splitlines()[-1])
    assert reasons['10'] is None
    assert 'is unreadable' in reasons['20'] and 'OUT_OF_RANGE' in reasons['20']
    assert 'Traceback' not in result.stderr, result.stderr[-2000:]


def test_fingerprint_is_container_agnostic_and_detects_changes():
    tree = {'a': np.arange(6, dtype=np.float32).reshape(2, 3), 'b': (np.ones(3, np.int32), np.zeros(2, np.float32))}
    as_lists = {'a': tree['a'], 'b': [tree['b'][0], tree['b'][1]]}
    assert ckpt.fingerprint(tree) == ckpt.fingerprint(as_lists)
    changed = {'a': tree['a'].copy(), 'b': tree['b']}
    changed['a'][1, 2] = np.nextafter(changed['a'][1, 2], np.float32(100))
    assert ckpt.fingerprint(changed) != ckpt.fingerprint(tree)
    swapped = {'a': tree['a'][::-1].copy(), 'b': tree['b']}
    assert ckpt.fingerprint(swapped) != ckpt.fingerprint(tree)  # order-sensitive checksum


def test_config_diff_names_nested_keys():
    a = tiny().to_dict()
    b = tiny(**{'model.dropout': 0.3, 'batch_size': 32}).to_dict()
    assert ckpt.config_diff(json.loads(json.dumps(a)), json.loads(json.dumps(b))) == ['batch_size', 'model.dropout']


def test_progress_line_and_parameter_overview():
    line = logs.progress_line(120, 1000, dict(loss=0.5, img_per_s=800.0, lr=1e-3, grad_norm=0.25,
                                                    nonfinite=2), 65.0)
    assert line == 'step 120/1000 | loss 0.5000 | 800.0 img/s | ETA 0:01:05 | lr 1.00e-03 | grad 0.25 | nonfinite 2'
    table = logs.parameter_overview({'enc': {'w': np.zeros((3, 4))}, 'dec': {'w': np.zeros(5), 'b': np.zeros(1)}})
    assert 'enc/w' in table and '(3, 4)' in table and table.splitlines()[-1].startswith('Total: 18 ')


def test_grid_layout_one_column_per_class():
    samples = np.linspace(-1, 1, 20 * 8 * 8).reshape(20, 8, 8, 1).astype(np.float32)
    grid = sample_grid.grid_image(sample_grid.to_uint8(samples), columns=10, min_side=8, gap=0)
    assert grid.shape == (16, 80, 1)
    np.testing.assert_array_equal(grid[8:16, 8:16], sample_grid.to_uint8(samples)[11])


def test_gmm2d_mlp_trains_and_plots(tmp_path):
    config = load_config(os.path.join(ROOT, 'configs', 'diffusion', 'gmm2d.py'), total_steps=30, checkpoint_every=30,
                         log_every=10, sample_every=30, batch_size=64, **{'sampling.num_images': 256,
                                                                          'sampling.num_steps': 4})
    summary = registry.run(config, str(tmp_path / 'gmm'))
    assert summary['step'] == 30
    assert np.asarray(Image.open(summary['last_samples'])).ndim == 3


def test_stop_signal_flag():
    import signal
    with signals.StopSignal() as stop:
        assert not stop.requested()
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested()
    assert signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None) or callable(signal.getsignal(signal.SIGTERM))


def test_fields_added_later_at_their_default_are_not_a_config_change(tmp_path):
    """A run whose config.json predates a new field resumes when the field holds its default; a non-default
    value is still a change that needs --allow_config_change."""
    from jaxdiff.config import base_config
    config = tiny()
    ckpt.check_config(str(tmp_path), config, False)
    saved = json.load(open(tmp_path / 'config.json'))
    del saved['task'], saved['loss']['sigma_min']  # as written before these fields existed
    (tmp_path / 'config.json').write_text(json.dumps(saved))
    ckpt.check_config(str(tmp_path), config, False, schema=base_config())
    with pytest.raises(ckpt.ConfigMismatchError, match='task'):  # without the task's schema every field counts
        ckpt.check_config(str(tmp_path), config, False)
    config = tiny(**{'loss.sigma_min': 0.01})
    with pytest.raises(ckpt.ConfigMismatchError, match='loss.sigma_min'):
        ckpt.check_config(str(tmp_path), config, False, schema=base_config())


def test_progress_lines_of_non_training_loops(monkeypatch):
    """jaxdiff.progress.Progress: the rate counts from the end of the first update (compilation excluded), a line
    when every_s passed since the last one (or the first update) and always at the end; the ETA is the rest at
    that rate."""
    from jaxdiff import progress
    clock = iter([100.0, 103.0, 110.0, 112.0])  # first update ends at 100 s
    monkeypatch.setattr(progress.time, 'perf_counter', lambda: next(clock))
    lines = []
    p = progress.Progress('sampled', 100, lines.append, every_s=10.0)
    p.add(10)                      # t=100: starts the clock, quiet
    p.add(30)                      # t=103: 3 s since the last line -> quiet
    p.add(40)                      # t=110: 80 - 10 items in 10 s
    p.add(20)                      # t=112: the end, always logged
    assert lines == ['sampled 80/100 (80.0%) | 7.0 img/s | ETA 0:00:03',
                     'sampled 100/100 (100.0%) | 7.5 img/s | ETA 0:00:00']
    one = progress.Progress('features:', 5, lines.append)
    monkeypatch.setattr(progress.time, 'perf_counter', lambda: 7.0)
    one.add(5)                     # all in one update: no rate to give
    assert lines[-1] == 'features: 5/5 (100.0%)'
