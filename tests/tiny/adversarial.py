"""A tiny TRADES run on 8x8 digits: a WRN-10-1, 3-step attack, 20 steps of batch 16 with a keep-best evaluation."""
from jaxdiff.tasks.adversarial import adversarial_config, locked


def get_config():
    c = adversarial_config()
    c.eps = 0.1                     # Linf radius
    c.attack_step = 0.05            # PGD step
    c.attack_steps = 3              # cheap training attack
    c.batch_size = 16               # divisible by 8 devices and 2 processes
    c.generated_fraction = 0.0      # real data only
    c.total_steps = 20              # steps
    c.checkpoint_every = 10         # checkpoints at 10 and 20
    c.keep_checkpoints = 5          # keep them all
    c.log_every = 10                # progress lines
    c.data.source = 'digits'        # scikit-learn's digits
    c.data.tfds_name = ''           # not TFDS
    c.data.crop_padding = 2         # exercise the crop
    c.data.xflip = True             # and the flip
    c.model.depth = 10              # WRN-10
    c.model.width = 1               # -1
    c.model.dataset_stats = 'digits'  # 1-channel statistics
    c.optim.lr = 0.05               # peak lr
    c.optim.per_epoch = False       # schedule per step
    c.ema.warmup_steps = 5          # EMA averages from step 5
    c.eval.size = 64                # held-out slice
    c.eval.every = 10               # keep-best at 10 and 20
    c.eval.batch_size = 64          # one evaluation batch
    c.eval.attack_steps = 3         # cheap selection attack
    return locked(c)
