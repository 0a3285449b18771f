"""fashion_mnist: class-conditional Fashion-MNIST at 32x32 (28x28 zero-padded), a mid-size DDPM++ SongUNet.

Data: Debian's dataset-fashion-mnist idx files (/usr/share/datasets/fashion-mnist; or --config.data.path).
Label dropout 0.1 trains the unconditional branch for classifier-free guidance. Hours on CPU, minutes on a GPU.
    python train.py --config configs/diffusion/fashion_mnist.py --workdir runs/fashion_mnist
"""
from jaxdiff.config import base_config, locked


def get_config():
    c = base_config()
    c.batch_size = 256              # global batch (60k images: ~234 steps per epoch)
    c.total_steps = 40_000          # ~10 Mimg, ~170 epochs
    c.checkpoint_every = 2_000      # steps between checkpoints
    c.sample_every = 2_000          # steps between sample grids

    c.data.source = 'fashion_mnist'  # idx files (Debian's dataset-fashion-mnist)
    c.data.resolution = 32          # 28 -> 32 by zero padding (a U-Net needs a power-of-two side)
    c.data.xflip = True             # clothes are left-right symmetric: x-flips double the data

    c.model.model_channels = 64     # base width
    c.model.channel_mult = (1, 2, 2)  # 32, 16, 8
    c.model.num_blocks = 2          # residual blocks per level
    c.model.attn_resolutions = (8,)  # self-attention at 8x8
    c.model.dropout = 0.1           # dropout probability
    c.model.label_dropout = 0.1     # CFG training

    c.loss.augment_p = 0.0          # no augmentation (60k images, x-flips on)

    c.optim.lr_rampup_img = 500_000  # ~2k steps of ramp-up

    c.sampling.num_images = 100     # 10 per class, one column per class
    c.sampling.guidance = 1.5       # mild classifier-free guidance for the grids
    return locked(c)
