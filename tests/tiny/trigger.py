"""A tiny trigger fine-tuning: the test sets config.base_run (a run of tests/conftest.py's make_tiny_run)."""
from jaxdiff.tasks.trigger import trigger_config


def get_config():
    c = trigger_config()
    c.base_run = ''                 # the tiny class-conditional run to fine-tune (set by the test)
    c.batch_size = 8                # global batch (divisible by 8 fake devices and by 2 processes)
    c.total_steps = 20              # steps
    c.checkpoint_every = 10         # checkpoint every 10 steps
    c.keep_checkpoints = 2          # keep 2
    c.log_every = 10                # progress line every 10 steps
    c.lam = 1e-3                    # exercise the regulariser
    c.prior = 8                     # exercise the prior term (the picks) ...
    c.prior_source = 'data'         # ... on the embedded digits (no sampling at setup)
    c.optim.lr = 3e-3               # moves the tiny net in 20 steps
    c.ema.halflife_img = 40         # exercise the EMA (half-life 5 steps)
    c.lock()
    return c
