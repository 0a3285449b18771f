"""A tiny watermark-codec run for tests/test_tasks.py: 8 bits on digits at 8x8, narrow encoder / decoder, the l2
ramp reached within the run (wait 4, ramp 8 after the bit accuracy first passes 0.55)."""
from jaxdiff.tasks.watermark_codec import codec_config, locked


def get_config():
    c = codec_config()
    c.num_bits = 8                  # bits in the watermark
    c.batch_size = 16               # global batch (divisible by 8 fake devices and by 2 processes)
    c.total_steps = 20              # steps
    c.l2_wait = 4                   # short wait ...
    c.l2_ramp = 8                   # ... and ramp, so the l2 term (and its counter in the state) matters
    c.l2_start_acc = 0.55           # reached early
    c.log_every = 10                # progress line every 10 steps
    c.checkpoint_every = 10         # checkpoint every 10 steps
    c.keep_checkpoints = 3          # keep 3
    c.optim.lr = 1e-3               # lr
    c.model.encoder_widths = (8, 8, 16, 16)  # U-Net at 8x8: 3 downsamplings
    c.model.decoder_widths = (8, 8, 16, 16, 16, 16, 16)  # narrow decoder
    c.model.decoder_strides = (1, 1, 2, 1, 2, 2, 2)  # first stride 1 at 8x8 (configs/watermark/digits.py)
    c.model.decoder_hidden = 32     # small dense layer
    return locked(c)
