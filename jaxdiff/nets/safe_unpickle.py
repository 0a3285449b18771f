"""Load NVlabs/EDM network pickles (and torch state dicts) as numpy, without running any pickled code.

An EDM network pickle (``pickle.dump(dict(ema=net, loss_fn=..., augment_pipe=..., dataset_kwargs=...), f)``)
names a few torch functions and embeds the source code of its network classes. ``pickle.load`` would import
torch and ``exec`` that source. Here every global the pickle names is looked up in a fixed allowlist and replaced
by a small local function that builds numpy arrays or plain containers; anything else raises
``UnsafePickleError``. Torch is never imported, and the embedded module source is never run.

What the allowlisted names become:

- ``torch.storage._load_from_bytes(b)``: a 1-D numpy array parsed from ``b``, a storage in torch's legacy
  serialization (pickled magic number, protocol version 1001 and sys info; a pickle whose persistent id is
  ``('storage', torch.<Type>Storage, key, location, numel, view)``; the pickled list of keys; then per key an
  int64 element count and the raw little-endian bytes).
- ``torch._utils._rebuild_tensor_v2`` / ``_rebuild_parameter``: a numpy array cut from that storage (bounds are
  checked, the result owns its memory).
- ``torch_utils.persistence._reconstruct_persistent_obj(meta)`` and ``torch.nn.ModuleDict``: an
  ``ObjectRecord`` (class name, constructor args, parameters, buffers, submodules, attributes).
- ``torch.<Type>Storage`` (in storage persistent ids) and ``numpy.ndarray`` (in numpy's ``_reconstruct``):
  inert markers that cannot be called.
- numpy scalars (become Python scalars) and numeric arrays, ``collections.OrderedDict``, ``dnnlib.util.EasyDict``
  (as dict), ``argparse.Namespace`` (as ``types.SimpleNamespace``: DiT's training checkpoints store their command
  line), ``set``, ``frozenset``, and ``_codecs.encode`` for latin1 text (how protocol 2 writes bytes).

A file written by ``torch.save`` in its (default) zip format is read the same way: ``data.pkl`` through the
allowlist, storages from ``data/<key>``; so is one in torch's legacy (pre-1.6) format, whose storages follow its
pickle (pytorch-fid's Inception weights are such a file).
"""
from __future__ import annotations

import collections
import dataclasses
import io
import os
import pickle
import struct
import types
import zipfile
from typing import Any, Callable, Mapping

import ml_dtypes
import numpy as np

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001
_STORAGE_DTYPES = {
    'DoubleStorage': np.float64, 'FloatStorage': np.float32, 'HalfStorage': np.float16,
    'BFloat16Storage': ml_dtypes.bfloat16, 'LongStorage': np.int64, 'IntStorage': np.int32,
    'ShortStorage': np.int16, 'CharStorage': np.int8, 'ByteStorage': np.uint8, 'BoolStorage': np.bool_,
    'ComplexFloatStorage': np.complex64, 'ComplexDoubleStorage': np.complex128,
}
_MODULE_FIELDS = ('_parameters', '_buffers', '_modules', '_non_persistent_buffers_set', '_init_args',
                  '_init_kwargs', 'training')


class _Marker(str):
    """Immutable stand-in for a class the pickle names but must never call (a torch storage type,
    numpy.ndarray): no ``__dict__``, so a pickle cannot alter it."""

    __slots__ = ()


_NDARRAY = _Marker('numpy.ndarray')


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle names a global outside the allowlist (or misuses an allowed one); nothing was executed."""


@dataclasses.dataclass
class ObjectRecord:
    """A pickled torch module or EDM persistent object, reduced to plain data.

    ``parameters``/``buffers`` map names to numpy arrays (or None, as torch allows); ``modules`` maps names to
    child records; ``attributes`` holds every other public attribute (e.g. EDMPrecond's ``sigma_data``);
    ``init_args``/``init_kwargs`` are the constructor arguments that EDM's persistence records (None if not).
    """

    class_name: str = ''
    init_args: tuple | None = None
    init_kwargs: dict | None = None
    parameters: dict = dataclasses.field(default_factory=dict)
    buffers: dict = dataclasses.field(default_factory=dict)
    modules: dict = dataclasses.field(default_factory=dict)
    attributes: dict = dataclasses.field(default_factory=dict)
    non_persistent: frozenset = frozenset()

    def __setstate__(self, state: Any) -> None:
        """Fills the record from a pickled ``__dict__`` (the pickle BUILD step); never calls into torch."""
        if not isinstance(state, dict):
            raise UnsafePickleError(f'{self.class_name}: object state is {type(state).__name__}, expected a dict.')
        self.init_args = state.get('_init_args')
        self.init_kwargs = dict(state['_init_kwargs']) if state.get('_init_kwargs') is not None else None
        self.parameters = dict(state.get('_parameters') or {})
        self.buffers = dict(state.get('_buffers') or {})
        self.modules = dict(state.get('_modules') or {})
        self.non_persistent = frozenset(state.get('_non_persistent_buffers_set') or ())
        self.attributes = {k: v for k, v in state.items() if not k.startswith('_') and k not in _MODULE_FIELDS}

    def state_dict(self, prefix: str = '') -> dict[str, np.ndarray]:
        """Flat ``{dotted name: array}`` in torch's ``state_dict()`` order; None entries are skipped."""
        out = {prefix + k: v for k, v in self.parameters.items() if v is not None}
        out.update({prefix + k: v for k, v in self.buffers.items() if v is not None and k not in self.non_persistent})
        for name, child in self.modules.items():
            if child is not None:
                out.update(child.state_dict(f'{prefix}{name}.'))
        return out


def _container_class(name: str) -> type:
    """A record class standing for torch's container module ``name`` (created by NEWOBJ, filled by BUILD)."""
    return type(name, (ObjectRecord,), {'class_name': name})


def _reconstruct_persistent_obj(meta: Any) -> ObjectRecord:
    """EDM's persistent-object hook, minus the ``exec``: keeps class name and state, drops ``module_src``."""
    if not isinstance(meta, dict) or meta.get('type') != 'class' or not isinstance(meta.get('class_name'), str):
        raise UnsafePickleError('torch_utils.persistence object with malformed meta (expected type="class").')
    record = ObjectRecord(class_name=meta['class_name'])
    record.__setstate__(meta.get('state') or {})
    return record


def _rebuild_tensor(storage: Any, offset: int, size: tuple, stride: tuple, *unused: Any) -> np.ndarray:
    """(storage (N,), offset, size, stride) -> array of shape ``size``; rejects views outside the storage."""
    if not isinstance(storage, np.ndarray) or storage.ndim != 1 or not storage.flags.c_contiguous:
        raise UnsafePickleError('_rebuild_tensor_v2 called without a storage.')
    size, stride, offset = tuple(map(int, size)), tuple(map(int, stride)), int(offset)
    if len(size) != len(stride) or min((offset, *size, *stride)) < 0:
        raise UnsafePickleError(f'tensor view size={size} stride={stride} offset={offset} is invalid.')
    if 0 in size:
        return np.zeros(size, storage.dtype)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= storage.size:
        raise UnsafePickleError(f'tensor view ends at element {last} of a storage of {storage.size}.')
    strides = tuple(s * storage.itemsize for s in stride)
    return np.lib.stride_tricks.as_strided(storage[offset:], size, strides).copy()


def _rebuild_parameter(data: Any, requires_grad: bool = False, hooks: Any = None) -> np.ndarray:
    """torch.nn.Parameter -> its data array."""
    if not isinstance(data, np.ndarray):
        raise UnsafePickleError('_rebuild_parameter called without a tensor.')
    return data


def _numpy_dtype(spec: Any, align: bool = False, copy: bool = True) -> np.dtype:
    """numpy.dtype(spec) for plain numeric/bool/str kinds only: no object or structured dtypes."""
    if not isinstance(spec, str) or np.dtype(spec).kind in 'OV':
        raise UnsafePickleError(f'numpy dtype {spec!r} is not allowed (object and structured dtypes are refused).')
    return np.dtype(spec, bool(align), True)


def _numpy_scalar(dtype: Any, data: bytes) -> Any:
    """numpy scalar pickle -> the equivalent Python scalar (init kwargs like ``skip_scale`` hold these)."""
    if not isinstance(dtype, np.dtype) or not isinstance(data, bytes) or len(data) != dtype.itemsize:
        raise UnsafePickleError('malformed numpy scalar.')
    return np.frombuffer(data, dtype)[0].item()


def _numpy_reconstruct(cls: Any, shape: Any, typecode: Any) -> np.ndarray:
    """Empty ndarray that the following BUILD (numpy's own ``__setstate__``) fills from raw bytes."""
    if not (isinstance(cls, _Marker) and cls == _NDARRAY):
        raise UnsafePickleError('numpy _reconstruct of a class other than numpy.ndarray.')
    return np.ndarray((0,), np.uint8)


def _numpy_frombuffer(buf: Any, dtype: Any, shape: tuple, order: str) -> np.ndarray:
    """Protocol-5 ndarray pickle -> array (a copy, so it owns its memory)."""
    if not isinstance(dtype, np.dtype):
        raise UnsafePickleError('numpy _frombuffer without a dtype.')
    return np.frombuffer(buf, dtype).reshape(shape, order=order).copy()


def _latin1_encode(text: Any, encoding: str = 'latin1') -> bytes:
    """Protocol-2 pickles write bytes as ``_codecs.encode(str, 'latin1')``."""
    if not isinstance(text, str) or encoding != 'latin1':
        raise UnsafePickleError('_codecs.encode is allowed only for latin1 text.')
    return text.encode('latin1')


def _load_from_bytes(data: Any) -> np.ndarray:
    """torch.storage._load_from_bytes -> the storage as a 1-D numpy array."""
    if not isinstance(data, (bytes, bytearray)):
        raise UnsafePickleError('_load_from_bytes called without bytes.')
    return _read_legacy_storage(bytes(data))


@dataclasses.dataclass(frozen=True)
class _StorageRef:
    """A storage's persistent id: dtype, key, element count, optional (view_key, offset, size)."""

    dtype: np.dtype
    key: str
    numel: int
    view: tuple | None


def _storage_ref(pid: Any) -> _StorageRef:
    """Parses ``('storage', <Type>Storage, key, location, numel[, view])`` into a _StorageRef."""
    if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == 'storage' and isinstance(pid[1], _Marker)
            and pid[1] in _STORAGE_DTYPES):
        raise UnsafePickleError(f'unexpected persistent id {str(pid)[:80]!r}; only torch storages are allowed.')
    return _StorageRef(np.dtype(_STORAGE_DTYPES[pid[1]]), str(pid[2]), int(pid[4]), pid[5] if len(pid) == 6 else None)


_ALLOWED: dict[str, Any] = {
    'collections.OrderedDict': collections.OrderedDict,
    'builtins.set': set,
    'builtins.frozenset': frozenset,
    '_codecs.encode': _latin1_encode,
    'dnnlib.util.EasyDict': dict,
    'argparse.Namespace': types.SimpleNamespace,
    'torch._utils._rebuild_tensor_v2': _rebuild_tensor,
    'torch._utils._rebuild_parameter': _rebuild_parameter,
    'torch.storage._load_from_bytes': _load_from_bytes,
    'torch_utils.persistence._reconstruct_persistent_obj': _reconstruct_persistent_obj,
    'torch.nn.modules.container.ModuleDict': _container_class('ModuleDict'),
    **{f'torch.{name}': _Marker(name) for name in _STORAGE_DTYPES},
    **{f'{np_core}.multiarray.{name}': fn for np_core in ('numpy.core', 'numpy._core')
       for name, fn in (('scalar', _numpy_scalar), ('_reconstruct', _numpy_reconstruct))},
    **{f'{np_core}.numeric._frombuffer': _numpy_frombuffer for np_core in ('numpy.core', 'numpy._core')},
    'numpy.dtype': _numpy_dtype,
    'numpy.ndarray': _NDARRAY,
}


class _Unpickler(pickle.Unpickler):
    """Unpickler whose globals come only from ``_ALLOWED``; persistent ids go to ``storage_loader`` if given."""

    def __init__(self, file: Any, storage_loader: Callable[[_StorageRef], Any] | None = None):
        super().__init__(file)
        self._storage_loader = storage_loader

    def find_class(self, module: str, name: str) -> Any:
        """Allowlisted stand-in for ``module.name``, else UnsafePickleError naming it."""
        try:
            return _ALLOWED[f'{module}.{name}']
        except KeyError:
            raise UnsafePickleError(f'refusing to load {module}.{name}: it is not on the allowlist of '
                                    'jaxdiff.nets.safe_unpickle (only torch tensors, EDM network records, numpy '
                                    'and plain containers are).') from None

    def persistent_load(self, pid: Any) -> Any:
        """Resolves a torch storage persistent id; refuses any other."""
        if self._storage_loader is None:
            raise UnsafePickleError('unexpected persistent id in a plain pickle.')
        return self._storage_loader(_storage_ref(pid))


def _read_legacy_header(f: io.BufferedIOBase) -> None:
    """Reads the protocol version and sys info that follow torch's legacy magic number; rejects big-endian."""
    protocol, sys_info = _Unpickler(f).load(), _Unpickler(f).load()
    if protocol != _LEGACY_PROTOCOL:
        raise pickle.UnpicklingError(f'torch legacy serialization protocol {protocol!r}, expected {_LEGACY_PROTOCOL}.')
    if not isinstance(sys_info, dict) or not sys_info.get('little_endian', True):
        raise pickle.UnpicklingError('big-endian torch storages are not supported.')


def _read_legacy_storage(data: bytes) -> np.ndarray:
    """Bytes of ``torch.save(storage, f, _use_new_zipfile_serialization=False)`` -> 1-D array."""
    f = io.BytesIO(data)
    if _Unpickler(f).load() != _LEGACY_MAGIC:
        raise pickle.UnpicklingError('storage bytes are not in torch legacy serialization format.')
    _read_legacy_header(f)
    ref = _Unpickler(f, storage_loader=lambda r: r).load()
    if not isinstance(ref, _StorageRef):
        raise UnsafePickleError('legacy storage bytes hold something other than one storage.')
    keys = _Unpickler(f).load()
    if keys != [ref.key]:
        raise pickle.UnpicklingError(f'legacy storage bytes list storages {str(keys)[:80]}, expected [{ref.key!r}].')
    (numel,) = struct.unpack('<q', f.read(8))
    return _storage_array(ref, f.read(max(numel, 0) * ref.dtype.itemsize))


def _read_torch_legacy(f: io.BufferedIOBase, path: str) -> Any:
    """The rest of a legacy (pre-1.6) ``torch.save`` file after its magic number -> its object.

    Layout: protocol and sys info; the object's pickle, whose storages are persistent ids; the pickled list of
    storage keys; then per key an int64 element count and the raw bytes. The storages come after the pickle that
    uses them, so the pickle is read twice: first to learn each storage's dtype (with zero placeholders), then,
    once the bytes are read, for real.
    """
    _read_legacy_header(f)
    start, refs = f.tell(), {}

    def placeholder(ref: _StorageRef) -> np.ndarray:
        refs[ref.key] = ref
        return np.zeros(int(ref.view[2]) if ref.view else ref.numel, ref.dtype)

    _Unpickler(f, storage_loader=placeholder).load()
    keys = _Unpickler(f).load()
    if not isinstance(keys, list) or set(keys) != set(refs):
        raise pickle.UnpicklingError(f'{path}: legacy torch file lists storages {str(keys)[:80]}, but its pickle '
                                     f'uses {len(refs)} others: the file is corrupt.')
    raw = {}
    for key in keys:
        count = f.read(8)
        if len(count) != 8:
            raise pickle.UnpicklingError(f'{path}: legacy torch file ends before storage {key}: it is truncated.')
        raw[key] = f.read(max(struct.unpack('<q', count)[0], 0) * refs[key].dtype.itemsize)
    f.seek(start)
    return _Unpickler(f, storage_loader=lambda ref: _storage_array(ref, raw[ref.key])).load()


def _storage_array(ref: _StorageRef, raw: bytes) -> np.ndarray:
    """Raw bytes of a storage -> 1-D array of ``ref.numel`` elements (the view's slice if it is a view)."""
    arr = np.frombuffer(raw, ref.dtype, count=len(raw) // ref.dtype.itemsize)
    start, count = (int(ref.view[1]), int(ref.view[2])) if ref.view else (0, ref.numel)
    if arr.size < ref.numel or start < 0 or start + count > ref.numel:
        raise pickle.UnpicklingError(f'torch storage {ref.key} holds {arr.size} of {ref.numel} elements '
                                     f'(view {start}+{count}): the file is truncated or corrupt.')
    return arr[start:start + count].copy()


def _read_torch_zip(path: str) -> Any:
    """A ``torch.save`` zip archive -> its object, storages from ``<archive>/data/<key>``."""
    with zipfile.ZipFile(path) as zf:
        pkl = [n for n in zf.namelist() if n.endswith('data.pkl') and n.count('/') == 1]
        if len(pkl) != 1:
            raise pickle.UnpicklingError(f'{path} is a zip file but not a torch.save archive (no */data.pkl).')
        root = pkl[0].split('/')[0]
        names = set(zf.namelist())
        if f'{root}/byteorder' in names and zf.read(f'{root}/byteorder').strip() != b'little':
            raise pickle.UnpicklingError('big-endian torch archives are not supported.')

        def load(ref: _StorageRef) -> np.ndarray:
            member = f'{root}/data/{ref.key}'
            if member not in names:
                raise pickle.UnpicklingError(f'torch archive lacks storage {member}.')
            return _storage_array(ref, zf.read(member))

        with zf.open(pkl[0]) as f:
            return _Unpickler(f, storage_loader=load).load()


def safe_load(path: str | os.PathLike) -> Any:
    """Loads a pickle file or a ``torch.save`` file (zip or legacy) through the allowlist; tensors become numpy arrays.

    Raises FileNotFoundError, UnsafePickleError (a forbidden global; nothing ran) or pickle.UnpicklingError.
    """
    path = os.fspath(path)
    if zipfile.is_zipfile(path):
        return _read_torch_zip(path)
    with open(path, 'rb') as f:
        obj = _Unpickler(f).load()
        is_legacy = isinstance(obj, int) and obj == _LEGACY_MAGIC  # (a bare ndarray's == is elementwise)
        return _read_torch_legacy(f, path) if is_legacy else obj


def _is_state_dict(obj: Any) -> bool:
    """True for a mapping of str -> numpy array."""
    return isinstance(obj, Mapping) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, np.ndarray) for k, v in obj.items())


def _plain_kwargs(record: ObjectRecord) -> dict:
    """The constructor kwargs a record was built with; positional args are refused (EDM never uses them)."""
    if record.init_kwargs is None or record.init_args:
        raise ValueError(f'{record.class_name} in the pickle has no recorded keyword init args; build the net '
                         'yourself and call from_edm(load_edm_pickle(path)["state_dict"], net).')
    return dict(record.init_kwargs)


def load_edm_pickle(path: str | os.PathLike) -> dict:
    """Reads an EDM network pickle safely and describes its network (the 'ema' entry when there is one).

    Returns a dict with
      ``precond``: precond class name ('EDMPrecond', 'VPPrecond', 'VEPrecond', 'iDDPMPrecond') or None;
      ``precond_kwargs``: its public scalar attributes (img_resolution, img_channels, label_dim, use_fp16,
        sigma_min, sigma_max, sigma_data / beta_d, beta_min, M, epsilon_t / C_1, C_2, ...; VP/iDDPM's
        sigma_min/sigma_max are the values they derive) plus ``model_type``;
      ``precond_buffers``: the precond's own buffers (iDDPM's ``u`` grid), ``{name: array}``;
      ``model``/``model_kwargs``: the inner network's class name ('SongUNet', 'DhariwalUNet') and the kwargs it
        was constructed with (img_resolution, in_channels, out_channels, label_dim, model_channels, ...);
      ``state_dict``: the inner network's flat ``{dotted key: array}`` in torch layouts (e.g. conv OIHW).
    A pickle of a bare state dict (optionally under 'ema') gives ``state_dict`` only; the other entries are None.
    """
    obj = safe_load(path)
    net = obj['ema'] if isinstance(obj, Mapping) and 'ema' in obj else obj
    if _is_state_dict(net):
        return dict(precond=None, precond_kwargs=None, precond_buffers=None, model=None, model_kwargs=None,
                    state_dict=dict(net))
    if not isinstance(net, ObjectRecord):
        raise ValueError(f'{path} holds neither an EDM network nor a state dict (found {type(net).__name__}).')
    inner = net.modules.get('model')
    if not net.class_name.endswith('Precond') or not isinstance(inner, ObjectRecord):
        return dict(precond=None, precond_kwargs=None, precond_buffers=None, model=net.class_name,
                    model_kwargs=_plain_kwargs(net), state_dict=net.state_dict())
    kwargs = {k: v for k, v in net.attributes.items() if isinstance(v, (bool, int, float, str))}
    return dict(precond=net.class_name, precond_kwargs={**kwargs, 'model_type': inner.class_name},
                precond_buffers={k: v for k, v in net.buffers.items() if v is not None},
                model=inner.class_name, model_kwargs=_plain_kwargs(inner), state_dict=inner.state_dict())
