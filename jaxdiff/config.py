"""The training configuration: every field, its default and a one-line comment.

``configs/FAMILY/NAME.py`` files define ``get_config()`` by starting from :func:`base_config` and overriding fields;
the ConfigDict is locked, so a misspelt or unknown key is an error, not a silent new field.
Sizes of time are in images ("img"), as in EDM, so they do not change meaning with the batch size.
"""
from __future__ import annotations

import importlib.util
import os

import ml_collections

from jaxdiff import config_ranges as ranges


def base_config() -> ml_collections.ConfigDict:
    """All training fields with defaults (EDM's CIFAR-10 DDPM++ recipe where the field has one)."""
    c = ml_collections.ConfigDict()
    c.task = 'denoiser'             # denoiser | noisy_classifier (p(y | x_sigma, sigma) for classifier guidance)
    c.seed = 0                      # PRNG seed for init, data order, noise and sampling
    c.batch_size = 512              # global batch size (all hosts and devices together)
    c.total_steps = 390_625         # optimizer steps to train (200 Mimg at batch 512)
    c.checkpoint_every = 5_000      # steps between checkpoints (also saved at the end and on SIGTERM/SIGINT)
    c.keep_checkpoints = 3          # how many recent checkpoints to keep
    c.log_every = 100               # steps between progress lines / TensorBoard scalars
    c.sample_every = 10_000         # steps between PNG sample grids from the EMA params (0 = never)

    c.data = ml_collections.ConfigDict()
    c.data.source = 'digits'        # digits | fashion_mnist | npz | folder | array_record | tfds | latents
    c.data.path = ''                # file/folder: npz, folder, array_record, latents, fashion_mnist ('' = Debian's)
    c.data.tfds_name = ''           # TFDS dataset name (source=tfds), e.g. 'cifar10'
    c.data.split = 'train'          # dataset split
    c.data.resolution = 0           # image side after padding/resizing (0 = the source's own)
    c.data.max_size = 0             # train on a seeded random subset of this many images (0 = all; EDM's max_size)
    c.data.use_labels = True        # feed class labels (class-conditional training)
    c.data.xflip = False            # dataset x-flips (doubles the data as in EDM's --xflip)
    c.data.shuffle_seed = -1        # data-order seed (-1 = use the top-level seed)
    c.data.worker_count = 0         # grain worker processes (0 = in the main process)

    c.model = ml_collections.ConfigDict()
    c.model.arch = 'ddpmpp'         # ddpmpp | ncsnpp | adm | dit | mlp (SongUNet x2 / DhariwalUNet / DiT / MLP)
    c.model.precond = 'edm'         # edm | vp | ve (preconditioning; the loss follows it)
    c.model.model_channels = 128    # base channel count
    c.model.channel_mult = (2, 2, 2)  # per-resolution channel multipliers
    c.model.channel_mult_emb = 4    # embedding width multiplier (SongUNet)
    c.model.num_blocks = 4          # residual blocks per resolution
    c.model.attn_resolutions = (16,)  # resolutions with self-attention
    c.model.dropout = 0.13          # dropout probability (the U-Nets)
    c.model.patch_size = 2          # DiT: tokens are patch_size x patch_size patches
    c.model.hidden_size = 384       # DiT: token width (S 384, B 768, L 1024, XL 1152)
    c.model.depth = 12              # DiT: transformer blocks (S/B 12, L 24, XL 28)
    c.model.num_heads = 6           # DiT: attention heads (S 6, B 12, L/XL 16)
    c.model.label_dropout = 0.0     # probability of dropping class labels (>0 trains for classifier-free guidance)
    c.model.dtype = 'float32'       # compute dtype: float32 | bfloat16 (params stay float32)
    c.model.sigma_data = 0.5        # expected data std (EDM preconditioning and loss)

    c.loss = ml_collections.ConfigDict()
    c.loss.P_mean = -1.2            # EDM: mean of ln(sigma)
    c.loss.P_std = 1.2              # EDM: std of ln(sigma)
    c.loss.augment_p = 0.12         # EDM non-leaky augmentation probability (0 = off)
    c.loss.sigma_min = 0.002        # noisy_classifier: lowest training sigma (ln sigma uniform; EDM sampler's min)
    c.loss.sigma_max = 80.0         # noisy_classifier: highest training sigma (EDM sampler's max)

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 1e-3               # Adam learning rate after ramp-up
    c.optim.beta1 = 0.9             # Adam beta1
    c.optim.beta2 = 0.999           # Adam beta2
    c.optim.eps = 1e-8              # Adam epsilon
    c.optim.lr_rampup_img = 10_000_000  # images over which lr ramps linearly from 0 (EDM: 10 Mimg)

    c.ema = ml_collections.ConfigDict()
    c.ema.halflife_img = 500_000    # EMA half-life in images (EDM: 0.5 Mimg)
    c.ema.rampup_ratio = 0.05       # half-life is at most this fraction of images seen so far (None/0 = off)

    c.sampling = ml_collections.ConfigDict()
    c.sampling.num_images = 64      # images in each PNG sample grid
    c.sampling.num_steps = 18       # EDM sampler steps for the grids
    c.sampling.guidance = 1.0       # CFG weight for the grids (1 = plain conditional)

    c.parallel = ml_collections.ConfigDict()
    c.parallel.fsdp = 1             # size of the mesh's fsdp axis (params and optimizer state sharded over it)
    return c


# The valid values of every field of :func:`base_config` (checked before any work: jaxdiff.config_ranges).
RANGES: dict[str, ranges.Rule] = {
    **ranges.COMMON, **ranges.DATA,
    'task': ranges.one_of('denoiser', 'noisy_classifier'), 'sample_every': ranges.at_least(0, integer=True),
    'data.source': ranges.one_of('digits', 'fashion_mnist', 'npz', 'folder', 'array_record', 'tfds', 'gmm2d',
                                 'latents'),
    'data.use_labels': ranges.BOOL, 'data.xflip': ranges.BOOL, 'data.shuffle_seed': ranges.SEED,
    'data.worker_count': ranges.at_least(0, integer=True),
    'model.arch': ranges.one_of('ddpmpp', 'ncsnpp', 'adm', 'dit', 'mlp'), 'model.precond': ranges.one_of('edm', 'vp', 've'),
    'model.model_channels': ranges.COUNT, 'model.channel_mult': ranges.integers(1),
    'model.channel_mult_emb': ranges.COUNT, 'model.num_blocks': ranges.COUNT,
    'model.attn_resolutions': ranges.integers(1, nonempty=False), 'model.dropout': ranges.PROBABILITY,
    'model.patch_size': ranges.COUNT, 'model.hidden_size': ranges.COUNT, 'model.depth': ranges.COUNT,
    'model.num_heads': ranges.COUNT,
    'model.label_dropout': ranges.PROBABILITY, 'model.dtype': ranges.one_of('float32', 'bfloat16'),
    'model.sigma_data': ranges.POSITIVE,
    'loss.P_mean': ranges.NUMBER, 'loss.P_std': ranges.POSITIVE, 'loss.augment_p': ranges.FRACTION,
    'loss.sigma_min': ranges.POSITIVE, 'loss.sigma_max': ranges.POSITIVE,
    'optim.beta1': ranges.between(0, 1, open_hi=True), 'optim.beta2': ranges.between(0, 1, open_hi=True),
    'optim.eps': ranges.POSITIVE, 'optim.lr_rampup_img': ranges.NON_NEGATIVE,
    'ema.halflife_img': ranges.NON_NEGATIVE,
    'ema.rampup_ratio': ranges.optional(ranges.NON_NEGATIVE),
    'sampling.num_images': ranges.COUNT, 'sampling.num_steps': ranges.COUNT, 'sampling.guidance': ranges.NUMBER,
}


def locked(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The config locked against new keys (unknown keys in overrides then raise)."""
    config.lock()
    return config


def from_file(path: str) -> ml_collections.ConfigDict:
    """``get_config()`` of a config file, loaded by path (configs/ is not a package)."""
    spec = importlib.util.spec_from_file_location('_jaxdiff_config_' + os.path.basename(path)[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def sibling(config_file: str, name: str) -> ml_collections.ConfigDict:
    """The unlocked config ``name`` from the folder of ``config_file`` (a derived config's base)."""
    config = from_file(os.path.join(os.path.dirname(os.path.abspath(config_file)), name + '.py'))
    config.unlock()
    return config
