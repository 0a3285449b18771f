"""Task ``autoencoder``: Stable Diffusion's KL autoencoder (:class:`~jaxdiff.nets.autoencoder_kl.AutoencoderKL`)
trained with latent-diffusion's loss (CompVis ``LPIPSWithDiscriminator`` and ``AutoencoderKL.training_step``).

    python train.py --config configs/autoencoder/digits.py --workdir runs/ae_digits        # rerun to resume

Loss of the autoencoder (batch x (B, H, W, C) in [-1, 1], reconstruction x' from a posterior draw z):

    rec  = |x - x'| [+ perceptual_weight * p(x, x')]         per pixel (p broadcast over the pixels, as LDM)
    nll  = sum over pixels and batch of (rec / exp(logvar) + logvar) / B     logvar: one learned scalar
    kl   = sum over latent dims of KL(N(mean, exp(logvar_z)) || N(0, I)), averaged over the batch
    loss = nll + kl_weight * kl [+ d_weight * disc_factor * (-mean D(x'))]

Perceptual term (:func:`perceptual_distance`): LPIPS's VGG weights cannot be downloaded, so a ``feature_classifier``
run (``loss.perceptual_run``) stands in, with unit channel weights (no learned linear layers exist offline): a
variant of LPIPS, not LPIPS. PatchGAN (``loss.disc_start`` >= 0 and < total_steps): taming-transformers'
:class:`NLayerDiscriminator` with BatchNorm, hinge (or vanilla) loss, LDM's adaptive weight
(:func:`adaptive_weight`) and ``adopt_weight`` (0 before ``disc_start``); its own Adam on the same lr and betas.

Deviations from the reference, each on purpose:
- LDM's ``configure_optimizers`` leaves ``loss.logvar`` out of the autoencoder's Adam, so there it never leaves
  ``logvar_init``; here it is trained (``loss.learn_logvar``; False reproduces LDM's code).
- The discriminator's update uses this step's reconstructions (before the autoencoder's update); PyTorch
  Lightning's second optimizer pass re-ran the autoencoder after its update, on a fresh posterior draw.
- Before ``disc_start`` the discriminator is skipped (``lax.cond``) and its Adam gets zero gradients, so its step
  count runs on as LDM's; its BatchNorm running statistics (used by no training step) stay untouched meanwhile.
- flax's BatchNorm keeps the biased batch variance in its running statistics (torch: the unbiased one).
- The first step runs at lr 0: :mod:`jaxdiff.engine.optim` counts the images seen before a step, also with
  ``optim.lr_rampup_img = 0``.
- Previews and the final evaluation decode the posterior mean (LDM's validation decodes a posterior draw).
The adaptive weight's last-layer gradients (torch.autograd.grad on ``decoder.conv_out.weight`` in LDM) are
pullbacks of the step's one forward pass (:func:`loss_gradients`): the same numbers, no second forward.

State: {'step', 'params' (the autoencoder's), 'logvar' (float32 ()), 'opt_state' (Adam over (params, logvar)),
['ema'] (when ``ema.halflife_img`` > 0), ['disc': {'params', 'batch_stats', 'opt_state'}] (when the GAN is on)}.
Data: ``config.data`` through the grain pipeline (labels unused). Callbacks: a preview PNG (inputs above their
reconstructions, ``samples/step_*.png``) every ``sample_every`` steps and at the end; at the end, reconstruction
L1 and PSNR of ``eval.num_images`` fixed images (``eval.split``) as eval scalars ``recon_l1`` / ``recon_psnr``.
Load a trained run with :func:`jaxdiff.runs.load_run` (net: AutoencoderKL; variables: {'params'}, EMA if kept).
"""
from __future__ import annotations

import functools
import math
import os
from typing import Any, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jaxdiff import config_ranges as ranges
from jaxdiff import parallel
from jaxdiff.data.pipeline import IteratorBatches, make_iterator
from jaxdiff.data.sources import make_source
from jaxdiff.engine.ema import ema_beta, ema_update
from jaxdiff.engine.optim import learning_rate, make_optimizer
from jaxdiff.engine.task import Callback, RunKeys, Setup, Task
from jaxdiff.metrics import feature_classifier as fc
from jaxdiff.nets.autoencoder_kl import AutoencoderKL
from jaxdiff.nets.from_config import build_autoencoder
from jaxdiff.nets.patch_discriminator import NLayerDiscriminator
from jaxdiff.tasks import sample_grid
from jaxdiff.tasks.watermark_codec import per_sample_psnr

ONE_SPLIT_SOURCES = ('digits', 'npz', 'folder', 'array_record')  # they ignore data.split: no held-out split to read
LAST_LAYER = ('decoder', 'conv_out', 'weight')   # LDM's get_last_layer(): the decoder's output conv weight


# ----------------------------------------------------------------------------------------------- config

def autoencoder_config() -> ml_collections.ConfigDict:
    """Every field of an autoencoder run with its default: SD's kl-f8 VAE with LDM's kl-f8 loss settings."""
    c = ml_collections.ConfigDict()
    c.task = 'autoencoder'          # the KL autoencoder of latent diffusion (jaxdiff.tasks.autoencoder)
    c.seed = 0                      # PRNG seed for init, data order and the posterior draws
    c.batch_size = 24               # global batch (LDM kl-f8: 12 per GPU x 2 accumulated batches)
    c.total_steps = 100_000         # optimizer steps
    c.checkpoint_every = 5_000      # steps between checkpoints (also saved at the end and on SIGTERM/SIGINT)
    c.keep_checkpoints = 2          # recent checkpoints kept
    c.log_every = 100               # steps between progress lines / metrics.jsonl rows
    c.sample_every = 5_000          # steps between preview grids of inputs above reconstructions (0 = never)

    c.data = ml_collections.ConfigDict()
    c.data.source = 'digits'        # digits | fashion_mnist | npz | folder | array_record | tfds (labels unused)
    c.data.path = ''                # file or folder for npz / folder / array_record / fashion_mnist ('' = Debian's)
    c.data.tfds_name = ''           # TFDS dataset name (source=tfds), e.g. 'cifar10'
    c.data.split = 'train'          # dataset split trained on
    c.data.resolution = 0           # image side after padding/upsampling (0 = the source's own)
    c.data.xflip = False            # dataset x-flips (doubles the data as in EDM's --xflip)
    c.data.shuffle_seed = -1        # data-order seed (-1 = use the top-level seed)
    c.data.worker_count = 0         # grain worker processes (0 = in the main process)

    c.model = ml_collections.ConfigDict()
    c.model.latent_channels = 4     # channels of the latent (SD: 4)
    c.model.block_out_channels = (128, 256, 512, 512)  # widths per level; downsampling 2^(levels - 1) (SD: /8)
    c.model.layers_per_block = 2    # ResNet blocks per encoder level (the decoder has one more)
    c.model.norm_num_groups = 32    # GroupNorm groups (must divide every width)
    c.model.mid_block_add_attention = True  # self-attention in the middle blocks (SD: yes)
    c.model.use_quant_conv = True   # 1x1 conv on the encoder's moments (SD: yes)
    c.model.use_post_quant_conv = True  # 1x1 conv on the latent before decoding (SD: yes)
    c.model.dtype = 'float32'       # compute dtype: float32 | bfloat16 (params and loss stay float32)

    c.loss = ml_collections.ConfigDict()
    c.loss.kl_weight = 1e-6         # weight of the KL term (LDM kl-f8: 1e-6)
    c.loss.logvar_init = 0.0        # initial value of the nll's log-variance scalar (LDM: 0)
    c.loss.learn_logvar = True      # train that scalar (LDM's own code never does: see the module docstring)
    c.loss.perceptual_weight = 0.0  # weight of the feature-network distance in rec (0 = L1 only; LDM: 1 with LPIPS)
    c.loss.perceptual_run = ''      # feature_classifier run directory giving the perceptual features
    c.loss.disc_start = -1          # step the PatchGAN switches on (-1 or >= total_steps = no GAN; LDM: 50001)
    c.loss.disc_weight = 0.5        # factor on the adaptive GAN weight (LDM kl configs: 0.5)
    c.loss.disc_factor = 1.0        # GAN factor from disc_start on (LDM: 1)
    c.loss.disc_loss = 'hinge'      # discriminator loss: hinge | vanilla (LDM: hinge)
    c.loss.disc_num_layers = 3      # stride-2 convs of the PatchGAN (LDM: 3)
    c.loss.disc_channels = 64       # width of its first conv (taming's ndf: 64)

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 1.08e-4            # Adam lr of autoencoder and discriminator (LDM: 4.5e-6 x 24 images, scale_lr)
    c.optim.beta1 = 0.5             # Adam beta1 (LDM: 0.5)
    c.optim.beta2 = 0.9             # Adam beta2 (LDM: 0.9)
    c.optim.eps = 1e-8              # Adam epsilon (torch's default, as LDM)
    c.optim.lr_rampup_img = 0       # images over which lr ramps up linearly (LDM: none)

    c.ema = ml_collections.ConfigDict()
    c.ema.halflife_img = 0          # EMA half-life in images (0 = no EMA, as LDM; load_run then gives the params)
    c.ema.rampup_ratio = 0.05       # half-life is at most this fraction of images seen so far (None/0 = off)

    c.sampling = ml_collections.ConfigDict()
    c.sampling.num_images = 16      # images in each preview grid (the first of the evaluation set)

    c.eval = ml_collections.ConfigDict()
    c.eval.split = ''               # split whose first images are evaluated at the end ('' = the training split)
    c.eval.num_images = 500         # images reconstructed for recon_l1 / recon_psnr at the end (0 = none)

    c.parallel = ml_collections.ConfigDict()
    c.parallel.fsdp = 1             # size of the mesh's fsdp axis (params and optimizer state sharded over it)
    return c


def gan_enabled(config) -> bool:
    """Whether the run trains a PatchGAN: 0 <= loss.disc_start < total_steps."""
    return 0 <= int(config.loss.disc_start) < int(config.total_steps)


def downsampling(config) -> int:
    """The autoencoder's downsampling factor 2^(len(block_out_channels) - 1)."""
    return 2 ** (len(config.model.block_out_channels) - 1)


def patch_side(resolution: int, num_layers: int) -> int:
    """Side of the PatchGAN's logit map for images of side ``resolution`` (4x4 convs, padding 1: ``num_layers``
    of stride 2, then two of stride 1)."""
    for _ in range(num_layers):
        resolution = (resolution - 2) // 2 + 1
    return resolution - 2


def check_resolution(config, resolution: int) -> None:
    """ValueError (one line) when images of side ``resolution`` do not fit the autoencoder or the PatchGAN."""
    factor = downsampling(config)
    if resolution % factor:
        raise ValueError(f'data.resolution={resolution} is not divisible by the downsampling factor {factor} of '
                         f'model.block_out_channels={tuple(config.model.block_out_channels)}; pad the images to a '
                         'multiple of it (data.resolution) or use fewer levels')
    if gan_enabled(config) and patch_side(resolution, config.loss.disc_num_layers) < 1:
        raise ValueError(f'loss.disc_num_layers={config.loss.disc_num_layers} leaves no PatchGAN logits at '
                         f'{resolution}x{resolution}; lower it (each layer halves the side)')


def check(config) -> None:
    """One clear ValueError for settings no autoencoder run can use."""
    extra = sorted(set(ranges.leaves(config)) - set(ranges.leaves(autoencoder_config())))
    if extra:
        raise ValueError(f'config has field(s) {extra} that task=autoencoder does not use; start the config from '
                         'jaxdiff.tasks.autoencoder.autoencoder_config()')
    m = config.model
    bad = [w for w in m.block_out_channels if w % m.norm_num_groups]
    if bad:
        raise ValueError(f'model.norm_num_groups={m.norm_num_groups} does not divide the widths {bad} of '
                         f'model.block_out_channels={tuple(m.block_out_channels)}; use multiples of it')
    if config.data.resolution:
        check_resolution(config, int(config.data.resolution))
    if config.loss.perceptual_weight > 0 and not config.loss.perceptual_run:
        raise ValueError(f'loss.perceptual_weight={config.loss.perceptual_weight} needs loss.perceptual_run, a '
                         'feature_classifier run (python train.py --config configs/classifier/digits_features.py '
                         '--workdir RUN); or set loss.perceptual_weight=0')
    if config.eval.split and config.eval.num_images and config.data.source in ONE_SPLIT_SOURCES:
        raise ValueError(f"eval.split={config.eval.split!r}: data.source={config.data.source} has one split; set "
                         "eval.split='' (a fixed slice of the training images)")


# ----------------------------------------------------------------------------------------------- networks

# ----------------------------------------------------------------------------------------------- loss terms

def kl_to_standard_normal(mean: jax.Array, logvar: jax.Array) -> jax.Array:
    """KL(N(mean, exp(logvar)) || N(0, I)) of diagonal Gaussians (B, h, w, c) x2 -> (B,), summed over latent dims."""
    return 0.5 * jnp.sum(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar, axis=(1, 2, 3))


def reconstruction_nll(x: jax.Array, x_rec: jax.Array, logvar: jax.Array,
                       perceptual: Optional[jax.Array] = None, perceptual_weight: float = 0.0):
    """LDM's nll: x, x_rec (B, H, W, C), logvar () -> (nll (), rec (B, H, W, C)).

    rec = |x - x_rec| (+ perceptual_weight * perceptual (B,), broadcast over pixels); nll = sum(rec / exp(logvar) +
    logvar) / B: summed over pixels, averaged over the batch, as ``torch.sum(nll) / nll.shape[0]``.
    """
    rec = jnp.abs(x.astype(jnp.float32) - x_rec.astype(jnp.float32))
    if perceptual is not None:
        rec = rec + perceptual_weight * perceptual[:, None, None, None]
    return jnp.sum(rec / jnp.exp(logvar) + logvar) / x.shape[0], rec


def hinge_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
    """taming's hinge loss of a discriminator, logits of any shape -> (): 0.5 (mean relu(1 - real) + mean relu(1 +
    fake))."""
    return 0.5 * (jnp.mean(jax.nn.relu(1.0 - logits_real)) + jnp.mean(jax.nn.relu(1.0 + logits_fake)))


def vanilla_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
    """taming's non-saturating loss: 0.5 (mean softplus(-real) + mean softplus(fake)) -> ()."""
    return 0.5 * (jnp.mean(jax.nn.softplus(-logits_real)) + jnp.mean(jax.nn.softplus(logits_fake)))


D_LOSSES = {'hinge': hinge_d_loss, 'vanilla': vanilla_d_loss}


def adaptive_weight(nll_grad: jax.Array, g_grad: jax.Array, disc_weight: float) -> jax.Array:
    """LDM's GAN weight from the gradients of nll and of the generator loss w.r.t. the last decoder layer (same
    shapes): clip(||nll_grad|| / (||g_grad|| + 1e-4), 0, 1e4) * disc_weight, float32 () (a constant: no gradient)."""
    ratio = jnp.linalg.norm(nll_grad.ravel()) / (jnp.linalg.norm(g_grad.ravel()) + 1e-4)
    return jax.lax.stop_gradient(jnp.clip(ratio, 0.0, 1e4) * disc_weight).astype(jnp.float32)


# ----------------------------------------------------------------------------------------------- perceptual

class Perceptual(NamedTuple):
    """A feature_classifier run as the perceptual network: its SmallCNN, variables and native image shape."""
    net: Any
    variables: dict
    resolution: int
    channels: int
    workdir: str


def load_perceptual(workdir: str, channels: int, resolution: int) -> Perceptual:
    """The feature_classifier run in ``workdir`` (:func:`jaxdiff.runs.load_run`, ``want='feature_classifier'``);
    ValueError (one line) when its images cannot be compared with the autoencoder's (channels, resolution)."""
    from jaxdiff.runs import load_run  # pylint: disable=import-outside-toplevel  # runs imports the task registry
    run = load_run(workdir, want='feature_classifier')
    if run.info.channels != channels or resolution < run.info.resolution:
        raise ValueError(f'loss.perceptual_run={workdir} classifies {run.info.resolution}x{run.info.resolution}x'
                         f'{run.info.channels} images; the autoencoder\'s are {resolution}x{resolution}x{channels}: '
                         'train a feature classifier on the same channels at this side or smaller')
    variables = jax.tree.map(jnp.asarray, run.variables)
    return Perceptual(run.net, variables, run.info.resolution, run.info.channels, workdir)


def perceptual_distance(perceptual: Perceptual, x: jax.Array, y: jax.Array) -> jax.Array:
    """LPIPS-style distance on the feature network's conv activations: x, y (B, S, S, C) in [-1, 1] -> (B,).

    For each conv stage of the SmallCNN (post-ReLU, as LPIPS taps VGG's ReLUs): unit-normalise the channels of
    every pixel, squared difference summed over channels with unit weights (LPIPS learns these weights: none exist
    offline), mean over pixels; summed over the stages. A variant of LPIPS on another network, not LPIPS: its
    numbers are comparable only between runs with the same feature run. The channel norm is floored so an all-zero
    (dead ReLU) pixel has a finite gradient.
    """
    def stages(images):
        native = fc.native_side(images.astype(jnp.float32), perceptual.resolution)
        _, state = perceptual.net.apply(perceptual.variables, native,
                                        capture_intermediates=lambda module, _: isinstance(module, nn.Conv))
        return [jax.nn.relu(out[0]) for out in jax.tree.leaves(state['intermediates'],
                                                                is_leaf=lambda v: isinstance(v, tuple))]

    def unit(f):
        return f / jnp.sqrt(jnp.maximum(jnp.sum(jnp.square(f), axis=-1, keepdims=True), 1e-20))

    return sum(jnp.mean(jnp.sum(jnp.square(unit(a) - unit(b)), axis=-1), axis=(1, 2))
               for a, b in zip(stages(x), stages(y)))


# ----------------------------------------------------------------------------------------------- state, step

class Parts(NamedTuple):
    """The modules a step uses: the autoencoder, the PatchGAN (None without GAN), the perceptual net (or None)."""
    vae: AutoencoderKL
    disc: Optional[NLayerDiscriminator]
    perceptual: Optional[Perceptual]


def init_state(config, parts: Parts, info, key: jax.Array) -> dict:
    """Fresh state (module docstring) for images (info.resolution, info.resolution, info.channels), params from
    ``key`` (the engine's init key) split between autoencoder and discriminator."""
    ae_key, disc_key = jax.random.split(key)
    x = jnp.zeros((1, info.resolution, info.resolution, info.channels), jnp.float32)
    params, logvar = parts.vae.init(ae_key, x)['params'], jnp.float32(config.loss.logvar_init)
    tx = make_optimizer(config)
    state = dict(step=jnp.zeros((), jnp.int32), params=params, logvar=logvar, opt_state=tx.init((params, logvar)))
    if config.ema.halflife_img:
        state['ema'] = jax.tree.map(jnp.copy, params)
    if parts.disc is not None:
        disc = parts.disc.init(disc_key, x)
        state['disc'] = dict(params=disc['params'], batch_stats=disc['batch_stats'],
                             opt_state=tx.init(disc['params']))
    return state


def gan_step(config, disc: NLayerDiscriminator, state: dict, x, x_rec, c_rec, last_layer_grad):
    """The PatchGAN's part of a step, from ``disc_start`` on (``lax.cond``; zeros before).

    x, x_rec (B, H, W, C); c_rec: d nll / d x_rec; last_layer_grad(c): d/dW of the loss whose cotangent w.r.t. x_rec
    is c (W the decoder's last conv weight). Returns (the generator term's cotangent w.r.t. x_rec, the new
    state['disc'], metrics g_loss, d_weight, disc_factor, d_loss, logits_real, logits_fake).
    """
    d, lc = state['disc'], config.loss

    def apply(params, stats, images):
        logits, updated = disc.apply({'params': params, 'batch_stats': stats}, images, mutable=['batch_stats'])
        return logits, updated['batch_stats']

    def on(_):
        def g_fn(images):
            logits, stats = apply(d['params'], d['batch_stats'], images)
            return -jnp.mean(logits), stats
        (g_loss, stats), c_g = jax.value_and_grad(g_fn, has_aux=True)(x_rec)
        factor = jnp.float32(lc.disc_factor)
        d_weight = adaptive_weight(last_layer_grad(c_rec), last_layer_grad(c_g), lc.disc_weight)

        def d_fn(params):  # real and fake in separate calls: separate BatchNorm statistics, as the reference
            real, s = apply(params, stats, x)
            fake, s = apply(params, s, jax.lax.stop_gradient(x_rec))
            return factor * D_LOSSES[lc.disc_loss](real, fake), (s, jnp.mean(real), jnp.mean(fake))
        (d_loss, (stats, real, fake)), d_grads = jax.value_and_grad(d_fn, has_aux=True)(d['params'])
        metrics = dict(g_loss=g_loss, d_weight=d_weight, disc_factor=factor, d_loss=d_loss, logits_real=real,
                       logits_fake=fake)
        return (d_weight * factor).astype(c_g.dtype) * c_g, d_grads, stats, metrics

    def off(_):
        zero = jnp.zeros((), jnp.float32)
        metrics = dict(g_loss=zero, d_weight=zero, disc_factor=zero, d_loss=zero, logits_real=zero, logits_fake=zero)
        return jnp.zeros_like(x_rec), jax.tree.map(jnp.zeros_like, d['params']), d['batch_stats'], metrics

    c_gan, d_grads, stats, metrics = jax.lax.cond(state['step'] >= lc.disc_start, on, off, None)
    updates, opt_state = make_optimizer(config).update(d_grads, d['opt_state'], d['params'])
    new = dict(params=optax.apply_updates(d['params'], updates), batch_stats=stats, opt_state=opt_state)
    return c_gan, new, metrics


def loss_gradients(config, parts: Parts, state: dict, x: jax.Array, key: jax.Array):
    """The losses of a step and their gradients, x float32 (B, H, W, C) in [-1, 1], posterior draw from ``key``.

    Returns (d loss / d params (the params' tree), d nll / d logvar (), the new state['disc'] or None, float32 ()
    metrics: loss, nll, rec (L1 mean), kl, psnr (reconstructions clipped to [-1, 1]), latent_std (of the posterior
    means), [perceptual], [the GAN's]). One forward pass and its vjp serve every gradient: the cotangents of nll, KL
    and generator loss w.r.t. (x_rec, mean, logvar_z) are summed and pulled back once; the adaptive weight's
    last-layer gradients are two more pullbacks of which only the conv_out weight is used (XLA drops the rest).
    """
    lc = config.loss
    (x_rec, mean, post_logvar), pullback = jax.vjp(lambda p: parts.vae.apply({'params': p}, x, key), state['params'])

    def nll_fn(x_rec, logvar):
        p = perceptual_distance(parts.perceptual, x, x_rec) if parts.perceptual is not None else None
        return reconstruction_nll(x, x_rec, logvar, p, lc.perceptual_weight)[0], p

    (nll, p), (c_rec, g_logvar) = jax.value_and_grad(nll_fn, argnums=(0, 1), has_aux=True)(x_rec, state['logvar'])
    kl, (c_mean, c_logvar) = jax.value_and_grad(lambda m, v: jnp.mean(kl_to_standard_normal(m, v)),
                                                argnums=(0, 1))(mean, post_logvar)
    metrics, c_gan, disc = {}, jnp.zeros_like(x_rec), None
    if 'disc' in state:
        zeros = (jnp.zeros_like(mean), jnp.zeros_like(post_logvar))

        def last_layer_grad(c):
            return functools.reduce(lambda tree, name: tree[name], LAST_LAYER, pullback((c,) + zeros)[0])
        c_gan, disc, metrics = gan_step(config, parts.disc, state, x, x_rec, c_rec, last_layer_grad)
    grads = pullback((c_rec + c_gan, lc.kl_weight * c_mean, lc.kl_weight * c_logvar))[0]
    loss = nll + lc.kl_weight * kl
    if metrics:
        loss = loss + metrics['d_weight'] * metrics['disc_factor'] * metrics['g_loss']
    unit = lambda images: (jnp.clip(images.astype(jnp.float32), -1, 1) + 1) / 2  # noqa: E731
    metrics.update(loss=loss, nll=nll, rec=jnp.mean(jnp.abs(x - x_rec.astype(jnp.float32))), kl=kl,
                   psnr=jnp.mean(per_sample_psnr(unit(x_rec), unit(x))), latent_std=jnp.std(mean))
    if p is not None:
        metrics['perceptual'] = jnp.mean(p)
    return grads, g_logvar, disc, metrics


def train_step(config, parts: Parts, state: dict, batch: dict, key: jax.Array) -> tuple[dict, dict]:
    """One Adam step of autoencoder and logvar (and the PatchGAN's) on batch['image'] float32 (B, H, W, C) in
    [-1, 1], the posterior draw from ``fold_in(key, step)``. Returns the new state and the metrics of
    :func:`loss_gradients` plus logvar and lr (both of this step)."""
    grads, g_logvar, disc, metrics = loss_gradients(config, parts, state, batch['image'].astype(jnp.float32),
                                                    jax.random.fold_in(key, state['step']))
    if not config.loss.learn_logvar:
        g_logvar = jnp.zeros_like(g_logvar)
    new = dict(state, step=state['step'] + 1)
    if disc is not None:
        new['disc'] = disc
    trained = (state['params'], state['logvar'])
    updates, new['opt_state'] = make_optimizer(config).update((grads, g_logvar), state['opt_state'], trained)
    new['params'], new['logvar'] = optax.apply_updates(trained, updates)
    if 'ema' in state:
        new['ema'] = ema_update(state['ema'], new['params'], ema_beta(config, state['step']))
    return new, dict(metrics, logvar=state['logvar'], lr=learning_rate(config, state['step']))


# ----------------------------------------------------------------------------------------------- callbacks

def fixed_images(config, count: int) -> tuple[np.ndarray, str]:
    """The first ``count`` images (uint8 (N, R, R, C)) of ``eval.split`` ('' = the training split) of the data, and
    what they are in words (for the log)."""
    data = data_config(config)
    if config.eval.split:
        data.split = config.eval.split
    source, _ = make_source(data)
    images = np.stack([source[i]['image'] for i in range(min(count, len(source)))])
    held_out = bool(config.eval.split) and config.eval.split != config.data.split
    what = f"{len(images)} {'held-out' if held_out else 'training'} images of split {data.split!r}"
    return images, what


def make_reconstruct(vae: AutoencoderKL, chunk: int):
    """``reconstruct(variables, images uint8 (N, R, R, C)) -> float32 (N, R, R, C)`` in [-1, 1] from the posterior
    means, on this host in chunks of ``chunk`` images (the last one padded, so it compiles once)."""
    fn = jax.jit(lambda variables, x: jnp.clip(vae.apply(variables, x)[0].astype(jnp.float32), -1, 1))

    def reconstruct(variables, images: np.ndarray) -> np.ndarray:
        x = images.astype(np.float32) / 127.5 - 1
        out = []
        for start in range(0, len(x), chunk):
            part = x[start:start + chunk]
            padded = np.concatenate([part, np.zeros((chunk - len(part),) + part.shape[1:], part.dtype)])
            out.append(np.asarray(fn(variables, padded))[:len(part)])
        return np.concatenate(out)
    return reconstruct


def reconstruction_scores(images: np.ndarray, recons: np.ndarray) -> dict[str, float]:
    """images uint8 (N, R, R, C), recons float (N, R, R, C) in [-1, 1] -> {recon_l1 (mean |x - x'| in [-1, 1]
    units, as the step's rec), recon_psnr (mean per-image PSNR in dB on [0, 1])}."""
    x = images.astype(np.float32) / 127.5 - 1
    psnr = per_sample_psnr(jnp.asarray((recons + 1) / 2), jnp.asarray((x + 1) / 2))
    return dict(recon_l1=float(np.mean(np.abs(x - recons))), recon_psnr=float(jnp.mean(psnr)))


def preview_rows(inputs: np.ndarray, recons: np.ndarray, columns: int) -> np.ndarray:
    """(N, H, W, C) x2 -> (2 * rows * columns, H, W, C): each row of ``columns`` inputs followed by the row of their
    reconstructions (blank tiles pad the last row)."""
    rows = math.ceil(len(inputs) / columns)
    pad = [(0, rows * columns - len(inputs))] + [(0, 0)] * (inputs.ndim - 1)
    a, b = (np.pad(v, pad, constant_values=-1).reshape((rows, columns) + v.shape[1:]) for v in (inputs, recons))
    return np.stack([a, b], axis=1).reshape((-1,) + inputs.shape[1:])


# ----------------------------------------------------------------------------------------------- task

def data_config(config) -> ml_collections.ConfigDict:
    """``config.data`` with ``use_labels=False`` added, for the shared sources and pipeline (labels are unused)."""
    data = ml_collections.ConfigDict(config.data.to_dict())
    data.use_labels = False
    return data


def describe_lines(config, vae: AutoencoderKL, info, what: str) -> list[str]:
    """The run's net, loss and evaluation set in words."""
    m, lc, f = config.model, config.loss, downsampling(config)
    x = jnp.zeros((1, info.resolution, info.resolution, info.channels))
    count = sum(a.size for a in jax.tree.leaves(jax.eval_shape(vae.init, jax.random.key(0), x)['params']))
    side = info.resolution // f
    lines = [f'AutoencoderKL {tuple(m.block_out_channels)} x {m.layers_per_block} blocks, {count:,} params: '
             f'{info.resolution}x{info.resolution}x{info.channels} {config.data.source} images ({info.size}) -> '
             f'{side}x{side}x{m.latent_channels} latents (/{f})']
    rec = 'L1' + (f' + {lc.perceptual_weight:g} x perceptual ({lc.perceptual_run})' if lc.perceptual_weight else '')
    gan = (f'PatchGAN ({lc.disc_num_layers} layers, {lc.disc_channels} ch, {lc.disc_loss}) x adaptive weight x '
           f'{lc.disc_weight:g} from step {lc.disc_start}' if gan_enabled(config) else 'no GAN')
    lines.append(f'loss: ({rec}) / exp(logvar) + logvar (logvar {"learned" if lc.learn_logvar else "fixed"}, init '
                 f'{lc.logvar_init:g}) + {lc.kl_weight:g} x KL; {gan}; Adam lr {config.optim.lr:g} betas '
                 f'({config.optim.beta1:g}, {config.optim.beta2:g}); '
                 + (f'EMA half-life {config.ema.halflife_img:g} img' if config.ema.halflife_img else 'no EMA'))
    if what:
        lines.append(f'fixed images of the previews and the final evaluation: {what}')
    return lines


def setup(config, workdir: str, mesh, keys: RunKeys) -> Setup:
    """Autoencoder (+ PatchGAN, perceptual net), state, grain batches, the preview and reconstruction callbacks."""
    del mesh, keys  # the step's posterior draws fold the step into the engine's train key
    iterator, info = make_iterator(data_config(config), global_batch_size=config.batch_size, seed=config.seed,
                                   process_index=jax.process_index(), process_count=jax.process_count())
    check_resolution(config, info.resolution)
    perceptual = None
    if config.loss.perceptual_weight > 0:
        perceptual = load_perceptual(config.loss.perceptual_run, info.channels, info.resolution)
    disc = NLayerDiscriminator(config.loss.disc_channels, config.loss.disc_num_layers) if gan_enabled(config) else None
    parts = Parts(build_autoencoder(config, info), disc, perceptual)
    count = max(config.eval.num_images, config.sampling.num_images if config.sample_every else 0)
    images, what = fixed_images(config, count) if count else (None, '')
    reconstruct = make_reconstruct(parts.vae, config.batch_size)
    outputs: dict = {}

    def variables(state) -> dict:  # the weights load_run gives: the EMA when kept
        return {'params': parallel.global_to_host(state['ema'] if 'ema' in state else state['params'])}

    def preview(step: int, state) -> None:
        shown = images[:config.sampling.num_images]
        rows = preview_rows(shown.astype(np.float32) / 127.5 - 1, reconstruct(variables(state), shown),
                            min(8, len(shown)))
        path = os.path.join(workdir, 'samples', f'step_{step:07d}.png')
        if jax.process_index() == 0:  # save_samples lays sample i in column i % num_classes: our row pairs
            sample_grid.save_samples(rows, path, min(8, len(shown)))
            print(f'preview: {path}', flush=True)
        outputs['last_preview'] = path

    def evaluate(step: int, state) -> dict:
        shown = images[:config.eval.num_images]
        outputs.update(reconstruction_scores(shown, reconstruct(variables(state), shown)))
        return {name: outputs[name] for name in ('recon_l1', 'recon_psnr')}

    callbacks = []
    if config.sample_every:
        callbacks.append(Callback('preview', config.sample_every, preview))
    if config.eval.num_images:
        callbacks.append(Callback('reconstruction', 0, evaluate, at_end=True))
    progress = dict(rec='.4f', psnr='.2f', kl='.4g', logvar='.3f', latent_std='.3f')
    if perceptual is not None:
        progress['perceptual'] = '.4f'
    if disc is not None:
        progress.update(d_loss='.4f', d_weight='.3g')
    return Setup(init=functools.partial(init_state, config, parts, info),
                 step=functools.partial(train_step, config, parts), data=IteratorBatches(iterator),
                 batch_size=config.batch_size, total_steps=config.total_steps,
                 describe=describe_lines(config, parts.vae, info, what), callbacks=callbacks, progress=progress,
                 last=('lr', 'disc_factor'), nan_policy='raise', info=info, done=lambda state: dict(outputs))


# The valid values of every field of :func:`autoencoder_config` (checked before any work: jaxdiff.config_ranges).
RANGES: dict[str, ranges.Rule] = {
    **ranges.COMMON, **ranges.DATA,
    'task': ranges.one_of('autoencoder'), 'sample_every': ranges.at_least(0, integer=True),
    'data.xflip': ranges.BOOL, 'data.shuffle_seed': ranges.SEED, 'data.worker_count': ranges.at_least(0, integer=True),
    'model.latent_channels': ranges.COUNT, 'model.block_out_channels': ranges.integers(1),
    'model.layers_per_block': ranges.COUNT, 'model.norm_num_groups': ranges.COUNT,
    'model.mid_block_add_attention': ranges.BOOL, 'model.use_quant_conv': ranges.BOOL,
    'model.use_post_quant_conv': ranges.BOOL, 'model.dtype': ranges.one_of('float32', 'bfloat16'),
    'loss.kl_weight': ranges.NON_NEGATIVE, 'loss.logvar_init': ranges.NUMBER, 'loss.learn_logvar': ranges.BOOL,
    'loss.perceptual_weight': ranges.NON_NEGATIVE, 'loss.perceptual_run': ranges.TEXT,
    'loss.disc_start': ranges.at_least(-1, integer=True), 'loss.disc_weight': ranges.NON_NEGATIVE,
    'loss.disc_factor': ranges.NON_NEGATIVE, 'loss.disc_loss': ranges.one_of(*D_LOSSES),
    'loss.disc_num_layers': ranges.COUNT, 'loss.disc_channels': ranges.COUNT,
    'optim.beta1': ranges.between(0, 1, open_hi=True), 'optim.beta2': ranges.between(0, 1, open_hi=True),
    'optim.eps': ranges.POSITIVE, 'optim.lr_rampup_img': ranges.NON_NEGATIVE,
    'ema.halflife_img': ranges.NON_NEGATIVE, 'ema.rampup_ratio': ranges.optional(ranges.NON_NEGATIVE),
    'sampling.num_images': ranges.COUNT, 'eval.split': ranges.TEXT, 'eval.num_images': ranges.at_least(0, integer=True),
}
TASK = Task('autoencoder', autoencoder_config, check, setup, ranges=RANGES, kind='autoencoder',
            use='encode images to latents with it: jaxdiff.runs.load_run({dir}) gives the AutoencoderKL and weights',
            configs='configs/autoencoder/*.py')
