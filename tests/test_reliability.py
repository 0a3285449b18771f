"""What a user gets from bad input and faults at the command line (issue 15): one line on stderr naming the problem and
the file or key, the documented exit code (2 command line, 1 everything else, 128 + signal after a stop-signal save:
tests/test_engine.py), no traceback, and nothing saved before changed or deleted."""
import os
import socket
import sys

import numpy as np
from PIL import Image

from conftest import run_together, snapshot
from jaxdiff.dir_lock import LOCK_FILE, DirectoryLock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, 'tests', 'tiny', 'denoiser.py')


def assert_one_line_error(result, code: int, *needles: str) -> str:
    """The process exited ``code`` with one error line on stderr containing every needle, and no traceback."""
    returncode, _, stderr = result
    assert returncode == code, stderr[-2000:]
    assert 'Traceback' not in stderr, stderr[-2000:]
    lines = [line for line in stderr.splitlines() if ': error: ' in line]
    assert len(lines) == 1, stderr[-2000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_writers_refuse_a_held_directory_and_a_file_in_one_line(env, run_dir, tmp_path):
    """train.py and sample.py on a directory another live process holds, and on a path that is a file: exit 1, one
    line naming the holder (program, pid, host) or the file; the run and the folder are unchanged."""
    out, a_file = tmp_path / 'samples', tmp_path / 'not_a_dir'
    a_file.write_text('a file')
    train = [sys.executable, 'train.py', '--config', TINY]  # the run's own config: it gets as far as the lock
    sample = [sys.executable, 'sample.py', '--workdir', run_dir, '--num_samples', '4', '--num_steps', '2']
    with DirectoryLock(run_dir, 'the test holder'), DirectoryLock(str(out), 'the test holder'):
        before = snapshot(run_dir)
        results = run_together([train + ['--workdir', run_dir], sample + ['--out', str(out)],
                                train + ['--workdir', str(a_file)], sample + ['--out', str(a_file)]], env, ROOT)
        assert snapshot(run_dir) == before and sorted(os.listdir(out)) == [LOCK_FILE]
    holder = f'in use by the test holder (pid {os.getpid()} on host {socket.gethostname()}, since '
    assert_one_line_error(results[0], 1, 'train.py: error:', run_dir, holder)
    assert_one_line_error(results[1], 1, 'sample.py: error:', str(out), holder)
    for result in results[2:]:
        assert_one_line_error(result, 1, str(a_file), 'is a file, not a directory')
    assert a_file.read_text() == 'a file'


def test_bad_values_and_damaged_inputs_end_in_one_line_before_anything_is_written(env, run_dir, tmp_path):
    """A config value no run can use, a config file that is not one, solver options out of range, a filter fraction
    above 1, a torn .npz, an unreadable PNG, negative labels: the documented exit code and one line naming the key
    or the file, and no output folder created."""
    bad_syntax, no_get = tmp_path / 'bad_syntax.py', tmp_path / 'no_get.py'
    bad_syntax.write_text('def get_config(:\n    pass\n')
    no_get.write_text('def make():\n    return 1\n')
    torn = tmp_path / 'torn.npz'
    np.savez(torn, images=np.zeros((20, 8, 8, 1), np.uint8), labels=np.arange(20) % 10)
    torn.write_bytes(torn.read_bytes()[:300])
    negative = tmp_path / 'negative.npz'
    np.savez(negative, images=np.zeros((20, 8, 8, 1), np.uint8), labels=np.arange(20) % 10 - 1)
    pngs = tmp_path / 'pngs'
    pngs.mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(pngs / 'a.png')
    (pngs / 'b.png').write_bytes(b'\x89PNG\r\n\x1a\n' + b'not an image' * 10)
    outs = iter(tmp_path / f'out{i}' for i in range(100))  # one output folder per command: none may appear

    def train(*extra):
        return [sys.executable, 'train.py', '--config', TINY, '--workdir', str(next(outs)), *extra]

    def sample(*extra):
        return [sys.executable, 'sample.py', '--workdir', run_dir, '--out', str(next(outs)), '--num_samples', '4',
                *extra]

    cases = [
        (train('--config.optim.lr=-0.001'), 1, 'config.optim.lr=-0.001 is out of range: it must be > 0'),
        (train('--config.model.sigma_data=0'), 1, 'config.model.sigma_data=0.0 is out of range: it must be > 0'),
        ([sys.executable, 'train.py', '--config', str(bad_syntax), '--workdir', str(next(outs))], 2,
         f'--config {bad_syntax}: syntax error at line 1'),
        ([sys.executable, 'train.py', '--config', str(no_get), '--workdir', str(next(outs))], 2,
         'defines no get_config()'),
        (sample('--num_steps', '0'), 2, "--num_steps=0 is out of range for solver 'edm': it must be an integer"),
        (sample('--guidance', 'cfg:wieght=2'), 2, "--guidance 'cfg:wieght=2': transform cfg: unknown key 'wieght' "
                                                  "(did you mean 'weight'?)"),
        (sample('--filter_top', '1.5'), 2, '--filter_top=1.5 must lie in (0, 1]'),
        (sample('--seeds', '5-2'), 2, "--seeds '5-2': the range is empty"),
        (train('--config.data.source=npz', f'--config.data.path={torn}'), 1,
         f'{torn} is not readable as an image dataset (.npz)'),
        (train('--config.data.source=folder', f'--config.data.path={pngs}'), 1,
         f'{pngs}/b.png is not a readable image'),
        (train('--config.data.source=npz', f'--config.data.path={negative}'), 1, 'has label -1: class labels'),
    ]
    results = run_together([command for command, _, _ in cases], env, ROOT)
    for (command, code, needle), result in zip(cases, results):
        assert_one_line_error(result, code, needle)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith('out')]


def test_unfinished_folders_wrong_runs_and_values_the_model_cannot_take(env, run_dir, tmp_path):
    """Numbers from incomplete inputs (an unfinished or inconsistent sample folder, NaN reference statistics),
    messages that name what is wrong (a classifier run given to sample.py, a diffusion run given as a codec, a random
    -bytes --ref), and sample.py flags that only the loaded model refutes (a class beyond its 10, a cfg negative
    class beyond them): the documented exit code and one line naming the file, the run or the flag."""
    import json

    from jaxdiff.sampling import shards
    images, labels = np.zeros((6, 8, 8, 1), np.uint8), np.arange(6) % 10
    unfinished, holed = tmp_path / 'unfinished', tmp_path / 'holed'
    for folder in (unfinished, holed):
        shards.write_samples(str(folder), images, labels, 10, shard_size=3)
    manifest = json.loads((unfinished / shards.MANIFEST).read_text())
    (unfinished / shards.MANIFEST).write_text(json.dumps(dict(manifest, complete=False)))
    os.remove(shards.shard_path(str(holed), 1))
    nan_stats, noise = tmp_path / 'nan_stats.npz', tmp_path / 'noise.npz'
    np.savez(nan_stats, mu=np.full(4, np.nan), sigma=np.eye(4))
    noise.write_bytes(np.random.default_rng(0).bytes(400))
    classifier = tmp_path / 'classifier_run'  # what load_run reads before any weights: config.json, checkpoints/
    (classifier / 'checkpoints').mkdir(parents=True)
    (classifier / 'config.json').write_text(json.dumps({'task': 'adversarial'}))
    outs = iter(tmp_path / f'out{i}' for i in range(100))
    before = snapshot(run_dir)

    def fid(samples, ref):
        return [sys.executable, '-m', 'eval.fid', '--samples', str(samples), '--ref', str(ref), '--features',
                'digits_classifier']

    def sample(workdir, *extra):
        return [sys.executable, 'sample.py', '--workdir', str(workdir), '--out', str(next(outs)), '--num_samples',
                '4', '--num_steps', '2', *extra]

    cases = [
        (fid(unfinished, 'digits'), 1, f'{unfinished} is incomplete: its sampling did not finish'),
        (fid(holed, 'digits'), 1, f'{holed} lacks 1 of the 2 shards', 'shard-00001.npz'),
        (fid('digits', nan_stats), 1, f'{nan_stats}', 'NaN'),
        (fid('digits', noise), 1, f'{noise}'),
        (sample(classifier), 1, f'{classifier} is an adversarial-training (robust classifier) run, not a diffusion '
                                'model run'),
        ([sys.executable, 'watermark.py', 'embed', '--codec', run_dir, '--out', str(next(outs))], 1,
         f'{run_dir} is a diffusion model run, not a watermark codec run'),
        (sample(run_dir, '--labels', '12'), 2, "--labels '12': classes must lie in 0..9"),
        (sample(run_dir, '--guidance', 'cfg:weight=2,negative=11'), 2, "--guidance 'cfg:weight=2,negative=11'",
         'in 0..9'),
    ]
    results = run_together([command for command, *_ in cases], env, ROOT)
    for (command, code, *needles), result in zip(cases, results):
        assert_one_line_error(result, code, *needles)
    assert snapshot(run_dir) == before
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith('out')]
