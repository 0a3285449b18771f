"""A tiny noise-conditional classifier on 8x8 digits: 20 steps of batch 16 in seconds."""
from jaxdiff.config import base_config, locked


def get_config():
    c = base_config()
    c.task = 'noisy_classifier'     # p(y | x_sigma, sigma)
    c.batch_size = 16               # divisible by 8 devices and 2 processes
    c.total_steps = 20              # steps
    c.checkpoint_every = 10         # checkpoints at 10 and 20
    c.keep_checkpoints = 5          # keep them all
    c.log_every = 10                # progress lines
    c.sample_every = 0              # a classifier draws no samples
    c.model.model_channels = 8      # tiny
    c.model.channel_mult = (1,)     # one level
    c.model.num_blocks = 1          # one block
    c.model.attn_resolutions = ()   # no attention
    c.model.dropout = 0.1           # exercise the dropout key
    c.loss.augment_p = 0.0          # no augmentation (the classifier takes no augmentation labels)
    c.optim.lr_rampup_img = 160     # 10 steps of ramp-up
    c.ema.halflife_img = 160        # short EMA
    return locked(c)
