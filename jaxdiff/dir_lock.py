"""One writer per run or output directory: an exclusive lock on ``DIR/.lock``.

    with DirectoryLock(workdir, 'train.py'):
        ...   # a second writer of workdir gets DirectoryLockedError naming this process's pid and host

The lock is ``flock(2)`` on the open file, so the kernel drops it when its holder exits in any way, kill -9
included: a directory is never left locked by a dead process. The file itself stays (a few bytes: the last holder's
pid, host, program and start time, which a refused writer reads for its message) and is reused by the next holder.
flock is advisory and per host; on a network filesystem it holds across hosts where the filesystem supports it
(NFSv4, Lustre, GPFS on Linux). In a multi-process job only process 0 takes the lock (the others write into the
directory it holds).
"""
from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
import sys
from typing import Optional

LOCK_FILE = '.lock'


class DirectoryLockedError(RuntimeError):
    """Another live process holds the directory (one line naming it)."""


def check_directory(directory: str) -> None:
    """NotADirectoryError (one line) when ``directory`` exists and is not a directory (checked before any work)."""
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise NotADirectoryError(f'{directory} is a file, not a directory; pass a directory path (it is created if '
                                 'missing)')


class DirectoryLock:
    """Exclusive lock of ``directory`` (created if missing) for the life of a ``with`` block (module docstring).

    program: what the holder is, for the refused writer's message ('train.py', 'sample.py', ...); enabled=False
    only creates the directory (the non-primary processes of a multi-process job). Raises NotADirectoryError when
    the path is a file, DirectoryLockedError when another process holds it.
    """

    def __init__(self, directory: str, program: str, *, enabled: bool = True):
        self.directory, self.program, self.enabled = directory, program, enabled
        self._fd: Optional[int] = None

    def __enter__(self) -> 'DirectoryLock':
        check_directory(self.directory)
        os.makedirs(self.directory, exist_ok=True)
        if not self.enabled:
            return self
        path = os.path.join(self.directory, LOCK_FILE)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(fd)
            os.close(fd)
            raise DirectoryLockedError(f'{self.directory} is in use by {holder}; wait for it to finish or stop it, '
                                       'or use another directory') from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(dict(pid=os.getpid(), host=socket.gethostname(), program=self.program,
                                      since=datetime.datetime.now().isoformat(timespec='seconds'),
                                      argv=sys.argv)).encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc) -> bool:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None
        return False


def _describe(fd: int) -> str:
    """'<program> (pid P on host H, since T)' from the holder's lock file, or a plain phrase if unreadable."""
    try:
        holder = json.loads(os.pread(fd, 65536, 0).decode())
        return (f'{holder["program"]} (pid {holder["pid"]} on host {holder["host"]}, since '
                f'{holder["since"]})')
    except (OSError, ValueError, KeyError, TypeError):
        return 'another process (its details are not written yet)'
