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
    c.batch_size = 256              # EDM --batch=256
    c.total_steps = 200 * MIMG // 256  # EDM --duration=200 (default) = 781,250 steps
    c.checkpoint_every = 10_000     # 2.56 Mimg between checkpoints
    c.sample_every = 20_000         # steps between sample grids

    c.data.source = 'folder'        # EDM dataset_tool output, unzipped
    c.data.path = 'datasets/ffhq-64x64'  # folder of 64x64 images
    c.data.resolution = 64          # 64x64
    c.data.use_labels = False       # EDM --cond=0

    c.model.channel_mult = (1, 2, 2, 2)  # EDM --cres=1,2,2,2 (64, 32, 16, 8)
    c.model.dropout = 0.05          # EDM --dropout=0.05

    c.loss.augment_p = 0.15         # EDM --augment=0.15

    c.optim.lr = 2e-4               # EDM --lr=2e-4

    c.sampling.num_steps = 40       # EDM's FFHQ/AFHQ setting: 40 steps (79 NFE)
    return locked(c)
