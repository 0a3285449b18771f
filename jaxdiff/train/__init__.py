"""Training: config -> net, state, Adam with lr ramp-up, EMA, and the sharded jitted step."""
from jaxdiff.train.ema import ema_beta, ema_update
from jaxdiff.train.model import build_net, denoiser_fn
from jaxdiff.train.optimizer import learning_rate, make_optimizer
from jaxdiff.train.state import TrainState, init_state
from jaxdiff.train.step import init_sharded_state, make_train_step, state_shardings, train_step

__all__ = ['TrainState', 'build_net', 'denoiser_fn', 'ema_beta', 'ema_update', 'init_sharded_state',
           'init_state', 'learning_rate', 'make_optimizer', 'make_train_step', 'state_shardings', 'train_step']
