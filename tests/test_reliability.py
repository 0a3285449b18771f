"""What a user gets from bad input and faults at the command line (issue 15): one line on stderr naming the problem and
the file or key, the documented exit code (2 command line, 1 everything else, 128 + signal after a stop-signal save:
tests/test_engine.py), no traceback, and nothing saved before changed or deleted."""
import os
import socket
import sys

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
    train = [sys.executable, 'train.py', '--config', TINY, '--config.total_steps=40']
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
