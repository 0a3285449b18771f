"""A tiny feature-classifier run for tests/test_tasks.py: the digits classifier at batch 96, 2 epochs of 11 steps
(checkpoints at 10, 20 and 22: a resume from 20 lands in the second epoch's permutation)."""
from jaxdiff.config import locked
from jaxdiff.tasks.feature_classifier import feature_classifier_config


def get_config():
    c = feature_classifier_config()
    c.batch_size = 96               # global batch (divisible by 8 fake devices and by 2 processes): 11 steps/epoch
    c.epochs = 2                    # 22 steps
    c.checkpoint_every = 10         # checkpoint every 10 steps
    c.keep_checkpoints = 3          # keep 3
    c.log_every = 10                # progress line every 10 steps
    return locked(c)
