"""Small file helpers shared by every writer and reader: atomic writes (temp file + rename), file checksums and the
one .npz reader (one error line for any unreadable file).

A reader, or a run killed mid-write, sees either the old file or the whole new one, never half of it: the data
go to ``<path>.tmp-<pid>`` in the same folder, are flushed to disk, and the temp file is renamed over ``path``.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Callable

TMP_MARK = '.tmp-'


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` to produce the file, then rename it to ``path``; the temp file never survives."""
    tmp = f'{path}{TMP_MARK}{os.getpid()}'
    try:
        write(tmp)
        with open(tmp, 'rb+') as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_bytes(path: str, data: bytes) -> None:
    """Atomically write ``data`` to ``path``."""
    def write(tmp: str) -> None:
        with open(tmp, 'wb') as f:
            f.write(data)
    atomic_write(path, write)


def write_json(path: str, obj: Any, indent: int | None = 1) -> None:
    """Atomically write ``obj`` as JSON (with a final newline) to ``path``."""
    write_bytes(path, (json.dumps(obj, indent=indent) + '\n').encode())


def sha256(path: str) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            digest.update(chunk)
    return digest.hexdigest()


def read_npz(path: str, what: str = 'an .npz file') -> dict:
    """Every array of the .npz at ``path`` as {name: np.ndarray}, read eagerly without pickles. A missing file is
    FileNotFoundError; anything else unreadable (truncated or not a zip, a pickled array, a damaged member) is one
    ValueError line naming ``path`` as ``what`` (e.g. 'a sample shard')."""
    import zipfile

    import numpy as np
    if not os.path.isfile(path):
        raise FileNotFoundError(f'{what} not found: {path!r}')
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {name: npz[name] for name in npz.files}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        reason = ' '.join(str(e).split()) or type(e).__name__
        if 'allow_pickle' in reason:
            reason = 'it holds pickled objects, which are never loaded'
        raise ValueError(f'{path} is not readable as {what} ({type(e).__name__}: {reason}); '
                         'regenerate or replace the file') from e
