"""ffhq64_ddpmpp: EDM's unconditional FFHQ 64x64 DDPM++ (NVlabs/edm `--cond=0 --arch=ddpmpp --batch=256
--cres=1,2,2,2 --lr=2e-4 --dropout=0.05 --augment=0.15`, duration default 200 Mimg; ~4 days on 8xV100).

Data: a folder of 64x64 PNGs as written by EDM's dataset_tool.py (unzip datasets/ffhq-64x64.zip), or override
--config.data.source / --config.data.path.
    python train.py --config configs/diffusion/ffhq64_ddpmpp.py --workdir runs/ffhq64 --config.data.path=datasets/ffhq-64x64
"""
from jaxdiff.config import base_config, locked

MIMG = 1_000_000


def get_config():
    c = base_config()
    c.seed = 0                      # PRNG seed for init, data order, noise and sampling
    c.batch_size = 256              # EDM --batch=256
    c.total_steps = 200 * MIMG // 256  # EDM --duration=200 (default) = 781,250 steps
    c.checkpoint_every = 10_000     # 2.56 Mimg between checkpoints
    c.keep_checkpoints = 3          # recent checkpoints kept
    c.log_every = 100               # steps between progress lines
    c.sample_every = 20_000         # steps between sample grids

    c.data.source = 'folder'        # EDM dataset_tool output, unzipped
    c.data.path = 'datasets/ffhq-64x64'  # folder of 64x64 images
    c.data.resolution = 64          # 64x64
    c.data.use_labels = False       # EDM --cond=0
    c.data.xflip = False            # EDM --xflip default (off)

    c.model.arch = 'ddpmpp'         # EDM --arch=ddpmpp
    c.model.precond = 'edm'         # EDM --precond default
    c.model.model_channels = 128    # EDM cbase for ddpmpp
    c.model.channel_mult = (1, 2, 2, 2)  # EDM --cres=1,2,2,2 (64, 32, 16, 8)
    c.model.num_blocks = 4          # SongUNet default
    c.model.attn_resolutions = (16,)  # SongUNet default
    c.model.dropout = 0.05          # EDM --dropout=0.05
    c.model.label_dropout = 0.0     # unconditional

    c.loss.augment_p = 0.15         # EDM --augment=0.15

    c.optim.lr = 2e-4               # EDM --lr=2e-4
    c.optim.lr_rampup_img = 10 * MIMG  # EDM lr_rampup_kimg=10000 (default)

    c.ema.halflife_img = MIMG // 2  # EDM --ema=0.5 (default)
    c.ema.rampup_ratio = 0.05       # EDM ema_rampup_ratio (default)

    c.sampling.num_images = 64      # 8x8 grid
    c.sampling.num_steps = 40       # EDM's FFHQ/AFHQ setting: 40 steps (79 NFE)
    c.sampling.guidance = 1.0       # unconditional
    return locked(c)
