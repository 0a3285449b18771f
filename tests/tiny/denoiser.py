"""The tiny denoiser: digits at 8x8, a 16-channel one-level SongUNet (train-loop, CLI and task tests)."""
from jaxdiff.config import base_config, locked


def get_config():
    c = base_config()
    c.seed = 0                      # PRNG seed
    c.batch_size = 16               # global batch (divisible by 8 fake devices and by 2 processes)
    c.total_steps = 20              # steps
    c.checkpoint_every = 10         # checkpoint every 10 steps
    c.keep_checkpoints = 3          # keep 3
    c.log_every = 10                # progress line every 10 steps
    c.sample_every = 20             # one sample grid, at the end
    c.data.source = 'digits'        # embedded digits
    c.data.use_labels = True        # conditional (exercises labels + label dropout)
    c.model.arch = 'ddpmpp'         # SongUNet
    c.model.model_channels = 16     # tiny
    c.model.channel_mult = (1,)     # one level
    c.model.num_blocks = 1          # one block
    c.model.attn_resolutions = ()   # no attention
    c.model.dropout = 0.1           # exercise the dropout rng
    c.model.label_dropout = 0.1     # exercise label dropout
    c.loss.augment_p = 0.0          # no augmentation
    c.optim.lr = 1e-3               # lr
    c.optim.lr_rampup_img = 320     # 20 steps of ramp-up
    c.ema.halflife_img = 160        # short EMA
    c.ema.rampup_ratio = 0.05       # EDM ramp-up
    c.sampling.num_images = 10      # one per class
    c.sampling.num_steps = 4        # cheap grids
    return locked(c)
