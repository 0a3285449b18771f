"""watermark/digits: the watermark codec (Zhao et al. 2023) on scikit-learn's 8x8 digits (1797 images, embedded).

The paper's codec and loss with the schedule scaled to the small set (tuned on 2 CPU cores, see the README):
    python train.py --config configs/watermark/digits.py --workdir runs/wm_digits
    python watermark.py embed --codec runs/wm_digits --out runs/wm_digits_data --bits_seed 0
"""
from jaxdiff.tasks.watermark_codec import codec_config, locked


def get_config():
    c = codec_config()              # every field with its comment (task watermark_codec)
    c.num_bits = 16                 # bits in the watermark (64 pixels carry them; paper: 64 at 32x32)
    c.optim.lr = 1e-3               # Adam learning rate (paper: 1e-4; 10x for a run of minutes)
    c.total_steps = 8_000           # optimizer steps (~285 epochs of 28 steps)
    c.l2_wait = 300                 # steps at l2 = 0 after bit acc first exceeds l2_start_acc (paper: 1000)
    c.l2_ramp = 1_500               # steps of the linear ramp to l2_max (paper: 3000)
    c.log_every = 250               # steps between progress lines
    c.checkpoint_every = 1_000      # steps between checkpoints

    c.model.encoder_widths = (32, 32, 64, 128)  # U-Net at 8x8: 3 downsamplings (8 -> 1), paper widths
    c.model.decoder_strides = (1, 1, 2, 1, 2, 2, 2)  # paper's with the first stride 1: 8x8 is read at full size
    return locked(c)
