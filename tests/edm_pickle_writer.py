"""Writes EDM network pickles in the byte format torch and NVlabs/edm produce, without torch.

A pure-Python pickler emits torch's global names; storages are torch legacy-serialization bytes behind
torch.storage._load_from_bytes; EDM's persistent objects go through torch_utils.persistence. Used by
tests/test_convert.py to exercise the restricted unpickler on realistic files.
"""
import collections
import dataclasses
import io
import pickle
import struct
import zipfile

import ml_dtypes
import numpy as np


MAGIC, PROTOCOL = 0x1950A86A20F9469CFC6C, 1001
SYS_INFO = dict(protocol_version=PROTOCOL, little_endian=True, type_sizes=dict(short=2, int=4, long=4))
STORAGE_TYPES = {np.dtype(np.float32): 'FloatStorage', np.dtype(np.float64): 'DoubleStorage',
                 np.dtype(np.float16): 'HalfStorage', np.dtype(ml_dtypes.bfloat16): 'BFloat16Storage',
                 np.dtype(np.int64): 'LongStorage', np.dtype(np.int32): 'IntStorage',
                 np.dtype(np.uint8): 'ByteStorage', np.dtype(np.bool_): 'BoolStorage'}
MODULE_SRC = 'open({path!r}, "w").write("module source ran")\n'


class Global:
    """Stands for the global ``module.name`` in a crafted pickle; never called."""

    def __init__(self, module, name):
        self.pickle_global = (module, name)

    def __call__(self, *args):
        raise AssertionError('a crafted global is only written, never called')


class Storage:
    """A torch storage (1-D array): inline legacy bytes via _load_from_bytes, or a persistent id in a zip."""

    def __init__(self, flat, key='0'):
        self.flat, self.key = np.ascontiguousarray(flat).reshape(-1), key

    def pid(self, view_metadata=()):
        """Persistent id; torch's legacy format appends view_metadata (None), its zip format does not."""
        return ('storage', Global('torch', STORAGE_TYPES[self.flat.dtype]), self.key, 'cpu', self.flat.size,
                *view_metadata)

    def __reduce_ex__(self, protocol):
        return Global('torch.storage', '_load_from_bytes'), (legacy_bytes(self),)


class Tensor:
    """A torch tensor: _rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks)."""

    def __init__(self, array, storage=None, offset=0, stride=None):
        array = np.asarray(array)
        self.storage = storage or Storage(array)
        self.args = (offset, array.shape, stride or tuple(s // max(array.itemsize, 1) for s in array.strides))

    def __reduce_ex__(self, protocol):
        offset, size, stride = self.args
        return Global('torch._utils', '_rebuild_tensor_v2'), (
            self.storage, offset, tuple(size), tuple(stride), False, collections.OrderedDict())


class Parameter:
    """A torch.nn.Parameter: _rebuild_parameter(tensor, requires_grad, hooks)."""

    def __init__(self, array):
        self.data = Tensor(array)

    def __reduce_ex__(self, protocol):
        return Global('torch._utils', '_rebuild_parameter'), (self.data, False, collections.OrderedDict())


class Persistent:
    """An EDM persistent object: _reconstruct_persistent_obj(dict(type, version, module_src, class_name, state))."""

    def __init__(self, class_name, state, module_src='pass\n'):
        self.class_name, self.state, self.module_src = class_name, state, module_src

    def __reduce_ex__(self, protocol):
        meta = dict(type='class', version=6, module_src=self.module_src, class_name=self.class_name, state=self.state)
        return Global('torch_utils.persistence', '_reconstruct_persistent_obj'), (meta,)


class ModuleDict:
    """torch.nn.ModuleDict: pickled by NEWOBJ of its class, then BUILD with its __dict__."""
    pickle_global = ('torch.nn.modules.container', 'ModuleDict')

    def __init__(self, state):
        self.state = state

    def __reduce_ex__(self, protocol):
        return copyreg_newobj, (ModuleDict,), self.state


def copyreg_newobj(cls, *args):  # pickle emits NEWOBJ for a reduce function with this name
    return cls.__new__(cls, *args)


copyreg_newobj.__name__ = '__newobj__'


class Pickler(pickle._Pickler):
    """Pure-Python pickler that writes ``pickle_global`` names as GLOBAL/STACK_GLOBAL like torch's pickles do;
    with ``storages`` (a dict) it writes storages as persistent ids (torch.save's zip format)."""

    def __init__(self, file, protocol, storages=None):
        super().__init__(file, protocol)
        self.storages, self.global_memo = storages, {}

    def persistent_id(self, obj):
        if self.storages is not None and isinstance(obj, Storage):
            self.storages[obj.key] = obj.flat
            return obj.pid()
        return None

    def save(self, obj, save_persistent_id=True):
        name = vars(obj).get('pickle_global') if hasattr(obj, '__dict__') else None
        if name is None:
            return super().save(obj, save_persistent_id)
        if name in self.global_memo:  # like pickle's memo: each global is written once, then fetched
            return self.write(self.get(self.global_memo[name]))
        if self.proto >= 4:
            super().save(name[0])
            super().save(name[1])
            self.write(pickle.STACK_GLOBAL)
        else:
            self.write(pickle.GLOBAL + f'{name[0]}\n{name[1]}\n'.encode())
        self.memoize(obj)
        self.global_memo[name] = self.memo[id(obj)][0]


def dumps(obj, protocol=4, storages=None):
    f = io.BytesIO()
    Pickler(f, protocol, storages).dump(obj)
    return f.getvalue()


def legacy_save(obj):
    """torch.save(obj, f, _use_new_zipfile_serialization=False): header pickles, the object's pickle with storages
    as persistent ids, the sorted storage keys, then per storage its int64 numel and raw little-endian data."""
    parts = [pickle.dumps(x, protocol=2) for x in (MAGIC, PROTOCOL, SYS_INFO)]
    storages, f = {}, io.BytesIO()
    pickler = Pickler(f, 2)

    def persistent_id(obj):
        if not isinstance(obj, Storage):
            return None
        storages[obj.key] = obj.flat
        return obj.pid(view_metadata=(None,))
    pickler.persistent_id = persistent_id
    pickler.dump(obj)
    keys = sorted(storages)
    data = [struct.pack('<q', storages[k].size) + storages[k].astype(storages[k].dtype.newbyteorder('<')).tobytes()
            for k in keys]
    return b''.join([*parts, f.getvalue(), pickle.dumps(keys, protocol=2), *data])


def tensors(state_dict, prefix=''):
    """{prefix + key: Tensor} (an OrderedDict, as torch pickles a state dict) for a numpy state dict, each tensor on
    its own storage (as torch.save writes one)."""
    return collections.OrderedDict(
        (prefix + k, Tensor(np.ascontiguousarray(v), storage=Storage(np.ascontiguousarray(v), key=str(i))))
        for i, (k, v) in enumerate(state_dict.items()))


def torch_zip(obj, path):
    """torch.save(obj, path) in the zip format: data.pkl (protocol 2, storages as persistent ids) and data/<key>.
    Give each Tensor its own Storage key (:func:`tensors` does)."""
    storages = {}
    data = dumps(obj, protocol=2, storages=storages)
    with zipfile.ZipFile(path, 'w') as zf:
        zf.writestr('archive/data.pkl', data)
        zf.writestr('archive/byteorder', 'little')
        for key, flat in storages.items():
            zf.writestr(f'archive/data/{key}', flat.tobytes())


def legacy_bytes(storage):
    """A storage alone in torch's legacy format, as torch.storage._load_from_bytes reads it."""
    return legacy_save(storage)


def module_state(params=(), buffers=(), modules=(), **attributes):
    """A torch.nn.Module __dict__ as pickled (parameters, buffers, submodules, hooks, attributes)."""
    return dict(training=False, _parameters=collections.OrderedDict(params), _buffers=collections.OrderedDict(buffers),
                _non_persistent_buffers_set=set(), _forward_hooks=collections.OrderedDict(),
                _modules=collections.OrderedDict(modules), **attributes)


def module_tree(state_dict, prefix=''):
    """Flat torch state dict -> nested Persistent / ModuleDict objects like EDM's module tree."""
    leaves = {k: v for k, v in state_dict.items() if '.' not in k}
    children = collections.OrderedDict()
    for key in state_dict:
        if '.' in key:
            children.setdefault(key.split('.', 1)[0], {})[key.split('.', 1)[1]] = state_dict[key]
    params = [(k, Parameter(v)) for k, v in leaves.items() if k not in ('freqs', 'resample_filter')]
    buffers = [(k, Tensor(v)) for k, v in leaves.items() if k in ('freqs', 'resample_filter')]
    buffers = buffers or [('resample_filter', None)]
    mods = [(k, module_tree(v, k)) for k, v in children.items()]
    state = module_state(params, buffers, mods, _init_args=(), _init_kwargs=dict(skip_scale=np.float64(0.5) ** 0.5))
    return ModuleDict(state) if prefix in ('enc', 'dec') else Persistent('UNetBlock', state)


def net_kwargs(net):
    """The Flax net's constructor kwargs as EDM records them (lists, no dtype)."""
    return {f.name: list(v) if isinstance(v := getattr(net, f.name), tuple) else v
            for f in dataclasses.fields(net) if f.name not in ('parent', 'name', 'dtype')}


def edm_pickle(state_dict, net, module_src='pass\n'):
    """Bytes of pickle.dump(dict(ema=EDMPrecond(...), loss_fn=..., ...)) as EDM's training loop writes it."""
    model = module_tree(state_dict)
    model.class_name, model.module_src = type(net).__name__, module_src
    model.state['_init_kwargs'] = net_kwargs(net)
    precond = Persistent('EDMPrecond', module_state(
        modules=[('model', model)], img_resolution=net.img_resolution, img_channels=net.in_channels,
        label_dim=net.label_dim, use_fp16=False, sigma_min=0, sigma_max=float('inf'), sigma_data=0.5,
        _init_args=(), _init_kwargs=dict(img_resolution=net.img_resolution, model_type=type(net).__name__)))
    loss_fn = Persistent('EDMLoss', dict(P_mean=-1.2, P_std=1.2, sigma_data=0.5, _init_args=(), _init_kwargs={}))
    return dumps(dict(ema=precond, loss_fn=loss_fn, augment_pipe=None, dataset_kwargs=dict(path='/data')))
