"""digits: the embedded default. scikit-learn's 8x8 digits (1797 images, 10 classes, in the wheel: no download),
class-conditional with label dropout 0.1 (classifier-free guidance works), a small DDPM++ SongUNet at 8x8.

Trains to recognisable digits on 2 CPU cores in about 6-8 minutes (`make demo`):
    python train.py --config configs/diffusion/digits.py --workdir runs/digits
"""
from jaxdiff.config import base_config, locked


def get_config():
    c = base_config()
    c.batch_size = 128              # global batch (1797 images: ~14 steps per epoch)
    c.total_steps = 1_500           # 192 kimg, ~107 epochs
    c.checkpoint_every = 500        # steps between checkpoints
    c.keep_checkpoints = 2          # recent checkpoints kept
    c.sample_every = 500            # steps between sample grids

    c.model.model_channels = 32     # base width (EDM CIFAR: 128)
    c.model.channel_mult = (1, 2)   # 8x8 and 4x4 levels
    c.model.num_blocks = 2          # residual blocks per level
    c.model.attn_resolutions = ()   # no self-attention at this size
    c.model.dropout = 0.0           # dropout probability
    c.model.label_dropout = 0.1     # drop labels 10% of the time: trains the unconditional model for CFG

    c.loss.augment_p = 0.0          # no augmentation (tiny images, short run)

    c.optim.lr = 2e-3               # Adam learning rate after ramp-up
    c.optim.lr_rampup_img = 25_000  # ~200 steps of linear ramp-up

    c.ema.halflife_img = 25_000     # EMA half-life (~200 steps at batch 128)

    c.sampling.num_images = 100     # 10 per class: the grid has one column per digit
    return locked(c)
