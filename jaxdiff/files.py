"""Small file helpers shared by every writer: atomic writes (temp file + rename) and file checksums.

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
