"""Checkpoints: orbax CheckpointManager (async, keep N) under ``workdir/checkpoints/<step>/``, plus the config.

Each checkpoint holds three items:

- ``state``: the task's state as a dict (:func:`state_to_tree`; e.g. step, params, ema, opt_state, buffers,
  nonfinite), sharded arrays;
- ``data``:  every host's data-iterator state, JSON ``{"process_count": P, "states": [state_0, ..., state_P-1]}``;
- ``meta``:  JSON ``{"step", "fingerprint", "config"}``; ``fingerprint`` is two uint32 checksums per state leaf,
  checked after restore, so a truncated or altered file is detected even where the storage layer would not notice.

Rules: a step directory orbax never finalised (a ``<step>.orbax-checkpoint-tmp`` dir left by kill -9) is ignored
and moved to ``workdir/corrupt_checkpoints/`` (orbax would delete it when saving that step again); a finalised one that fails to restore or to verify is skipped with a warning and, if
an older one restores, moved (never deleted) to ``workdir/corrupt_checkpoints/`` so the run can save that step
again. If every checkpoint is unusable, :class:`CheckpointError` names them and nothing is touched. Before orbax
reads a step, :func:`check_readable` reads its stored values once, so a torn file is reported as the array it
breaks rather than as a traceback from each of orbax's concurrent readers.
``workdir/config.json`` is the run's config; :func:`check_config` refuses a different one unless allowed.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from jaxdiff import files
from jaxdiff.config_ranges import leaves

ITEMS = ('state', 'data', 'meta')
CONFIG_FILE = 'config.json'
INFO_FILE = 'dataset_info.json'


class CheckpointError(RuntimeError):
    """No usable checkpoint, or a checkpoint that cannot be written; the message is one line."""


class ConfigMismatchError(ValueError):
    """The workdir's saved config differs from the new one; the message names the keys."""


# ----------------------------------------------------------------------------------------------- config JSON

def write_dataset_info(workdir: str, info) -> None:
    """``workdir/dataset_info.json``: the DatasetInfo the net was built for (resolution, channels, num_classes,
    size), so sample.py can rebuild the net without the training data."""
    files.write_json(os.path.join(workdir, INFO_FILE), info._asdict())


def read_dataset_info(workdir: str):
    """The DatasetInfo in ``workdir/dataset_info.json``, or None when the run has none (yet)."""
    from jaxdiff.data.sources import DatasetInfo
    path = os.path.join(workdir, INFO_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return DatasetInfo(**json.load(f))
    except (OSError, ValueError, TypeError) as e:
        raise ValueError(f'{path} is unreadable ({e}); restore it from a backup') from e


def net_info(workdir: str, data_info):
    """The DatasetInfo to build the net for: the data's, with the class count of the run already in ``workdir``
    when that is larger (a fine-tuned run keeps classes its new data lacks, e.g. a reserved trigger class).

    Raises ValueError (one line) when the data cannot train the saved net: another resolution or channel count,
    more classes than the net has, or labels for an unconditional net.
    """
    saved = read_dataset_info(workdir)
    if saved is None:
        return data_info
    if ((saved.resolution, saved.channels) != (data_info.resolution, data_info.channels)
            or data_info.num_classes > saved.num_classes or (saved.num_classes == 0) != (data_info.num_classes == 0)):
        raise ValueError(f'the data ({data_info.resolution}x{data_info.resolution}x{data_info.channels}, '
                         f'{data_info.num_classes} classes) does not fit the net of the run in {workdir} '
                         f'({saved.resolution}x{saved.resolution}x{saved.channels}, {saved.num_classes} classes); '
                         'train on matching data or use a new --workdir')
    return data_info._replace(num_classes=saved.num_classes)


def read_config(workdir: str) -> dict:
    """``workdir/config.json`` as a dict; FileNotFoundError / ValueError (one line) when missing or unreadable."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f'{workdir} is not a training run (no {CONFIG_FILE}); pass the --workdir of '
                                'train.py or a folder written by python -m jaxdiff.nets.convert')
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f'{path} is unreadable ({e}); restore it from a backup') from e


def config_dict(config) -> dict:
    """The ConfigDict as a JSON-normalised dict (tuples become lists)."""
    return json.loads(config.to_json_best_effort(sort_keys=True))


def config_diff(old: dict, new: dict) -> list[str]:
    """Dotted keys whose values differ (or exist in one only), sorted."""
    a, b = leaves(old), leaves(new)
    return sorted(k for k in set(a) | set(b) if a.get(k, '<absent>') != b.get(k, '<absent>'))


def _added_at_default(key: str, old: dict, new: dict, defaults: dict) -> bool:
    """A field the library added after the run started, at its default: the run's meaning is unchanged."""
    return key not in leaves(old) and key in defaults and leaves(new).get(key) == defaults[key]


def check_config(workdir: str, config, allow_change: bool, *, write: bool = True, schema=None,
                 upgrade: Optional[Callable[[dict], dict]] = None) -> None:
    """Refuse a workdir whose config.json differs from ``config`` (unless ``allow_change``), then write it.

    With ``allow_change`` the previous config.json is kept as ``config.<unix time>.json`` (nothing is lost).
    Fields missing from the old config.json that the new config holds at their library default (fields added
    to jaxdiff since the run started) are not a difference; ``schema`` is the task's ConfigDict of defaults (None:
    every difference counts). ``upgrade`` turns the saved config into today's field names (the task's renames), so
    a renamed field is not a difference (None: as saved). Raises ConfigMismatchError (one line naming the differing
    keys). ``write=False``: check only (other hosts).
    """
    path = os.path.join(workdir, CONFIG_FILE)
    new = config_dict(config)
    defaults = leaves(config_dict(schema)) if schema is not None else {}
    if os.path.exists(path):
        try:
            with open(path) as f:
                old = json.load(f)
        except (OSError, ValueError) as e:
            raise ConfigMismatchError(f'{path} is unreadable ({e}); restore it or use a new --workdir') from e
        old = upgrade(old) if upgrade else old
        diff = [k for k in config_diff(old, new) if not _added_at_default(k, old, new, defaults)]
        if not diff:
            return
        if not allow_change:
            shown = ', '.join(f'{k} ({leaves(old).get(k, "<absent>")!r} -> {leaves(new).get(k, "<absent>")!r})'
                              for k in diff[:8]) + (' ...' if len(diff) > 8 else '')
            raise ConfigMismatchError(f'config differs from {path} in {shown}; pass --allow_config_change to resume '
                                      'with the new config, or use a new --workdir')
        logging.warning('config changed in %s; resuming with the new config', ', '.join(diff))
        if write:
            os.replace(path, os.path.join(workdir, f'config.{int(time.time())}.json'))
    if write:
        os.makedirs(workdir, exist_ok=True)
        files.write_bytes(path, json.dumps(new, indent=2, sort_keys=True).encode())


# ----------------------------------------------------------------------------------------------- fingerprints

def _leaf_sums(x: jax.Array) -> jax.Array:
    """Two wrapping uint32 checksums of a leaf's bits: sum(u) and sum(u * (2 i + 1)), i the flat index."""
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        u = x.astype(jnp.uint32)
    else:
        width = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
        u = jax.lax.bitcast_convert_type(x, width).astype(jnp.uint32)
    u = u.reshape(-1)
    idx = jnp.arange(u.shape[0], dtype=jnp.uint32) * jnp.uint32(2) + jnp.uint32(1)
    return jnp.stack([jnp.sum(u, dtype=jnp.uint32), jnp.sum(u * idx, dtype=jnp.uint32)])


@jax.jit
def _copy(tree):
    """A copy of every array of ``tree`` in one program (per-leaf eager copies compile one program per shape)."""
    return jax.tree.map(jnp.copy, tree)


@jax.jit
def _fingerprint_arrays(leaves):
    return [_leaf_sums(x) for x in leaves]


def fingerprint(tree) -> dict[str, list[int]]:
    """Checksums of every leaf of a pytree of (possibly sharded, multi-host) arrays: {'params/enc/...': [s1, s2]}.

    Keys are the leaves' simple paths, so a tree restored as plain dicts/lists matches the saved one. Integer sums
    wrap, so the result does not depend on the reduction order, device count or sharding.
    """
    paths_leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    sums = jax.device_get(_fingerprint_arrays([leaf for _, leaf in paths_leaves]))
    return {jax.tree_util.keystr(path, simple=True, separator='/'): [int(v) for v in np.asarray(s)]
            for (path, _), s in zip(paths_leaves, sums)}


# ----------------------------------------------------------------------------------------------- data state

def gather_data_states(local_state: dict) -> dict:
    """Every process's JSON iterator state -> {"process_count": P, "states": [...]} (identical on all hosts)."""
    if jax.process_count() == 1:
        return {'process_count': 1, 'states': [local_state]}
    from jax.experimental import multihost_utils
    raw = np.frombuffer(json.dumps(local_state).encode(), np.uint8)
    lengths = np.asarray(multihost_utils.process_allgather(np.int32(raw.size)))
    padded = np.zeros((int(lengths.max()),), np.uint8)
    padded[:raw.size] = raw
    every = np.asarray(multihost_utils.process_allgather(padded))
    states = [json.loads(every[i, :lengths[i]].tobytes().decode()) for i in range(len(lengths))]
    return {'process_count': len(states), 'states': states}


# ----------------------------------------------------------------------------------------------- manager

def _is_primary() -> bool:
    return jax.process_index() == 0


class Checkpointer:
    """Saves and restores training checkpoints in ``workdir/checkpoints`` (see the module docstring).

    :func:`state_to_tree` / :func:`tree_to_state` convert a task's state to and from the plain dict that is stored.
    """

    def __init__(self, workdir: str, keep: int, *, use_async: bool = True):
        self.workdir = workdir
        self.directory = os.path.abspath(os.path.join(workdir, 'checkpoints'))
        self.keep = keep
        self.use_async = use_async
        self._manager: Optional[ocp.CheckpointManager] = None
        self._last_saved = -1

    # -- manager lifecycle
    def _open(self) -> ocp.CheckpointManager:
        if self._manager is None:
            options = ocp.CheckpointManagerOptions(max_to_keep=self.keep, create=True,
                                                   enable_async_checkpointing=self.use_async)
            self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)
        return self._manager

    def steps(self) -> list[int]:
        """Finalised checkpoint steps, ascending (tmp dirs of unfinished saves are not listed)."""
        if not os.path.isdir(self.directory):
            return []
        return sorted(self._open().all_steps())

    def partial_dirs(self) -> list[str]:
        """Names of unfinished (tmp) checkpoint directories in the checkpoint folder."""
        if not os.path.isdir(self.directory):
            return []
        return sorted(n for n in os.listdir(self.directory) if '.orbax-checkpoint-tmp' in n)

    # -- save
    def save(self, state, data_states: dict, config) -> None:
        """Start an async save of ``state`` (a task's state) at its ``step`` with the data states and config.

        On the CPU backend the arrays are first copied (the train step donates its input buffers).
        """
        step = int(jax.device_get(state_to_tree(state)['step']))
        if step == self._last_saved or step in self.steps():
            return  # already saved (the final save right after a periodic one, or the step we resumed from)
        self._last_saved = step
        tree = state_to_tree(state)
        if jax.default_backend() == 'cpu':
            tree = jax.tree.map(jnp.copy, tree)
        meta = {'step': step, 'fingerprint': fingerprint(tree), 'config': config_dict(config)}
        self._open().save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(tree), data=ocp.args.JsonSave(data_states), meta=ocp.args.JsonSave(meta)),
            force=True)

    def wait(self) -> None:
        """Block until pending async saves are committed."""
        if self._manager is not None:
            self._manager.wait_until_finished()

    def close(self) -> None:
        """Wait for pending saves and release the manager."""
        if self._manager is not None:
            self._manager.wait_until_finished()
            self._manager.close()
            self._manager = None

    # -- restore
    def restore_step(self, step: int, abstract_state):
        """(state, data dict, meta dict) of checkpoint ``step``, laid out as ``abstract_state``'s shardings.

        Raises CheckpointError when a file is missing, truncated or its fingerprint does not match.
        """
        abstract_tree = state_to_tree(abstract_state)
        try:
            check_readable(os.path.join(self.directory, str(step), 'state'))
            restored = self._open().restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_tree), data=ocp.args.JsonRestore(),
                meta=ocp.args.JsonRestore()))
            tree, data, meta = restored['state'], restored['data'], restored['meta']
        except Exception as e:  # orbax / tensorstore raise many types for damaged files
            raise CheckpointError(f'step {step}: {_one_line(e)}') from e
        if not isinstance(meta, dict) or not isinstance(data, dict) or 'states' not in data:
            raise CheckpointError(f'step {step}: the data or meta item is missing or malformed')
        leaves = jax.tree.leaves(tree)
        treedef = jax.tree.structure(abstract_tree)
        if len(leaves) != treedef.num_leaves:
            raise CheckpointError(f'step {step}: the state has {len(leaves)} arrays, the model needs '
                                  f'{treedef.num_leaves}')
        tree = jax.tree.unflatten(treedef, leaves)
        if meta.get('fingerprint') != fingerprint(tree):
            raise CheckpointError(f'step {step}: checksum mismatch (a file was truncated or altered)')
        return tree_to_state(abstract_state, tree), data, meta

    def restore_latest(self, abstract_state):
        """Restore the newest usable checkpoint: (state, data dict, meta dict), or None if there is none.

        Unusable newer checkpoints are reported with a warning and moved to ``workdir/corrupt_checkpoints``
        once an older one has restored; if none restores, raises CheckpointError and moves nothing.
        """
        partial = self.partial_dirs()
        if partial:  # orbax would silently delete a stale tmp dir when it saves that step again: move it aside
            self._set_aside(partial, 'unfinished checkpoint (left by an interrupted save)')
        steps = self.steps()
        failures = []
        for step in reversed(steps):
            try:
                result = self.restore_step(step, abstract_state)
            except CheckpointError as e:
                logging.warning('skipping damaged checkpoint %s', e)
                failures.append(step)
                continue
            if failures:
                self._set_aside(failures)
            return result
        if failures:
            raise CheckpointError(
                f'no usable checkpoint in {self.directory}: step(s) {", ".join(map(str, failures))} are damaged '
                '(see the warnings above); move them away to start afresh, or point --workdir elsewhere')
        return None

    def _set_aside(self, names: list, what: str = 'damaged checkpoint') -> None:
        """Move step dirs (names or steps) to workdir/corrupt_checkpoints/<name>-<time> (primary host), then reopen
        the manager. Nothing is deleted."""
        self.close()
        if _is_primary():
            target = os.path.join(self.workdir, 'corrupt_checkpoints')
            os.makedirs(target, exist_ok=True)
            for name in names:
                dest = os.path.join(target, f'{name}-{int(time.time())}')
                shutil.move(os.path.join(self.directory, str(name)), dest)
                logging.warning('ignoring %s %s: moved to %s (kept, not deleted)', what, name, dest)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices('jaxdiff_checkpoint_set_aside')


def check_readable(state_dir: str, batch: int = 64) -> None:
    """Read every stored value of the OCDBT key-value store in ``state_dir`` once; raises on the first one a
    truncated or missing file makes unreadable. No-op for a directory without an OCDBT manifest.

    Why: orbax reads all arrays concurrently, and when a file is damaged every failing read in every thread prints
    its own traceback (asyncio's "exception was never retrieved", tensorstore callbacks on a closed loop), after
    the one exception we report. Plain tensorstore futures raise only where ``.result()`` is called. Costs one
    read of the (compressed) state, ``batch`` values at a time.
    """
    if not os.path.exists(os.path.join(state_dir, 'manifest.ocdbt')):
        return
    import tensorstore as ts
    base = state_dir if '://' in state_dir else 'file://' + os.path.abspath(state_dir)
    store = ts.KvStore.open({'driver': 'ocdbt', 'base': base.rstrip('/') + '/'}).result()
    keys = store.list().result()
    for start in range(0, len(keys), batch):
        reads = [(key, store.read(key)) for key in keys[start:start + batch]]
        for key, read in reads:
            name = key.decode(errors='replace')
            try:
                found = read.result().state == 'value'
            except ValueError as e:  # tensorstore's error names the byte range, not the array
                raise ValueError(f'stored value {name!r} is unreadable ({_one_line(e)})') from e
            if not found:
                raise ValueError(f'stored value {name!r} is missing')


def _one_line(e: BaseException) -> str:
    text = ' '.join(str(e).split()) or type(e).__name__
    text = text.split(' See full TensorStore details')[0]
    return f'{type(e).__name__}: {text[:300]}'


def state_to_tree(state) -> dict:
    """A task's state (or its abstract twin) -> the stored dict: a dict as it is, a flax struct as {field: value}
    (e.g. {step, params, ema, opt_state, buffers, nonfinite}; the fields keep their own containers, so the stored
    paths are those of the state)."""
    if isinstance(state, dict):
        return dict(state)
    return {field.name: getattr(state, field.name) for field in dataclasses.fields(state)}


def tree_to_state(template, tree: dict):
    """The stored dict back into ``template``'s type (a dict, or the flax struct's class)."""
    if isinstance(template, dict):
        return {name: tree[name] for name in template}
    return template.replace(**tree)


def _reader(workdir: str) -> ocp.CheckpointManager:
    """A manager that reads (never writes) ``workdir/checkpoints`` without knowing the model."""
    directory = os.path.abspath(os.path.join(workdir, 'checkpoints'))
    handlers = {'state': ocp.PyTreeCheckpointHandler(), 'data': ocp.JsonCheckpointHandler(),
                'meta': ocp.JsonCheckpointHandler()}
    return ocp.CheckpointManager(directory, item_handlers=handlers,
                                 options=ocp.CheckpointManagerOptions(create=False))


def _numpy_state(manager: ocp.CheckpointManager, step: int) -> dict:
    metadata = manager.item_metadata(step)['state']
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), metadata)
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(restore_args=restore_args)))
    return jax.tree.map(np.asarray, restored['state'])


def _checked_state(manager: ocp.CheckpointManager, step: int) -> tuple[Optional[dict], Optional[str]]:
    """(numpy state, None) when checkpoint ``step`` restores and matches its fingerprint, else (None, reason)."""
    try:
        check_readable(os.path.join(str(manager.directory), str(step), 'state'))
        tree = _numpy_state(manager, step)
        meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']
    except Exception as e:  # damaged files raise many types
        return None, _one_line(e)
    if meta.get('fingerprint') != fingerprint(tree):
        return None, 'checksum mismatch'
    return tree, None


def verify(workdir: str) -> dict[int, Optional[str]]:
    """Check every finalised checkpoint of ``workdir`` against its stored fingerprint (numpy restore, any device
    count): {step: None if intact else the one-line reason}."""
    with _reader(workdir) as manager:
        return {step: _checked_state(manager, step)[1] for step in sorted(manager.all_steps())}


def load_arrays(workdir: str, step: Optional[int] = None) -> dict:
    """The stored state of ``workdir``'s checkpoint ``step`` as numpy arrays (any device count, no model needed).

    step None: the newest checkpoint that restores and matches its fingerprint (damaged newer ones are skipped
    with a warning and left in place). Returns {'step', 'params', 'ema', 'opt_state', 'buffers', 'nonfinite'}.
    Raises CheckpointError (one line) when there is no usable checkpoint or ``step`` is absent or damaged.
    """
    with _reader(workdir) as manager:
        steps = sorted(manager.all_steps(), reverse=True)
        if step is not None:
            if step not in steps:
                raise CheckpointError(f'{manager.directory} has no checkpoint {step} (it has: '
                                      f'{", ".join(map(str, sorted(steps))) or "none"})')
            steps = [step]
        failures = []
        for candidate in steps:
            tree, reason = _checked_state(manager, candidate)
            if reason is not None:
                failures.append(f'step {candidate}: {reason}')
                continue
            for failure in failures:
                logging.warning('skipping damaged checkpoint %s', failure)
            return tree
        if failures:
            raise CheckpointError(f'no usable checkpoint in {manager.directory}: {"; ".join(failures)}')
        raise CheckpointError(f'no checkpoint in {manager.directory}; train first (python train.py ...) or point '
                              '--workdir at a run that has saved one')
