"""cifar10_ddpmpp_cond: EDM's class-conditional CIFAR-10 DDPM++ (NVlabs/edm `--cond=1 --arch=ddpmpp`; FID 1.79).

Reference recipe: batch 512, Adam lr 1e-3 ramped up over 10 Mimg, EMA half-life 0.5 Mimg with ramp-up ratio 0.05,
dropout 0.13, augment p 0.12, 200 Mimg (390,625 steps; ~2 days on 8xV100). Data: TFDS 'cifar10' (prepare it once
with tfds; read through tfds.data_source, no TensorFlow at train time).
    python train.py --config configs/diffusion/cifar10_ddpmpp_cond.py --workdir runs/cifar10_cond
"""
from jaxdiff.config import base_config, locked

MIMG = 1_000_000


def get_config():
    c = base_config()
    c.seed = 0                      # PRNG seed for init, data order, noise and sampling
    c.batch_size = 512              # EDM --batch=512 (global)
    c.total_steps = 200 * MIMG // 512  # EDM --duration=200 (Mimg) = 390,625 steps
    c.checkpoint_every = 5_000      # 2.56 Mimg between checkpoints (EDM snapshots every 2.5 Mimg)
    c.keep_checkpoints = 3          # recent checkpoints kept
    c.log_every = 100               # steps between progress lines
    c.sample_every = 10_000         # steps between sample grids

    c.data.source = 'tfds'          # TFDS through tfds.data_source (array_record)
    c.data.tfds_name = 'cifar10'    # 32x32x3, 10 classes, 50k train images
    c.data.split = 'train'          # the training split
    c.data.use_labels = True        # EDM --cond=1
    c.data.xflip = False            # EDM --xflip default (off)

    c.model.arch = 'ddpmpp'         # EDM --arch=ddpmpp (SongUNet, positional embedding, standard encoder)
    c.model.precond = 'edm'         # EDM --precond default
    c.model.model_channels = 128    # EDM cbase for ddpmpp
    c.model.channel_mult = (2, 2, 2)  # EDM cres for ddpmpp
    c.model.num_blocks = 4          # SongUNet default
    c.model.attn_resolutions = (16,)  # SongUNet default
    c.model.dropout = 0.13          # EDM --dropout default
    c.model.label_dropout = 0.0     # EDM trains without label dropout

    c.loss.augment_p = 0.12         # EDM --augment default (augment_dim 9 labels fed to the net)

    c.optim.lr = 1e-3               # EDM --lr default
    c.optim.lr_rampup_img = 10 * MIMG  # EDM lr_rampup_kimg=10000

    c.ema.halflife_img = MIMG // 2  # EDM --ema=0.5 (Mimg)
    c.ema.rampup_ratio = 0.05       # EDM ema_rampup_ratio

    c.sampling.num_images = 100     # 10 per class
    c.sampling.num_steps = 18       # EDM's deterministic 35-NFE setting for CIFAR-10
    c.sampling.guidance = 1.0       # no CFG (trained without label dropout)
    return locked(c)
