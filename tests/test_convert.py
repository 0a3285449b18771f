"""Checkpoint conversion: from_edm/to_edm, the restricted unpickler, and the convert CLI.

No torch: EDM network pickles are crafted by tests/edm_pickle_writer.py in the byte format torch writes.
"""
import collections
import os
import pickle
import subprocess
import sys

import jax
import ml_dtypes
import numpy as np
import pytest

from edm_pickle_writer import (MODULE_SRC, STORAGE_TYPES, Global, Parameter, Storage, Tensor, dumps, edm_pickle,
                               legacy_bytes, torch_zip)
from jaxdiff.nets import DhariwalUNet, SongUNet
from jaxdiff import files
from jaxdiff.nets import convert
from jaxdiff.nets.convert import from_edm, load_converted, to_edm
from jaxdiff.nets.safe_unpickle import UnsafePickleError, load_edm_pickle, safe_load

SMALL = dict(img_resolution=8, in_channels=3, out_channels=3, model_channels=16, channel_mult=(1, 2),
             num_blocks=1, attn_resolutions=(4,))
NETS = {
    'ddpmpp': SongUNet(label_dim=4, augment_dim=2, **SMALL),
    'ncsnpp': SongUNet(label_dim=4, embedding_type='fourier', channel_mult_noise=2, encoder_type='residual',
                       resample_filter=(1, 3, 3, 1), **SMALL),
    'adm': DhariwalUNet(**{**SMALL, 'model_channels': 64, 'label_dim': 4}),
}

# ---------------------------------------------------------------- fixtures

def random_variables(net, seed=0):
    """Random values in every leaf (no zero-initialised layers), numpy float32."""
    abstract = convert.abstract_variables(net)
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: (rng.standard_normal(s.shape) * 0.2).astype(s.dtype), abstract)


def inputs(net, batch=2):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((batch, net.img_resolution, net.img_resolution, net.in_channels)).astype(np.float32)
    labels = np.eye(net.label_dim, dtype=np.float32)[:batch] if net.label_dim else None
    return x, np.array([0.3, -1.1], np.float32), labels


@pytest.fixture(scope='module')
def variables():
    return {name: random_variables(net) for name, net in NETS.items()}


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ---------------------------------------------------------------- from_edm / to_edm

@pytest.mark.parametrize('name', list(NETS))
def test_round_trip_exact_with_and_without_prefix(name, variables):
    net, v = NETS[name], variables[name]
    sd = to_edm(v)
    assert_trees_equal(from_edm(sd, net), v)
    assert_trees_equal(from_edm({f'model.{k}': a for k, a in sd.items()}, net), v)
    conv = sd['enc.8x8_conv.weight']
    assert conv.shape == (NETS[name].model_channels, 3, 3, 3)  # torch OIHW
    np.testing.assert_array_equal(conv, np.asarray(v['params']['enc']['8x8_conv']['weight']).transpose(3, 2, 0, 1))
    np.testing.assert_array_equal(sd['map_layer0.weight'], np.asarray(v['params']['map_layer0']['weight']).T)
    assert ('map_noise.freqs' in sd) == ('buffers' in v) == (name == 'ncsnpp')


def test_resample_filter_buffers_are_checked_not_stored(variables):
    net, sd = NETS['ncsnpp'], to_edm(variables['ncsnpp'])
    taps = np.array([1, 3, 3, 1], np.float32)
    good = (np.outer(taps, taps) / taps.sum() ** 2)[None, None]
    assert_trees_equal(from_edm({**sd, 'enc.4x4_down.conv0.resample_filter': good}, net), variables['ncsnpp'])
    with pytest.raises(ValueError, match='wrong constant: enc.4x4_down.conv0.resample_filter'):
        from_edm({**sd, 'enc.4x4_down.conv0.resample_filter': np.full((1, 1, 2, 2), 0.25, np.float32)}, net)


def test_mismatched_keys_raise_one_error_naming_all(variables):
    net, sd = NETS['ddpmpp'], to_edm(variables['ddpmpp'])
    del sd['map_label.weight']
    sd['map_layer0.weight'] = sd['map_layer0.weight'][:, :8]
    sd['enc.8x8_conv.weight'] = np.zeros((16, 4, 3, 3), np.float32)
    sd['not_a_layer.weight'] = np.zeros(3, np.float32)
    with pytest.raises(ValueError) as err:
        from_edm(sd, net)
    msg = str(err.value)
    assert msg.splitlines()[0].startswith('state dict does not match SongUNet: 1 missing, 1 unexpected, 2 mis-shaped')
    assert 'missing: map_label.weight expected (16, 4)' in msg
    assert 'unexpected: not_a_layer.weight (3,)' in msg
    assert 'mis-shaped: map_layer0.weight expected (64, 16), got (64, 8)' in msg
    assert 'mis-shaped: enc.8x8_conv.weight expected (16, 3, 3, 3), got (16, 4, 3, 3)' in msg


def test_bf16_and_half_state_dicts_convert_to_float32(variables):
    net, v = NETS['ddpmpp'], variables['ddpmpp']
    half = {k: a.astype(ml_dtypes.bfloat16) for k, a in to_edm(v).items()}
    out = from_edm(half, net)
    leaf = out['params']['map_layer0']['weight']
    assert leaf.dtype == np.float32
    np.testing.assert_array_equal(leaf, np.asarray(v['params']['map_layer0']['weight']).astype(
        ml_dtypes.bfloat16).astype(np.float32))


# ---------------------------------------------------------------- the restricted unpickler

def test_crafted_edm_pickle_loads_like_a_real_one(tmp_path, variables):
    net, sd = NETS['ncsnpp'], to_edm(variables['ncsnpp'])
    path = tmp_path / 'net.pkl'
    sentinel = tmp_path / 'module_src_ran'
    path.write_bytes(edm_pickle(sd, net, module_src=MODULE_SRC.format(path=str(sentinel))))
    info = load_edm_pickle(path)
    assert not sentinel.exists() and 'torch' not in sys.modules
    assert info['precond'] == 'EDMPrecond' and info['model'] == 'SongUNet'
    assert info['precond_kwargs'] == dict(img_resolution=8, img_channels=3, label_dim=4, use_fp16=False,
                                          sigma_min=0, sigma_max=float('inf'), sigma_data=0.5, model_type='SongUNet')
    assert info['model_kwargs']['resample_filter'] == [1, 3, 3, 1]
    assert list(info['state_dict']) == list(sd)
    for k in sd:
        np.testing.assert_array_equal(info['state_dict'][k], sd[k])


@pytest.mark.parametrize('dtype', list(STORAGE_TYPES))
def test_plain_state_dict_pickle_all_dtypes(tmp_path, dtype):
    a = (np.arange(24).reshape(2, 3, 4) % 5).astype(dtype)
    path = tmp_path / 'sd.pkl'
    path.write_bytes(dumps(collections.OrderedDict(w=Parameter(a), b=Tensor(a[0]))))
    sd = load_edm_pickle(path)['state_dict']
    assert sd['w'].dtype == a.dtype and sd['b'].dtype == a.dtype
    np.testing.assert_array_equal(sd['w'], a)
    np.testing.assert_array_equal(sd['b'], a[0])


@pytest.mark.parametrize('protocol', [2, 4, 5])
def test_numpy_state_dict_pickle(tmp_path, protocol):
    sd = dict(w=np.arange(6, dtype=np.float32).reshape(2, 3), b=np.ones(3, np.float16), step=np.int64(7))
    path = tmp_path / 'sd.pkl'
    path.write_bytes(pickle.dumps(dict(ema={k: sd[k] for k in ('w', 'b')}, step=sd['step']), protocol=protocol))
    assert safe_load(path)['step'] == 7
    out = load_edm_pickle(path)['state_dict']
    for k in ('w', 'b'):
        assert out[k].dtype == sd[k].dtype
        np.testing.assert_array_equal(out[k], sd[k])


def test_tensor_views_offsets_strides_and_bounds(tmp_path):
    storage = Storage(np.arange(12, dtype=np.float32))
    view = Tensor(np.zeros((3, 2), np.float32), storage=storage, offset=1, stride=(1, 3))  # a transposed view
    path = tmp_path / 'v.pkl'
    path.write_bytes(dumps(dict(v=view, same=Tensor(np.zeros(4, np.float32), storage=storage, offset=8))))
    out = safe_load(path)
    np.testing.assert_array_equal(out['v'], [[1, 4], [2, 5], [3, 6]])  # v[i, j] = storage[1 + i + 3j]
    np.testing.assert_array_equal(out['same'], [8, 9, 10, 11])
    path.write_bytes(dumps(dict(v=Tensor(np.zeros(4, np.float32), storage=storage, offset=9))))
    with pytest.raises(UnsafePickleError, match='ends at element 12 of a storage of 12'):
        safe_load(path)


def test_torch_zip_archive(tmp_path):
    a = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
    path = tmp_path / 'sd.pt'
    torch_zip(dict(weight=Parameter(a)), path)
    np.testing.assert_array_equal(load_edm_pickle(path)['state_dict']['weight'], a)


class Evil:
    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _evil_payload(kind, sentinel):
    """(object whose unpickling would create ``sentinel``, the global name the pickle holds)."""
    write = f'open({str(sentinel)!r}, "w").write("ran")'
    return {
        'system': (Evil(os.system, f'touch {sentinel}'), f'{os.system.__module__}.system'),
        'eval': (Evil(eval, write), 'builtins.eval'),
        'exec': (Evil(exec, write), 'builtins.exec'),
        'popen': (Evil(subprocess.Popen, ['touch', str(sentinel)]), 'subprocess.Popen'),
        'getattr': (Evil(getattr, '', 'join'), 'builtins.getattr'),
    }[kind]


@pytest.mark.parametrize('kind', ['system', 'eval', 'exec', 'popen', 'getattr'])
def test_forbidden_globals_are_refused_and_never_run(tmp_path, kind):
    sentinel = tmp_path / 'ran'
    path = tmp_path / 'evil.pkl'
    payload, name = _evil_payload(kind, sentinel)
    path.write_bytes(pickle.dumps(dict(ema=collections.OrderedDict(w=payload)), protocol=4))
    with pytest.raises(UnsafePickleError, match=f'refusing to load {name}'):
        load_edm_pickle(path)
    assert not sentinel.exists()


def test_forbidden_global_inside_storage_bytes_is_refused(tmp_path):
    sentinel = tmp_path / 'ran'
    storage = Storage(np.zeros(2, np.float32))
    evil = legacy_bytes(storage).replace(pickle.dumps([storage.key], protocol=2),
                                         pickle.dumps(Evil(os.system, f'touch {sentinel}'), protocol=2))
    path = tmp_path / 'evil.pkl'
    path.write_bytes(dumps(dict(w=Evil(Global('torch.storage', '_load_from_bytes'), evil))))
    with pytest.raises(UnsafePickleError, match='refusing to load posix.system'):
        safe_load(path)
    assert not sentinel.exists()


# ---------------------------------------------------------------- the CLI

def run_cli(capsys, *args):
    code = convert.main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_converts_and_output_matches(tmp_path, capsys, variables):
    net, v = NETS['ncsnpp'], variables['ncsnpp']
    path = tmp_path / 'network-snapshot.pkl'
    path.write_bytes(edm_pickle(to_edm(v), net))
    code, out, err = run_cli(capsys, path, tmp_path / 'out')
    assert code == 0, err
    assert out.strip().endswith(f'({"EDMPrecond"} / SongUNet) -> {tmp_path / "out"}')
    assert len(out.strip().splitlines()) == 1 and f'{convert.param_count(v):,} params' in out
    net2, v2, config = load_converted(tmp_path / 'out')
    assert net2 == net and config['precond_kwargs']['sigma_data'] == 0.5
    assert config['source']['sha256'] == files.sha256(str(path))
    x, noise, labels = inputs(net)
    np.testing.assert_array_equal(net2.apply(v2, x, noise, labels), net.apply(v, x, noise, labels))
    assert run_cli(capsys, path, tmp_path / 'out')[1].startswith('already converted')


def _expect_error(capsys, args, pattern):
    code, out, err = run_cli(capsys, *args)
    assert code == 2 and out == ''
    last = err.strip().splitlines()[-1]
    assert last.startswith('error: ') and pattern in last, err
    return err


def test_cli_clear_errors(tmp_path, capsys, variables):
    net, sd = NETS['ddpmpp'], to_edm(variables['ddpmpp'])
    out_dir = tmp_path / 'out'
    _expect_error(capsys, [tmp_path / 'missing.pkl', out_dir], 'missing.pkl does not exist')

    evil = tmp_path / 'evil.pkl'
    evil.write_bytes(pickle.dumps(Evil(os.system, 'true')))
    _expect_error(capsys, [evil, out_dir], 'refusing to load posix.system')

    corrupt = tmp_path / 'corrupt.pkl'
    corrupt.write_bytes(b'\x80\x04not a pickle at all')
    _expect_error(capsys, [corrupt, out_dir], 'is not a readable pickle')

    bare = tmp_path / 'bare.pkl'
    bare.write_bytes(dumps({k: Tensor(a) for k, a in sd.items()}))
    _expect_error(capsys, [bare, out_dir], 'bare state dict')

    wrong = tmp_path / 'wrong.pkl'
    wrong.write_bytes(edm_pickle({k: a for k, a in sd.items() if k != 'map_label.bias'}, net))
    err = _expect_error(capsys, [wrong, out_dir], '1 missing')
    assert 'missing: map_label.bias expected (16,)' in err
    assert not out_dir.exists()

    good = tmp_path / 'good.pkl'
    good.write_bytes(edm_pickle(sd, net))
    assert run_cli(capsys, good, out_dir)[0] == 0
    before = sorted((p, p.stat().st_mtime_ns) for p in out_dir.rglob('*'))
    other = tmp_path / 'other.pkl'
    other.write_bytes(edm_pickle({k: a + 1 for k, a in sd.items()}, net))
    _expect_error(capsys, [other, out_dir], 'already holds a checkpoint from another source')
    assert sorted((p, p.stat().st_mtime_ns) for p in out_dir.rglob('*')) == before


def test_cli_module_entry_point_exits_2_without_traceback(tmp_path):
    r = subprocess.run([sys.executable, '-m', 'jaxdiff.nets.convert', str(tmp_path / 'nope.pkl'), str(tmp_path)],
                       capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert r.returncode == 2 and 'Traceback' not in r.stderr
    assert r.stderr.strip().splitlines() == [f'error: {tmp_path / "nope.pkl"} does not exist or is not a file.']
