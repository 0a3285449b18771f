"""A tiny autoencoder run for tests/test_tasks.py: digits at 8x8 -> 4x4x2 latents, the PatchGAN switched on halfway
(so its weights, BatchNorm statistics and Adam state are in the resumed state) and an EMA of the weights."""
from jaxdiff.config import locked
from jaxdiff.tasks.autoencoder import autoencoder_config


def get_config():
    c = autoencoder_config()
    c.batch_size = 16               # global batch (divisible by 8 fake devices and by 2 processes)
    c.total_steps = 20              # steps
    c.log_every = 10                # progress line every 10 steps
    c.checkpoint_every = 10         # checkpoint every 10 steps
    c.keep_checkpoints = 3          # keep 3
    c.sample_every = 0              # no preview grids
    c.model.latent_channels = 2     # 2 latent channels
    c.model.block_out_channels = (8, 16)  # two levels: 8x8 -> 4x4
    c.model.layers_per_block = 1    # one ResNet block per level
    c.model.norm_num_groups = 4     # groups dividing the narrow widths
    c.loss.disc_start = 10          # the PatchGAN from step 10 on
    c.loss.disc_num_layers = 1      # one strided layer: 8x8 -> 4x4 -> 3x3 logits
    c.loss.disc_channels = 8        # narrow discriminator
    c.optim.lr = 1e-3               # lr
    c.ema.halflife_img = 160        # an EMA of the weights (10 steps)
    c.eval.num_images = 32          # a small end-of-run evaluation
    return locked(c)
