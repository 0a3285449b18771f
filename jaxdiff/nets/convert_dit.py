"""Official DiT checkpoints (facebookresearch/DiT) -> jaxdiff's :class:`~jaxdiff.nets.dit.DiT` variables, and back.

The published files (``DiT-XL-2-256x256.pt``, ``DiT-XL-2-512x512.pt``) are torch state dicts; the training
script's checkpoints (``0400000.pt``) hold {'model', 'ema', 'opt', 'args'}, of which the EMA weights are the
ones to sample with. Both are read by :func:`jaxdiff.nets.safe_unpickle.safe_load`, which never runs pickled code.
Names map 1:1 (see :mod:`jaxdiff.nets.dit`); the label table is kept as it is (a table, not a Linear) and the
frozen ``pos_embed`` is checked against the one DiT computes, not loaded.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flax import linen as nn

from jaxdiff.nets.convert import from_torch, to_torch
from jaxdiff.nets.dit import DiT, pos_embed_2d
from jaxdiff.nets.safe_unpickle import safe_load

TABLE = 'y_embedder.embedding_table.weight'
POS_EMBED = 'pos_embed'


def _pos_embed(net: DiT) -> np.ndarray:
    """The reference's frozen position table of ``net``: (1, T, hidden_size) float32."""
    return pos_embed_2d(net.hidden_size, net.img_resolution // net.patch_size)[None]


def from_dit(state_dict: Mapping[str, np.ndarray], net: DiT) -> dict:
    """The reference's ``DiT.state_dict()`` (torch layouts, e.g. ``x_embedder.proj.weight`` (D, C, p, p)) ->
    ``{'params': tree}`` for ``net`` (numpy float32). A ``module.`` prefix (DDP) is stripped. Every missing,
    unexpected or mis-shaped key, and a ``pos_embed`` that is not ``net``'s, is reported in one ValueError."""
    prefix = 'module.' if any(k.startswith('module.') for k in state_dict) else ''
    return from_torch(state_dict, net, prefix=prefix, tables=(TABLE,),
                      constants=lambda name: _pos_embed(net) if name == POS_EMBED else None,
                      hint=' (e.g. jaxdiff.nets.dit.dit("XL/2", img_resolution=32) for DiT-XL-2-256x256.pt: '
                           'input_size = image size / 8)')


def to_dit(variables: Mapping, net: DiT) -> dict[str, np.ndarray]:
    """Inverse of :func:`from_dit`: a state dict the reference's ``DiT.load_state_dict`` takes strictly
    (torch layouts, with the frozen ``pos_embed`` (1, T, D))."""
    return {**to_torch(variables, tables=(TABLE,)), POS_EMBED: _pos_embed(net)}


def read_dit_checkpoint(path: str) -> dict[str, np.ndarray]:
    """A DiT ``.pt`` file -> its state dict (numpy, torch layouts): the file itself when it is a state dict, else
    its 'ema' entry (the training script's checkpoints), else 'model'. Raises ValueError for anything else."""
    obj = safe_load(path)
    if isinstance(obj, Mapping):
        for key in ('ema', 'model'):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not (isinstance(obj, Mapping) and obj and all(isinstance(v, np.ndarray) for v in obj.values())):
        raise ValueError(f'{path} holds no DiT state dict: expected a torch state dict or a training checkpoint '
                         "with an 'ema' or 'model' entry")
    return dict(obj)


def load_dit(path: str, net: nn.Module) -> dict:
    """``from_dit(read_dit_checkpoint(path), net)``: a DiT checkpoint file -> {'params': tree} for ``net``."""
    return from_dit(read_dit_checkpoint(path), net)
