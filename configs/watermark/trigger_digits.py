"""watermark/trigger_digits: the trigger watermark (Zhao et al. 2023) on a class-conditional digits model, the
README's recipe that keeps the digit classes: lam 0.01 + replay of the 1,797 training digits at weight 4.

    python train.py --config configs/watermark/trigger_digits.py --workdir OUT --config.base_run=out/demo/digits
    python -m eval.watermark --trigger OUT
"""
from jaxdiff.tasks.trigger import trigger_config


def get_config():
    c = trigger_config()
    c.lam = 0.01                    # the paper's L1 weight
    c.prior = 1_797                 # replay every training digit ...
    c.prior_source = 'data'         # ... of the base run's data
    c.prior_weight = 4.0            # at weight 4 (FD x0.99, trigger MSE 0.0042 in the README)
    c.lock()
    return c
