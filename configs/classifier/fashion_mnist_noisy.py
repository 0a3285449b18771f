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
    c.seed = 0                      # PRNG seed for init, data order and noise
    c.batch_size = 256              # global batch (60k images: ~234 steps per epoch)
    c.total_steps = 20_000          # ~5 Mimg, ~85 epochs
    c.checkpoint_every = 2_000      # steps between checkpoints
    c.keep_checkpoints = 3          # recent checkpoints kept
    c.log_every = 100               # steps between progress lines
    c.sample_every = 0              # a classifier draws no samples

    c.data.source = 'fashion_mnist'  # idx files (Debian's dataset-fashion-mnist)
    c.data.path = ''                # '' = /usr/share/datasets/fashion-mnist
    c.data.split = 'train'          # 60k training images
    c.data.resolution = 32          # 28 -> 32 by zero padding, as the denoiser it guides
    c.data.use_labels = True        # the labels are the targets
    c.data.xflip = True             # clothes are left-right symmetric: x-flips keep the class

    c.model.model_channels = 64     # base width
    c.model.channel_mult = (1, 2, 2)  # 32, 16, 8
    c.model.num_blocks = 2          # residual blocks per level
    c.model.attn_resolutions = (8,)  # self-attention at 8x8
    c.model.dropout = 0.1           # dropout probability
    c.model.label_dropout = 0.0     # never drop the targets
    c.model.sigma_data = 0.5        # input scaling c_in = 1 / sqrt(sigma^2 + sigma_data^2)

    c.loss.augment_p = 0.0          # no augmentation
    c.loss.sigma_min = 0.002        # lowest training sigma (EDM sampler's)
    c.loss.sigma_max = 80.0         # highest training sigma (EDM sampler's)

    c.optim.lr = 1e-3               # Adam learning rate after ramp-up
    c.optim.lr_rampup_img = 500_000  # ~2k steps of ramp-up

    c.ema.halflife_img = 500_000    # EDM's half-life
    c.ema.rampup_ratio = 0.05       # EDM's EMA ramp-up
    return locked(c)
