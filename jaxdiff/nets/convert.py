"""Convert NVlabs/EDM torch checkpoints to jaxdiff Flax variables, and back. :func:`from_torch` / :func:`to_torch`
are the one key-by-key mapping (layouts, embedding tables, checked constants, one mismatch error) that the EDM, DiT
(:mod:`.convert_dit`) and AutoencoderKL (:mod:`.convert_autoencoder`) converters share.

Names map 1:1 (see ``jaxdiff/nets/__init__.py``): a Flax path joined with '.' is the torch ``state_dict`` key.
Layouts: conv weight torch OIHW <-> Flax HWIO, linear weight torch (out, in) <-> Flax (in, out), 1-D tensors as
they are. Torch's ``*.resample_filter`` buffers are constants that our layers rebuild in code: ``from_edm``
accepts them only if they equal the filter of the net's ``resample_filter`` taps, and ``to_edm`` omits them
(load its output into torch with ``load_state_dict(..., strict=False)``, or let the torch constructor make them).

CLI::

    python -m jaxdiff.nets.convert IN.pkl OUT_DIR

reads an EDM network pickle without running pickled code (``jaxdiff.nets.safe_unpickle``), converts its 'ema'
network and writes ``OUT_DIR/variables`` (orbax) and ``OUT_DIR/net_config.json``; ``load_converted(OUT_DIR)``
gives back ``(net, variables, net_config)``.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import linen as nn
from flax import traverse_util

from jaxdiff import files
from jaxdiff.nets.dhariwal_unet import DhariwalUNet
from jaxdiff.nets.safe_unpickle import UnsafePickleError, load_edm_pickle
from jaxdiff.nets.song_unet import SongUNet

NETS = {'SongUNet': SongUNet, 'DhariwalUNet': DhariwalUNet}
CONFIG_FILE = 'net_config.json'
VARIABLES_DIR = 'variables'
_PREFIX = 'model.'
_FILTER = 'resample_filter'


def abstract_variables(net: nn.Module) -> dict:
    """``jax.eval_shape`` of ``net.init`` on a dummy batch of one: {collection: tree of ShapeDtypeStruct}."""
    res, label_dim, augment_dim = net.img_resolution, net.label_dim, getattr(net, 'augment_dim', 0)
    x = jnp.zeros((1, res, res, net.in_channels))
    labels = jnp.zeros((1, label_dim)) if label_dim else None
    augment = jnp.zeros((1, augment_dim)) if augment_dim else None
    init = lambda key: net.init({'params': key}, x, jnp.ones((1,)), labels, augment_labels=augment, train=False)
    return jax.eval_shape(init, jax.random.key(0))


def _to_flax_layout(a: np.ndarray) -> np.ndarray:
    """Torch layout -> Flax: OIHW -> HWIO, (out, in) -> (in, out), 1-D unchanged."""
    return a.transpose(2, 3, 1, 0) if a.ndim == 4 else a.T if a.ndim == 2 else a


def _to_torch_layout(a: np.ndarray) -> np.ndarray:
    """Flax layout -> torch: HWIO -> OIHW, (in, out) -> (out, in), 1-D unchanged."""
    return a.transpose(3, 2, 0, 1) if a.ndim == 4 else a.T if a.ndim == 2 else a


def _torch_shape(shape: Sequence[int]) -> tuple:
    """The torch-layout shape of a Flax-layout shape."""
    return _to_torch_layout(np.empty(shape, np.bool_)).shape


def _filter_constant(net: nn.Module):
    """EDM's constants: name -> outer(taps, taps) / sum(taps)^2 (1, 1, k, k) for ``*.resample_filter``, else None."""
    taps = np.asarray(getattr(net, _FILTER, (1, 1)), np.float32)
    target = (np.outer(taps, taps) / np.square(taps.sum()))[None, None]
    return lambda name: target if name.split('.')[-1] == _FILTER else None


def _flat(tree: Mapping) -> dict[str, tuple[tuple, Any]]:
    """{'a.b.weight': (('a', 'b', 'weight'), leaf)} for every leaf of a nested dict."""
    return {'.'.join(path): (path, leaf) for path, leaf in traverse_util.flatten_dict(tree).items()}


def _mismatch_error(net: nn.Module, missing: list, unexpected: list, misshaped: list, constants: list,
                    hint: str) -> ValueError:
    """One ValueError listing every problem: a summary line with the fix (``hint``), then one line per key."""
    name = type(net).__name__
    head = (f'state dict does not match {name}: {len(missing)} missing, {len(unexpected)} unexpected, '
            f'{len(misshaped)} mis-shaped, {len(constants)} wrong constant(s) (shapes in torch layout); '
            f'build the {name} with the kwargs the checkpoint was trained with{hint}.')
    lines = [f'  missing: {k} expected {s}' for k, s in missing]
    lines += [f'  unexpected: {k} {s}' for k, s in unexpected]
    lines += [f'  mis-shaped: {k} expected {e}, got {g}' for k, e, g in misshaped]
    lines += [f'  wrong constant: {k} is not the value the {name} computes from its kwargs' for k in constants]
    return ValueError('\n'.join([head, *lines]))


def from_torch(state_dict: Mapping[str, np.ndarray], net: nn.Module, *, prefix: str = '',
               tables: Sequence[str] = (), constants=lambda name: None, hint: str = '',
               abstract: Mapping | None = None) -> dict:
    """A torch ``state_dict`` whose keys are our flattened variable paths -> Flax variables for ``net``.

    Keys may carry ``prefix`` (stripped). Layouts: conv OIHW -> HWIO, Linear (out, in) -> (in, out), except the
    keys in ``tables`` (embedding tables, kept as they are); 1-D as they are. ``constants(name)`` gives the value
    a key must hold when it is a constant our code rebuilds (EDM's resample filters, DiT's position table), else
    None; such keys are checked, not loaded. ``abstract``: ``net``'s variables as ShapeDtypeStructs (default
    :func:`abstract_variables`, for nets called like the denoisers). Returns {collection: tree} of numpy arrays in
    the dtypes ``net.init`` gives (float32). Every missing, unexpected or mis-shaped key and wrong constant is
    reported in one ValueError whose summary ends with ``hint``.
    """
    abstract = abstract_variables(net) if abstract is None else abstract
    expected = {k: (coll, path, leaf) for coll, tree in abstract.items()
                for k, (path, leaf) in _flat(tree).items()}
    layout = lambda name, a: a if name in tables else _to_flax_layout(a)
    torch_shape = lambda name, leaf: leaf.shape if name in tables else _torch_shape(leaf.shape)
    out, seen, unexpected, misshaped, wrong = {}, set(), [], [], []
    for key, value in state_dict.items():
        name, value = key.removeprefix(prefix), np.asarray(value)
        if name in expected:
            coll, path, leaf = expected[name]
            seen.add(name)
            shape = torch_shape(name, leaf)
            if value.shape != shape:
                misshaped.append((name, shape, value.shape))
            else:
                out[(coll, *path)] = np.ascontiguousarray(layout(name, value), dtype=leaf.dtype)
        elif (target := constants(name)) is not None:
            if value.shape != target.shape or not np.allclose(value.astype(np.float32), target, rtol=0, atol=1e-6):
                wrong.append(name)
        else:
            unexpected.append((name, value.shape))
    missing = [(k, torch_shape(k, leaf)) for k, (_, _, leaf) in expected.items() if k not in seen]
    if missing or unexpected or misshaped or wrong:
        raise _mismatch_error(net, missing, unexpected, misshaped, wrong, hint)
    return traverse_util.unflatten_dict(out)


def to_torch(variables: Mapping, tables: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """Flax variables ({'params': ..., ...}) -> torch-layout ``{dotted key: array}``, the inverse of
    :func:`from_torch` (HWIO -> OIHW, (in, out) -> (out, in); ``tables`` as they are); no constants."""
    return {k: np.ascontiguousarray(np.asarray(leaf) if k in tables else _to_torch_layout(np.asarray(leaf)))
            for tree in variables.values() for k, (_, leaf) in _flat(tree).items()}


def from_edm(state_dict: Mapping[str, np.ndarray], net: nn.Module) -> dict:
    """Torch ``state_dict`` of EDM's SongUNet/DhariwalUNet -> Flax variables for ``net``.

    ``state_dict`` maps dotted keys (with or without a leading 'model.', as in a precond's state dict) to arrays
    in torch layouts, e.g. ``enc.32x32_conv.weight`` (O, I, kh, kw). Returns ``{'params': tree}`` plus
    ``'buffers': tree`` when the net has buffers: a variables dict rather than params alone because NCSN++'s
    FourierEmbedding keeps its random frequencies ``map_noise.freqs`` (C/2,) as non-trainable state, outside
    'params'. Arrays are numpy, cast to the dtypes ``net.init`` would give (float32). Every missing,
    unexpected or mis-shaped key (and any resample_filter buffer that is not the net's filter) is reported in
    one ValueError.
    """
    return from_torch(state_dict, net, prefix=_PREFIX, constants=_filter_constant(net),
                      hint=" (load_edm_pickle(path)['model_kwargs']) and pass the inner model's state dict")


def to_edm(variables: Mapping) -> dict[str, np.ndarray]:
    """Flax variables ({'params': ..., 'buffers': ...}) -> torch-layout ``{dotted key: array}`` (no 'model.').

    Inverse of ``from_edm``: conv HWIO -> OIHW, linear (in, out) -> (out, in). The constant resample_filter
    buffers are not emitted.
    """
    return to_torch(variables)


def _net_kwargs(kwargs: Mapping) -> dict:
    """Constructor kwargs with lists made tuples (Flax module attributes must be hashable)."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}


def build_net(name: str, kwargs: Mapping) -> nn.Module:
    """Our Flax ``name`` ('SongUNet' or 'DhariwalUNet') built with EDM's constructor kwargs."""
    if name not in NETS:
        raise ValueError(f'the checkpoint holds a {name}; jaxdiff converts only {", ".join(NETS)}.')
    try:
        return NETS[name](**_net_kwargs(kwargs))
    except TypeError as e:
        raise ValueError(f'cannot build {name} from the checkpoint kwargs {dict(kwargs)}: {e}.') from None


def _read_config(out_dir: str) -> dict | None:
    """OUT_DIR/net_config.json, or None if absent or unreadable."""
    try:
        with open(os.path.join(out_dir, CONFIG_FILE)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def param_count(variables: Mapping) -> int:
    """Number of scalars in variables['params']."""
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(variables['params']))


def convert_pickle(in_path: str, out_dir: str) -> tuple[dict, bool]:
    """EDM network pickle -> OUT_DIR/{variables, net_config.json}; returns (net_config, newly_written).

    Re-running on the same source is a no-op; an OUT_DIR/variables from a different source is never touched
    (FileExistsError). Raises FileNotFoundError, UnsafePickleError, pickle.UnpicklingError or ValueError.
    """
    if not os.path.isfile(in_path):
        raise FileNotFoundError(f'{in_path} does not exist or is not a file.')
    out_dir, sha = os.path.abspath(out_dir), files.sha256(in_path)
    variables_dir = os.path.join(out_dir, VARIABLES_DIR)
    if os.path.exists(variables_dir):
        config = _read_config(out_dir)
        if config and config.get('source', {}).get('sha256') == sha:
            return config, False
        raise FileExistsError(f'{variables_dir} already holds a checkpoint from another source; choose a new '
                              'OUT_DIR or delete that one.')
    try:
        info = load_edm_pickle(in_path)
    except (UnsafePickleError, ValueError):
        raise
    except Exception as e:  # a corrupt file can fail anywhere in the unpickler: report it, never a traceback
        raise pickle.UnpicklingError(f'{in_path} is not a readable pickle ({type(e).__name__}: {e}).') from None
    if info['model'] is None:
        raise ValueError(f'{in_path} holds a bare state dict without network kwargs; build the net yourself and '
                         'call jaxdiff.nets.convert.from_edm(state_dict, net).')
    net = build_net(info['model'], info['model_kwargs'])
    variables = from_edm(info['state_dict'], net)
    config = dict(net=info['model'], net_kwargs=info['model_kwargs'], precond=info['precond'],
                  precond_kwargs=info['precond_kwargs'], param_count=param_count(variables),
                  source=dict(path=os.path.abspath(in_path), sha256=sha))
    os.makedirs(out_dir, exist_ok=True)
    files.write_json(os.path.join(out_dir, CONFIG_FILE), config, indent=2)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(variables_dir, variables)
    return config, True


def load_converted(out_dir: str) -> tuple[nn.Module, dict, dict]:
    """OUT_DIR written by the CLI -> (net, variables {'params', ['buffers']} as jax arrays, net_config dict).

    ``net_config`` has 'net', 'net_kwargs', 'precond' (e.g. 'EDMPrecond'), 'precond_kwargs' (sigma_data, ...),
    'param_count' and 'source' {path, sha256}.
    """
    out_dir = os.path.abspath(out_dir)
    config = _read_config(out_dir)
    if config is None or not os.path.isdir(os.path.join(out_dir, VARIABLES_DIR)):
        raise FileNotFoundError(f'{out_dir} holds no converted network ({CONFIG_FILE} + {VARIABLES_DIR}/); run '
                                'python -m jaxdiff.nets.convert IN.pkl OUT_DIR first.')
    net = build_net(config['net'], config['net_kwargs'])
    with ocp.StandardCheckpointer() as checkpointer:
        variables = checkpointer.restore(os.path.join(out_dir, VARIABLES_DIR), abstract_variables(net))
    return net, variables, config


def _print_error(err: BaseException) -> None:
    """Detail lines first, then one ``error:`` line (the summary) last, all on stderr."""
    head, *details = str(err).splitlines() or [type(err).__name__]
    for line in details:
        print(line, file=sys.stderr)
    print(f'error: {head}', file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit code (0 ok, 2 on any error, after one ``error:`` line)."""
    parser = argparse.ArgumentParser(prog='python -m jaxdiff.nets.convert',
                                     description='Convert an NVlabs/EDM network pickle to a jaxdiff checkpoint.')
    parser.add_argument('in_pkl', help='EDM network pickle (network-snapshot-*.pkl) or torch state dict')
    parser.add_argument('out_dir', help='output folder: variables/ (orbax) and net_config.json')
    args = parser.parse_args(argv)
    try:
        config, written = convert_pickle(args.in_pkl, args.out_dir)
    except (OSError, UnsafePickleError, pickle.UnpicklingError, EOFError, ValueError) as e:
        _print_error(e)
        return 2
    state = 'converted' if written else 'already converted'
    print(f'{state} {config["param_count"]:,} params ({config["precond"] or "no precond"} / {config["net"]}) '
          f'-> {os.path.abspath(args.out_dir)}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
