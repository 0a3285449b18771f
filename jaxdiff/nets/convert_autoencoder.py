"""Load diffusers ``AutoencoderKL`` weights into ``jaxdiff.nets.autoencoder_kl.AutoencoderKL``, and back.

Names map 1:1 (a Flax parameter path joined with '.' is the diffusers ``state_dict`` key); layouts: conv weight
torch OIHW <-> Flax HWIO, linear weight torch (out, in) <-> Flax (in, out), 1-D tensors as they are. Three
spellings of the same weights load:

- diffusers today: ``encoder.mid_block.attentions.0.to_q.weight``, ..., ``to_out.0``;
- diffusers before 0.14: the mid-block attention as ``query``/``key``/``value``/``proj_attn`` (renamed here as
  diffusers renames them on load; 1x1-conv-shaped (C, C, 1, 1) or (C, C, 1) weights are squeezed);
- CompVis / ldm (``sd-v1-*.ckpt``, ``vae-ft-mse-*.ckpt``): ``encoder.down.0.block.0.nin_shortcut``,
  ``mid.attn_1.q``, ``norm_out``, ``decoder.up.{L-1-i}`` for up block i, optionally under a ``state_dict`` entry
  and a ``first_stage_model.`` or ``vae.`` prefix (as diffusers' single-file loader reads them).

Typical use::

    vae = AutoencoderKL()                     # the checkpoint's config.json values, if not SD's kl-f8
    variables = from_diffusers(read_state_dict('vae/diffusion_pytorch_model.safetensors'), vae)
"""
from __future__ import annotations

import json
import os
import re
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from jaxdiff.nets.autoencoder_kl import AutoencoderKL
from jaxdiff.nets.convert import from_torch, to_torch
from jaxdiff.nets.safe_unpickle import safe_load

_LDM_PREFIXES = ('first_stage_model.', 'vae.')  # an SD checkpoint keeps its VAE under one of these
_OLD_ATTENTION = {'query': 'to_q', 'key': 'to_k', 'value': 'to_v', 'proj_attn': 'to_out.0'}
_LDM_ATTENTION = {'norm': 'group_norm', 'q': 'to_q', 'k': 'to_k', 'v': 'to_v', 'proj_out': 'to_out.0'}
_ATTENTION_WEIGHT = re.compile(r'\.attentions\.\d+\.(to_q|to_k|to_v|to_out\.0)\.weight$')


def _is_safetensors(path: str) -> bool:
    """Whether ``path`` starts like a safetensors file: an 8-byte little-endian header length, then JSON '{'."""
    with open(path, 'rb') as f:
        head = f.read(9)
    return len(head) == 9 and head[8:] == b'{' and int.from_bytes(head[:8], 'little') < os.path.getsize(path)


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A VAE checkpoint file -> ``{dotted key: numpy array}`` in torch layouts (keys as stored).

    Reads ``diffusion_pytorch_model.safetensors`` (any safetensors file) and ``torch.save`` files (``.bin``,
    ``.pt``, ``.ckpt``; zip or legacy) without running pickled code (``jaxdiff.nets.safe_unpickle``). A file
    whose object holds the weights under ``'state_dict'`` (CompVis / PyTorch Lightning) gives that entry; if its
    keys carry ``first_stage_model.`` or ``vae.``, only those keys are kept, without the prefix. Raises
    FileNotFoundError, ValueError (not a state dict), or the unpickler's UnsafePickleError / UnpicklingError.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f'{path} does not exist or is not a file.')
    if _is_safetensors(path):
        import safetensors.numpy  # a dependency of this loader only
        obj = safetensors.numpy.load_file(path)
    else:
        obj = safe_load(path)
    if isinstance(obj, Mapping) and isinstance(obj.get('state_dict'), Mapping):
        obj = obj['state_dict']
    if not (isinstance(obj, Mapping) and obj and all(isinstance(k, str) for k in obj)):
        raise ValueError(f'{path} holds no state dict ({{name: tensor}}); found {type(obj).__name__}.')
    arrays = {k: v for k, v in obj.items() if isinstance(v, np.ndarray)}
    for prefix in _LDM_PREFIXES:
        if any(k.startswith(prefix) for k in arrays):
            return {k.removeprefix(prefix): v for k, v in arrays.items() if k.startswith(prefix)}
    return arrays


def abstract_params(net: nn.Module) -> dict:
    """``jax.eval_shape`` of ``net.init`` on the smallest valid image: {'params': tree of ShapeDtypeStruct}."""
    side = 2 ** (len(net.block_out_channels) - 1)
    x = jnp.zeros((1, side, side, net.in_channels))
    return jax.eval_shape(lambda key: net.init(key, x), jax.random.key(0))


def _ldm_to_diffusers(key: str, levels: int) -> str:
    """A CompVis/ldm VAE key -> its diffusers key (unchanged if it is not ldm-style); ``levels`` is
    len(block_out_channels), needed because ldm numbers decoder levels from the bottom (up.{L-1-i})."""
    parts = key.split('.')
    if parts[0] not in ('encoder', 'decoder') or len(parts) < 3:
        return key
    half, rest = parts[0], parts[1:]
    if rest[0] == 'norm_out':
        rest = ['conv_norm_out', *rest[1:]]
    elif rest[0] in ('down', 'up') and len(rest) >= 4 and rest[1].isdigit():
        level = int(rest[1]) if rest[0] == 'down' else levels - 1 - int(rest[1])
        blocks = 'down_blocks' if rest[0] == 'down' else 'up_blocks'
        if rest[2] == 'block':  # down.i.block.j.X -> down_blocks.i.resnets.j.X
            rest = [blocks, str(level), 'resnets', *rest[3:]]
        elif rest[2] in ('downsample', 'upsample'):  # down.i.downsample.conv.X -> down_blocks.i.downsamplers.0.conv.X
            rest = [blocks, str(level), rest[2] + 'rs', '0', *rest[3:]]
        else:
            return key
    elif rest[0] == 'mid' and rest[1] in ('block_1', 'block_2'):
        rest = ['mid_block', 'resnets', str(int(rest[1][-1]) - 1), *rest[2:]]
    elif rest[0] == 'mid' and rest[1] == 'attn_1' and len(rest) >= 3 and rest[2] in _LDM_ATTENTION:
        rest = ['mid_block', 'attentions', '0', _LDM_ATTENTION[rest[2]], *rest[3:]]
    else:
        return key
    return '.'.join([half, *rest]).replace('.nin_shortcut.', '.conv_shortcut.')


def _diffusers_name(key: str, levels: int) -> str:
    """Any supported spelling of a key -> today's diffusers key."""
    key = _ldm_to_diffusers(key, levels)
    return re.sub(r'(\.attentions\.\d+)\.(query|key|value|proj_attn)\.',
                  lambda m: f'{m.group(1)}.{_OLD_ATTENTION[m.group(2)]}.', key)


def _squeeze_attention(name: str, value: np.ndarray) -> np.ndarray:
    """Old checkpoints store the attention projections as 1x1 convs (C, C, 1, 1) or conv1d (C, C, 1): drop the
    unit dims, as diffusers does on load; anything else is returned as is (and fails the shape check)."""
    if _ATTENTION_WEIGHT.search(name) and value.ndim > 2 and all(d == 1 for d in value.shape[2:]):
        return value.reshape(value.shape[:2])
    return value


def from_diffusers(state_dict: Mapping[str, np.ndarray], net: nn.Module) -> dict:
    """diffusers (or older diffusers, or CompVis) AutoencoderKL ``state_dict`` -> ``{'params': tree}`` for ``net``.

    ``state_dict`` maps dotted keys to arrays in torch layouts, e.g. ``encoder.conv_in.weight`` (O, I, 3, 3) and
    ``encoder.mid_block.attentions.0.to_q.weight`` (out, in). Arrays come back as numpy float32 (what
    ``net.init`` gives), in Flax layouts. Every missing, unexpected or mis-shaped key is reported in one
    ValueError; a key given twice under two spellings counts as unexpected.
    """
    levels, renamed = len(net.block_out_channels), {}
    for key, value in state_dict.items():
        name = _diffusers_name(key, levels)
        if name in renamed:  # a second spelling of a weight already given: left under its own key, unexpected
            renamed[f'{key} (again, as {name})'] = np.asarray(value)
        else:
            renamed[name] = _squeeze_attention(name, np.asarray(value))
    config = (f'block_out_channels={tuple(net.block_out_channels)}, layers_per_block={net.layers_per_block}, '
              f'latent_channels={net.latent_channels}, norm_num_groups={net.norm_num_groups}')
    return from_torch(renamed, net, abstract=abstract_params(net),
                      hint=f" (here {config}: those of its config.json) and pass the VAE's own state dict "
                           '(vae/diffusion_pytorch_model.safetensors, or an SD checkpoint read by read_state_dict)')


def to_diffusers(variables: Mapping) -> dict[str, np.ndarray]:
    """Flax variables ``{'params': tree}`` -> diffusers ``{dotted key: array}`` (torch layouts, today's names).

    The inverse of ``from_diffusers``; ``AutoencoderKL(...).load_state_dict`` in diffusers takes it as is (after
    ``torch.from_numpy``), and ``safetensors.numpy.save_file`` writes it as diffusion_pytorch_model.safetensors.
    """
    return to_torch({'params': variables['params']})


# diffusers config.json keys that are AutoencoderKL fields of the same name.
_CONFIG_FIELDS = ('in_channels', 'out_channels', 'latent_channels', 'block_out_channels', 'layers_per_block',
                  'norm_num_groups', 'mid_block_add_attention', 'use_quant_conv', 'use_post_quant_conv')
WEIGHT_FILES = ('diffusion_pytorch_model.safetensors', 'diffusion_pytorch_model.bin')


def load_diffusers_folder(folder: str) -> tuple[AutoencoderKL, dict, dict]:
    """A diffusers VAE folder (``config.json`` + ``diffusion_pytorch_model.safetensors`` or ``.bin``, e.g. the
    ``vae/`` of a Stable Diffusion repository) -> (AutoencoderKL, {'params': tree}, its config.json dict).
    Raises FileNotFoundError / ValueError (one line) for a folder that is not one."""
    try:
        with open(os.path.join(folder, 'config.json')) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f'{folder} has no readable config.json ({e}); pass a diffusers AutoencoderKL '
                                'folder') from None
    if config.get('_class_name') != 'AutoencoderKL':
        raise ValueError(f'{folder}/config.json describes a {config.get("_class_name")!r}, not an AutoencoderKL')
    blocks = set(config.get('down_block_types', ['DownEncoderBlock2D'])) | set(
        config.get('up_block_types', ['UpDecoderBlock2D']))
    if blocks - {'DownEncoderBlock2D', 'UpDecoderBlock2D'}:
        raise ValueError(f'{folder}: block types {sorted(blocks)}; jaxdiff builds DownEncoderBlock2D / '
                         'UpDecoderBlock2D autoencoders only')
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items() if k in _CONFIG_FIELDS}
    net = AutoencoderKL(**kwargs)
    weights = next((os.path.join(folder, w) for w in WEIGHT_FILES if os.path.isfile(os.path.join(folder, w))), None)
    if weights is None:
        raise FileNotFoundError(f'{folder} has none of {", ".join(WEIGHT_FILES)}')
    return net, from_diffusers(read_state_dict(weights), net), config
