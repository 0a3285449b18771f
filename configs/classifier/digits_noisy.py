"""classifier/digits_noisy: a noise-conditional classifier p(y | x_sigma, sigma) on scikit-learn's 8x8 digits,
for classifier guidance of the digits denoiser (sample.py --guidance classifier:run=DIR).

The encoder half of the digits DDPM++ net with global pooling and a linear head, trained on every noise level
of the EDM sampler (ln sigma uniform over 0.002..80). A few minutes on 2 CPU cores:
    python train.py --config configs/classifier/digits_noisy.py --workdir runs/digits_noisy_classifier
"""
from jaxdiff.config import base_config, locked


def get_config():
    c = base_config()
    c.task = 'noisy_classifier'     # train p(y | x_sigma, sigma), not a denoiser
    c.batch_size = 128              # global batch (1797 images: ~14 steps per epoch)
    c.total_steps = 2_000           # 256 kimg, ~140 epochs (noise makes every epoch new data)
    c.checkpoint_every = 500        # steps between checkpoints
    c.keep_checkpoints = 2          # recent checkpoints kept
    c.sample_every = 0              # a classifier draws no samples

    c.model.model_channels = 32     # base width
    c.model.channel_mult = (1, 2)   # 8x8 and 4x4 levels
    c.model.num_blocks = 2          # residual blocks per level
    c.model.attn_resolutions = ()   # no self-attention at this size
    c.model.dropout = 0.1           # dropout probability (1797 images: some regularisation)

    c.loss.augment_p = 0.0          # no augmentation

    c.optim.lr_rampup_img = 25_000  # ~200 steps of linear ramp-up

    c.ema.halflife_img = 25_000     # EMA half-life (~200 steps at batch 128)
    return locked(c)
