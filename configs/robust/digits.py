"""robust/digits: TRADES on scikit-learn's 8x8 digits (Linf eps 0.1), a tiny WRN; a few minutes on 2 CPU cores.

    python train.py --config configs/robust/digits.py --workdir runs/robust_digits
With generated digits (sample.py of configs/diffusion/digits.py's class-conditional denoiser; 70% of every batch):
    ... --config.data.generated=DIR --config.generated_fraction=0.7
The first 256 of the 1797 digits are held out for best-checkpoint selection by PGD-40. An epoch is
ceil(1797 / 128) = 15 steps with or without generated data (the reference's epoch: the whole real training set,
slice included, over the batch; see jaxdiff/robust/mixed_data.py).
"""
from jaxdiff.tasks.adversarial import adversarial_config, locked


def get_config():
    c = adversarial_config()        # every field with its comment
    c.eps = 0.1                     # radius (pixels in [0, 1]; digits have 17 grey levels)
    c.attack_step = 0.025           # eps / 4
    c.batch_size = 128              # global batch
    c.generated_fraction = 0.0      # real only unless data.generated is set
    c.epochs = 40                   # 1797 real digits: ceil(1797 / 128) = 15 steps per epoch, 600 steps
    c.checkpoint_every = 100        # steps between checkpoints
    c.log_every = 30                # two epochs
    c.data.source = 'digits'        # scikit-learn's digits
    c.data.tfds_name = ''           # not TFDS
    c.data.crop_padding = 0         # no crops at 8x8
    c.data.xflip = False            # digits are not flip-invariant
    c.model.depth = 10              # WRN-10 (one block per group)
    c.model.width = 2               # -2
    c.model.dataset_stats = 'digits'  # 1-channel mean/std
    c.optim.lr = 0.1                # peak lr
    c.optim.pct_start = 0.1         # warm-up over the first 10%
    c.optim.per_epoch = False       # few epochs: step the schedule every step
    c.ema.halflife_img = 8_827.85   # shorter EMA for a short run: tau = 0.5 ** (128 / 8,827.85) = 0.99
    c.ema.warmup_steps = 50         # EMA copies the params for the first 50 steps
    c.eval.size = 256               # held-out slice
    c.eval.every = 120              # every 8 epochs
    c.eval.batch_size = 256         # one evaluation batch
    return locked(c)
