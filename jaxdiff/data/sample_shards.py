"""sample.py's shard folders as a data source: their shard files in seed order, and random access to their images
without loading them (what adversarial training reads 1M-20M generated images through).

sample.py writes shards with ``np.savez``, which stores each array uncompressed inside the zip, as a ``.npy``
member. So image i of a shard sits at a fixed offset: the member's data start (after the zip local header and the
``.npy`` header) plus i times the image's bytes. :class:`ShardImages` finds those offsets once and reads the
images a batch asks for with ``os.pread``; only the labels (4 bytes an image) are held in memory, so a process's
memory does not grow with the number of images (``bench/adversarial_data.py`` measures it).
"""
from __future__ import annotations

import json
import os
import struct
import zipfile
from typing import Optional

import numpy as np

from jaxdiff import files

MANIFEST = 'manifest.json'  # sample.py's plan and, once every shard exists, "complete": true
_LOCAL_HEADER = struct.Struct('<4sHHHHHIIIHH')  # a zip file's local file header (30 bytes)


def shard_names(folder: str) -> list[str]:
    """The shard file names of a sample folder, sorted (= seed order). Raises FileNotFoundError for a missing folder
    and ValueError for a folder without shards."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f'sample folder not found: {folder!r}; write one with python sample.py --out DIR')
    names = sorted(n for n in os.listdir(folder) if n.startswith('shard-') and n.endswith('.npz'))
    if not names:
        raise ValueError(f'{folder} holds no sample shards (shard-XXXXX.npz); run sample.py with --out {folder}')
    return names


def read_manifest(out_dir: str) -> Optional[dict]:
    """The manifest of ``out_dir`` or None if there is none; ValueError when it is unreadable."""
    path = os.path.join(out_dir, MANIFEST)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f'{path} is unreadable ({e}); move it away, or pick another --out') from e


def check_complete(folder: str, hint: str = ', or pass --allow_incomplete to use the shards present') -> dict:
    """The manifest of a finished sample folder: "complete": true and every shard it lists present. ValueError (one
    line, ending with ``hint``) otherwise: a score of an interrupted folder, or training on it, would silently depend
    on how far sampling got."""
    manifest = read_manifest(folder)
    if manifest is None:
        raise ValueError(f'{folder} has no {MANIFEST}, so nothing says its shards are all there; use a folder '
                         f'that sample.py finished{hint}')
    listed = [entry['file'] for entry in manifest.get('shards', [])]
    if not manifest.get('complete'):
        raise ValueError(f'{folder} is incomplete: its sampling did not finish (manifest complete=false); rerun its '
                         f'sample.py command to finish it{hint}')
    missing = [name for name in listed if not os.path.exists(os.path.join(folder, name))]
    if missing:
        raise ValueError(f'{folder} lacks {len(missing)} of the {len(listed)} shards its manifest lists (e.g. '
                         f'{missing[0]}); rerun its sample.py command to regenerate them{hint}')
    return manifest


def member_data_offset(path: str, member: str) -> tuple[int, tuple[int, ...], np.dtype]:
    """(byte offset of the array data, shape, dtype) of the ``.npy`` member ``member`` of the npz ``path``.

    ValueError when the member is compressed (np.savez_compressed) or stored in Fortran order: then the images
    have no fixed offsets.
    """
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(member)
    if info.compress_type != zipfile.ZIP_STORED:
        raise ValueError(f'{path}: {member} is compressed; random access needs np.savez (sample.py\'s format)')
    with open(path, 'rb') as f:
        f.seek(info.header_offset)
        fields = _LOCAL_HEADER.unpack(f.read(_LOCAL_HEADER.size))
        f.seek(info.header_offset + _LOCAL_HEADER.size + fields[9] + fields[10])
        version = np.lib.format.read_magic(f)
        shape, fortran, dtype = (np.lib.format.read_array_header_1_0(f) if version == (1, 0)
                                 else np.lib.format.read_array_header_2_0(f))
        if fortran:
            raise ValueError(f'{path}: {member} is stored in Fortran order')
        return f.tell(), tuple(shape), np.dtype(dtype)


class ShardImages:
    """The images of a sample folder, read on demand: ``reader[indices]`` -> uint8 (n, H, W, C).

    Index i is the i-th image in seed order (the shard files sorted by name, as
    :func:`jaxdiff.sampling.shards.load_samples` concatenates them). ``labels`` int32 (N,) and ``shape`` (H, W, C) are attributes; one file
    descriptor per shard stays open (:meth:`close`). Raises FileNotFoundError / ValueError like load_samples.
    """

    def __init__(self, folder: str):
        names = shard_names(folder)
        self.paths = [os.path.join(folder, name) for name in names]
        offsets, counts, labels, shapes = [], [], [], set()
        for path in self.paths:
            try:
                start, shape, dtype = member_data_offset(path, 'images.npy')
                labels.append(files.read_npz(path, 'a sample shard')['labels'].astype(np.int32))
            except (OSError, KeyError, zipfile.BadZipFile) as e:
                raise ValueError(f'{path} is not a readable sample shard ({type(e).__name__}: {e})') from e
            if dtype != np.uint8 or len(shape) != 4 or shape[0] != len(labels[-1]):
                raise ValueError(f'{path}: images {dtype} {shape} are not uint8 (n, H, W, C) with one label each')
            offsets.append(start)
            counts.append(shape[0])
            shapes.add(shape[1:])
        if len(shapes) > 1:
            raise ValueError(f'{folder}: shards hold images of different sizes {sorted(shapes)}')
        self.shape = shapes.pop()
        self.labels = np.concatenate(labels)
        self._offsets = np.asarray(offsets, np.int64)
        self._first = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._bytes = int(np.prod(self.shape))
        self._fds = [os.open(path, os.O_RDONLY) for path in self.paths]

    def __len__(self) -> int:
        return int(self._first[-1])

    def __getitem__(self, indices) -> np.ndarray:
        indices = np.asarray(indices, np.int64).reshape(-1)
        if indices.size and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f'image index out of range 0..{len(self) - 1}')
        shard = np.searchsorted(self._first, indices, side='right') - 1
        out = np.empty((len(indices),) + self.shape, np.uint8)
        for row, (k, i) in enumerate(zip(shard.tolist(), indices.tolist())):
            start = int(self._offsets[k]) + (i - int(self._first[k])) * self._bytes
            out[row] = np.frombuffer(os.pread(self._fds[k], self._bytes, start), np.uint8).reshape(self.shape)
        return out

    def close(self) -> None:
        """Close the shard files."""
        for fd in self._fds:
            os.close(fd)
        self._fds = []
