"""robust/fashion_mnist: TRADES on Fashion-MNIST (Linf eps 0.1) with a WRN-16-4, optionally 70% generated images.

Real only (default):
    python train.py --config configs/robust/fashion_mnist.py --workdir runs/robust_fashion_mnist
With samples of a class-conditional Fashion-MNIST denoiser (sample.py --out DIR, filtered with filter.py):
    ... --config.data.generated=DIR --config.generated_fraction=0.7
Real data: Debian's dataset-fashion-mnist idx files (60,000 train; the first 1024 are held out for selection).
An epoch is ceil(60,000 / batch) steps with or without generated data (the reference's epoch; see mixed_data).
Hours on 2 CPU cores; minutes on a GPU.
"""
from jaxdiff.tasks.adversarial import adversarial_config, locked


def get_config():
    c = adversarial_config()        # every field with its comment
    c.eps = 0.1                     # the common Fashion-MNIST radius
    c.attack_step = 0.025           # eps / 4 (CIFAR-10: 2/255 of 8/255)
    c.batch_size = 256              # global batch
    c.generated_fraction = 0.0      # real only unless data.generated is set
    c.epochs = 15                   # of ceil(60,000 / 256) = 235 steps (real set, slice included): 3,525 steps
    c.checkpoint_every = 500        # steps between checkpoints
    c.log_every = 50                # steps between progress lines
    c.data.source = 'fashion_mnist'  # Debian's idx files
    c.data.tfds_name = ''           # not TFDS
    c.data.crop_padding = 2         # small random shifts
    c.data.xflip = False            # clothes: flips would be fine, kept off to stay close to the test set
    c.model.depth = 16              # WRN-16
    c.model.width = 4               # -4
    c.model.dataset_stats = 'fashion_mnist'  # 1-channel mean/std
    c.optim.lr = 0.1                # peak lr (batch 256)
    c.optim.pct_start = 0.1         # longer warm-up for a short run
    c.optim.per_epoch = False       # few epochs: step the schedule every step
    c.ema.halflife_img = 35_400.3   # tau 0.995 per update at batch 256, as the reference's --tau 0.995
    c.ema.warmup_steps = 100        # EMA copies the params for the first 100 steps
    c.eval.every = 500              # steps between PGD-40 evaluations
    return locked(c)
