"""fashion_mnist: class-conditional Fashion-MNIST at 32x32 (28x28 zero-padded), a mid-size DDPM++ SongUNet.

Data: Debian's dataset-fashion-mnist idx files (/usr/share/datasets/fashion-mnist; or --config.data.path).
Label dropout 0.1 trains the unconditional branch for classifier-free guidance. Hours on CPU, minutes on a GPU.
    python train.py --config configs/diffusion/fashion_mnist.py --workdir runs/fashion_mnist
"""
from jaxdiff.config import base_config, locked


def get_config():
    c = base_config()
    c.seed = 0                      # PRNG seed for init, data order, noise and sampling
    c.batch_size = 256              # global batch (60k images: ~234 steps per epoch)
    c.total_steps = 40_000          # ~10 Mimg, ~170 epochs
    c.checkpoint_every = 2_000      # steps between checkpoints
    c.keep_checkpoints = 3          # recent checkpoints kept
    c.log_every = 100               # steps between progress lines
    c.sample_every = 2_000          # steps between sample grids

    c.data.source = 'fashion_mnist'  # idx files (Debian's dataset-fashion-mnist)
    c.data.path = ''                # '' = /usr/share/datasets/fashion-mnist
    c.data.split = 'train'          # 60k training images
    c.data.resolution = 32          # 28 -> 32 by zero padding (a U-Net needs a power-of-two side)
    c.data.use_labels = True        # class-conditional (10 classes)
    c.data.xflip = True             # clothes are left-right symmetric: x-flips double the data

    c.model.arch = 'ddpmpp'         # SongUNet, DDPM++ preset
    c.model.model_channels = 64     # base width
    c.model.channel_mult = (1, 2, 2)  # 32, 16, 8
    c.model.num_blocks = 2          # residual blocks per level
    c.model.attn_resolutions = (8,)  # self-attention at 8x8
    c.model.dropout = 0.1           # dropout probability
    c.model.label_dropout = 0.1     # CFG training

    c.loss.augment_p = 0.0          # no augmentation (60k images, x-flips on)

    c.optim.lr = 1e-3               # Adam learning rate after ramp-up
    c.optim.lr_rampup_img = 500_000  # ~2k steps of ramp-up

    c.ema.halflife_img = 500_000    # EDM's half-life
    c.ema.rampup_ratio = 0.05       # EDM's EMA ramp-up

    c.sampling.num_images = 100     # 10 per class, one column per class
    c.sampling.num_steps = 18       # 35 NFE Heun
    c.sampling.guidance = 1.5       # mild classifier-free guidance for the grids
    return locked(c)
