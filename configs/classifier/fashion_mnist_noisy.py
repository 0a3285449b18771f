"""classifier/fashion_mnist_noisy: a noise-conditional classifier p(y | x_sigma, sigma) on Fashion-MNIST at 32x32,
for classifier guidance of the fashion_mnist denoiser (sample.py --guidance classifier:run=DIR).

The encoder half of the fashion_mnist DDPM++ net with global pooling and a linear head, trained on every noise
level of the EDM sampler (ln sigma uniform over 0.002..80). Data: Debian's dataset-fashion-mnist idx files.
    python train.py --config configs/classifier/fashion_mnist_noisy.py --workdir runs/fashion_mnist_noisy_classifier
"""
from jaxdiff.config import base_config, locked


def get_config():
    c = base_config()
    c.task = 'noisy_classifier'     # train p(y | x_sigma, sigma), not a denoiser
    c.batch_size = 256              # global batch (60k images: ~234 steps per epoch)
    c.total_steps = 20_000          # ~5 Mimg, ~85 epochs
    c.checkpoint_every = 2_000      # steps between checkpoints
    c.sample_every = 0              # a classifier draws no samples

    c.data.source = 'fashion_mnist'  # idx files (Debian's dataset-fashion-mnist)
    c.data.resolution = 32          # 28 -> 32 by zero padding, as the denoiser it guides
    c.data.xflip = True             # clothes are left-right symmetric: x-flips keep the class

    c.model.model_channels = 64     # base width
    c.model.channel_mult = (1, 2, 2)  # 32, 16, 8
    c.model.num_blocks = 2          # residual blocks per level
    c.model.attn_resolutions = (8,)  # self-attention at 8x8
    c.model.dropout = 0.1           # dropout probability

    c.loss.augment_p = 0.0          # no augmentation

    c.optim.lr_rampup_img = 500_000  # ~2k steps of ramp-up
    return locked(c)
