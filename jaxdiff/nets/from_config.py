"""Config -> network and network -> denoiser: EDM's architecture presets (train.py's ddpmpp / ncsnpp / adm), or
the noise-conditional classifier when ``config.task == 'noisy_classifier'``.

Only the preset-specific options are fixed here; sizes (model_channels, channel_mult, ...) and regularisation
(dropout, label_dropout) come from ``config.model``. label_dim is the class count when ``config.data.use_labels``,
augment_dim is 9 when ``config.loss.augment_p > 0`` (the augmentation's labels are fed to the net).
"""
from __future__ import annotations

from typing import Any, Optional

import jax.numpy as jnp
from flax import linen as nn

from jaxdiff import precond
from jaxdiff.denoiser import Denoiser
from jaxdiff.nets import AutoencoderKL, DhariwalUNet, DiT, SongUNet
from jaxdiff.nets.mlp import MLP
from jaxdiff.nets.noisy_classifier import NoisyClassifier

AUGMENT_DIM = 9
PRESETS = {
    'ddpmpp': dict(embedding_type='positional', encoder_type='standard', decoder_type='standard',
                   channel_mult_noise=1, resample_filter=(1, 1)),
    'ncsnpp': dict(embedding_type='fourier', encoder_type='residual', decoder_type='standard',
                   channel_mult_noise=2, resample_filter=(1, 3, 3, 1)),
    'adm': {},
    'dit': {},
    'mlp': {},
}
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
PRECONDS = {'edm': precond.edm, 'vp': precond.vp, 've': precond.ve}
TASKS = ('denoiser', 'noisy_classifier')  # the tasks of this config schema (jaxdiff.tasks.registry has all)


def is_classifier(config) -> bool:
    """Whether ``config`` trains the noise-conditional classifier (run dirs older than ``task`` are denoisers)."""
    return config.get('task', 'denoiser') == 'noisy_classifier'


def check_task(config) -> None:
    """One clear error for a ``task`` no run can use, or classifier settings that contradict each other.

    The classifier predicts the label, so it needs labels (use_labels) and never drops them (label_dropout 0);
    augmentation would need its labels fed to the net (augment_p 0); it generates nothing (sample_every 0).
    """
    task = config.get('task', 'denoiser')
    if task not in TASKS:
        raise ValueError(f'config.task={task!r} is not supported: use one of {list(TASKS)}')
    if task != 'noisy_classifier':
        return
    rules = [(config.data.use_labels, 'config.data.use_labels=False: a noisy classifier learns the class labels; '
                                      'set --config.data.use_labels=True on a labelled dataset'),
             (config.model.label_dropout == 0, f'config.model.label_dropout={config.model.label_dropout} must be 0 '
                                               'for task=noisy_classifier (the labels are its targets)'),
             (config.loss.augment_p == 0, f'config.loss.augment_p={config.loss.augment_p} must be 0 for '
                                          'task=noisy_classifier (no augmentation labels are fed to it)'),
             (config.sample_every == 0, f'config.sample_every={config.sample_every} must be 0 for '
                                        'task=noisy_classifier (a classifier has no samples to draw)'),
             (0 < config.loss.sigma_min < config.loss.sigma_max,
              f'config.loss.sigma_min={config.loss.sigma_min}, sigma_max={config.loss.sigma_max}: need '
              '0 < sigma_min < sigma_max')]
    for ok, message in rules:
        if not ok:
            raise ValueError(message)


def _choice(name: str, value: str, table: dict) -> Any:
    """table[value], or one clear error naming the config field and its allowed values."""
    if value not in table:
        raise ValueError(f'config.model.{name}={value!r} is not supported: use one of {sorted(table)}.')
    return table[value]


def build_net(config, info) -> nn.Module:
    """The network for ``config.model`` on data described by ``info`` (resolution, channels, num_classes).

    task=noisy_classifier: a NoisyClassifier x (B, res, res, channels), noise_labels (B,) -> logits
    (B, num_classes) (sizes, dropout and dtype from ``config.model``; ``arch`` is not read). Otherwise returns a
    SongUNet (ddpmpp, ncsnpp), DhariwalUNet (adm), DiT (dit: patch_size, hidden_size, depth, num_heads; its
    dropout is the reference's, none) or MLP (mlp, for 2-D points stored as (1, 1, 2) images) taking
    x (B, res, res, channels) and returning the same shape; float32 params, compute in ``config.model.dtype``.
    """
    m = config.model
    if is_classifier(config):
        check_task(config)
        if info.num_classes < 2:
            raise ValueError(f'data.source={config.data.source!r} has {info.num_classes} classes: a noisy classifier '
                             'needs a labelled dataset with at least 2 classes')
        return NoisyClassifier(img_resolution=info.resolution, in_channels=info.channels,
                               num_classes=info.num_classes, model_channels=m.model_channels,
                               channel_mult=tuple(m.channel_mult), channel_mult_emb=m.channel_mult_emb,
                               num_blocks=m.num_blocks, attn_resolutions=tuple(m.attn_resolutions),
                               dropout=m.dropout, dtype=_choice('dtype', m.dtype, DTYPES))
    preset = _choice('arch', m.arch, PRESETS)
    base = dict(img_resolution=info.resolution, in_channels=info.channels, out_channels=info.channels,
                label_dim=info.num_classes if config.data.use_labels else 0, model_channels=m.model_channels,
                num_blocks=m.num_blocks, dropout=m.dropout, label_dropout=m.label_dropout,
                dtype=_choice('dtype', m.dtype, DTYPES))
    if m.arch == 'mlp':
        return MLP(**base)
    if m.arch == 'dit':
        # Trained here under a continuous preconditioning, so no learned-variance channels.
        if info.resolution % m.patch_size or m.hidden_size % m.num_heads or m.hidden_size % 4:
            raise ValueError(f'config.model: DiT needs data.resolution ({info.resolution}) divisible by patch_size '
                             f'({m.patch_size}) and hidden_size ({m.hidden_size}) by num_heads ({m.num_heads}) and 4')
        if config.loss.augment_p > 0:
            raise ValueError(f'config.loss.augment_p={config.loss.augment_p}: DiT takes no augmentation labels, so '
                             'augmented images would leak into its samples; set --config.loss.augment_p=0')
        return DiT(img_resolution=info.resolution, in_channels=info.channels, label_dim=base['label_dim'],
                   patch_size=m.patch_size, hidden_size=m.hidden_size, depth=m.depth, num_heads=m.num_heads,
                   label_dropout=m.label_dropout, learn_sigma=False, dtype=base['dtype'])
    common = dict(base, augment_dim=AUGMENT_DIM if config.loss.augment_p > 0 else 0,
                  channel_mult=tuple(m.channel_mult), channel_mult_emb=m.channel_mult_emb,
                  attn_resolutions=tuple(m.attn_resolutions))
    if m.arch == 'adm':
        return DhariwalUNet(**common)
    return SongUNet(**common, **preset)


def denoiser_fn(config, net: nn.Module, variables: dict, *, train: bool = False, rngs: Optional[dict] = None,
                augment_labels=None) -> Denoiser:
    """D(x (B,H,W,C), sigma () or (B,), class_labels (B, label_dim) or None) -> (B,H,W,C) float32.

    Preconditioning per ``config.model.precond`` (edm uses ``config.model.sigma_data``); ``variables`` is
    {'params': ...} plus 'buffers' for NCSN++; ``rngs`` {'dropout': key} when train; augment_labels (B, 9).
    """
    make = _choice('precond', config.model.precond, PRECONDS)
    extra = dict(sigma_data=config.model.sigma_data) if config.model.precond == 'edm' else {}
    return make(net, variables, label_dim=net.label_dim, augment_labels=augment_labels, train=train, rngs=rngs,
                **extra)


def build_autoencoder(config, info) -> AutoencoderKL:
    """The AutoencoderKL of an autoencoder run's ``config.model`` for images of ``info.channels`` channels (in and
    out); the task ``autoencoder`` trains it, :func:`jaxdiff.runs.load_run` rebuilds it."""
    m = config.model
    return AutoencoderKL(in_channels=info.channels, out_channels=info.channels, latent_channels=m.latent_channels,
                         block_out_channels=tuple(m.block_out_channels), layers_per_block=m.layers_per_block,
                         norm_num_groups=m.norm_num_groups, mid_block_add_attention=m.mid_block_add_attention,
                         use_quant_conv=m.use_quant_conv, use_post_quant_conv=m.use_post_quant_conv,
                         dtype=jnp.dtype(m.dtype))
