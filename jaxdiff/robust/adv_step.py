"""The adversarial-training step (TRADES or PGD-AT), its optimizer, schedule and EMA, as DM-Improves-AT trains
(``gowal21uncovering/utils/watrain.py`` + ``trades.py``; Wang et al. 2023).

TRADES (``method='trades'``), per step on x in [0, 1]:

- attack: PGD on KL(f(x) || f(x')) from x' = clip(x + U(-eps, eps)), ``attack_steps`` signed steps of
  ``attack_step`` (Linf) projected on the eps-ball and [0, 1]. As the reference (``model.train()`` with
  ``track_bn_stats(model, False)``) every attack pass, and the clean p(x) it aims away from, runs BatchNorm on the
  batch's own statistics *without* updating the running ones;
- loss: CE with label smoothing on f(x) + beta * KL(softmax f(x) || softmax f(x_adv)) (batch means; gradients flow
  through both sides of the KL), from two training forward passes (clean, then adversarial) that both update the
  running BN statistics.

PGD-AT (``method='pgd_at'``, the reference's ``adversarial_loss``): PGD on CE from a uniform start in eval mode
(running statistics, no update), then CE on f(x_adv) in training mode (one BN update).

Optimizer: PyTorch SGD (coupled weight decay g + wd * p, momentum buffer b = mu b + g, Nesterov g + mu b,
p -= lr g), no weight decay on parameters of modules named ``batchnorm*`` (the reference's ``group_weight``: WRN's
BatchNorms; PreActResNet's ``bn*`` keep it, as in the reference). Schedule: PyTorch's OneCycleLR (cosine, two
phases, div_factor 25, final_div_factor 1e4) with the reference's ``pct_start`` and, when ``cycle_momentum`` (the
PyTorch default the reference inherits), momentum cycled max_momentum -> base_momentum -> max_momentum instead of the
constant ``momentum``. The reference's ``cosinew`` scheduler is stepped once per epoch (``per_epoch``).

BatchNorm momentum: the reference sets 1.0 at its first step (running stats := that step's batch stats, "as Haiku")
and 0.01 afterwards (``model.bn_momentum``, PyTorch convention).

EMA (``ema_update`` of the reference): after update g (1-based), decay = 0 before ``warmup_steps`` (the EMA copies
the params), then min(tau, (1 + d) / (10 + d)) with d = g - warmup_steps and tau = 0.5 ** (B / ema.halflife_img)
(the reference's per-update ``--tau``, held as a half-life in images like every jaxdiff EMA); it averages the params only. The EMA
model uses the trained model's running BN statistics (the reference copies them at the end of every epoch).

Randomness: ``fold_in(key, step)`` split into augmentation and attack keys; draws are made for the global batch.
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from jaxdiff import parallel
from jaxdiff.engine.ema import decay_per_step
from jaxdiff.engine.state import TrainState
from jaxdiff.robust import losses
from jaxdiff.robust.mixed_data import augment
from jaxdiff.robust.pgd import pgd

ARCHS = ('wrn', 'preact_resnet18')
METHODS = ('trades', 'pgd_at')


# ------------------------------------------------------------------------------------------------------ model

def build_net(config, info) -> nn.Module:
    """The classifier of ``config.model`` for ``info`` (channels, num_classes): x in [0, 1] -> logits."""
    from jaxdiff.nets.preact_resnet import PreActResNet18
    from jaxdiff.nets.wide_resnet import WideResNet, dataset_stats
    m = config.model
    mean, std = dataset_stats(m.dataset_stats) if m.dataset_stats else (None, None)
    dtype = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}[m.dtype]
    common = dict(num_classes=info.num_classes, activation=m.activation, mean=mean, std=std,
                  bn_momentum=1.0 - m.bn_momentum, dtype=dtype)
    if m.arch == 'wrn':
        return WideResNet(depth=m.depth, width=m.width, **common)
    if m.arch == 'preact_resnet18':
        return PreActResNet18(**common)
    raise ValueError(f'config.model.arch={m.arch!r} is not supported: use one of {list(ARCHS)}')


def init_state(net: nn.Module, image_shape: tuple, key: jax.Array) -> TrainState:
    """Fresh state: params and BN statistics from net.init on a zero batch of 2, ema = params, zero momentum."""
    variables = net.init(key, jnp.zeros((2,) + tuple(image_shape), jnp.float32))
    params = variables['params']
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema=jax.tree.map(jnp.copy, params),
                    opt_state={'momentum': jax.tree.map(jnp.zeros_like, params)},
                    buffers=variables.get('batch_stats', {}), nonfinite=jnp.zeros((), jnp.int32))


# ------------------------------------------------------------------------------------------------------ schedule

def _cos_anneal(start, end, pct):
    """end + (start - end) / 2 * (cos(pi pct) + 1), written as cos^2(pi pct / 2): no cancellation near pct = 1."""
    return end + (start - end) * jnp.cos(jnp.pi * pct / 2.0) ** 2


def one_cycle(t, total: int, max_lr: float, pct_start: float, *, div_factor: float = 25.0,
              final_div_factor: float = 1e4, base_momentum: float = 0.85, max_momentum: float = 0.95):
    """PyTorch OneCycleLR (anneal 'cos', two phases) at scheduler step ``t`` of ``total``: (lr, momentum).

    Phase 1 ends at step pct_start * total - 1, lr rising from max_lr / div_factor to max_lr (momentum falling
    from max_momentum to base_momentum); phase 2 ends at total - 1, lr falling to max_lr / div_factor /
    final_div_factor (momentum rising back). Steps past the end stay at the final values.
    """
    t = jnp.minimum(jnp.asarray(t, jnp.float32), total - 1)
    initial = max_lr / div_factor
    final = initial / final_div_factor
    end1 = float(pct_start * total) - 1.0
    end2 = float(total) - 1.0
    in1 = t <= end1
    pct1 = t / end1 if end1 > 0 else jnp.ones_like(t)
    pct2 = (t - end1) / max(end2 - end1, 1e-12)
    lr = jnp.where(in1, _cos_anneal(initial, max_lr, pct1), _cos_anneal(max_lr, final, pct2))
    mom = jnp.where(in1, _cos_anneal(max_momentum, base_momentum, pct1),
                    _cos_anneal(base_momentum, max_momentum, pct2))
    return lr, mom


def schedule(config, steps_per_epoch: int, total_steps: int, step):
    """(lr, momentum) of the update at ``step`` (0-based) under ``config.optim``."""
    o = config.optim
    if o.per_epoch:
        t, total = jnp.asarray(step) // steps_per_epoch, -(-total_steps // steps_per_epoch)
    else:
        t, total = step, total_steps
    lr, mom = one_cycle(t, total, o.lr, o.pct_start, div_factor=o.div_factor, final_div_factor=o.final_div_factor,
                        base_momentum=o.base_momentum, max_momentum=o.max_momentum)
    if not o.cycle_momentum:
        mom = jnp.full_like(mom, o.momentum)
    return lr, mom


# ------------------------------------------------------------------------------------------------------ optimizer

def decay_mask(params) -> dict:
    """True where weight decay applies: every leaf not inside a module whose name contains 'batchnorm'."""
    def keep(path, _):
        return not any('batchnorm' in str(getattr(k, 'key', k)) for k in path)
    return jax.tree_util.tree_map_with_path(keep, params)


def sgd_update(params, grads, momentum_buf, lr, momentum, weight_decay: float, nesterov: bool, mask=None):
    """One torch.optim.SGD step (dampening 0): returns (params, momentum_buf)."""
    if mask is None:
        mask = jax.tree.map(lambda _: True, params)
    g = jax.tree.map(lambda g, p, m: g + weight_decay * p if m else g, grads, params, mask)
    buf = jax.tree.map(lambda b, g: momentum * b + g, momentum_buf, g)
    d = jax.tree.map(lambda g, b: g + momentum * b, g, buf) if nesterov else buf
    return jax.tree.map(lambda p, d: p - lr * d, params, d), buf


def ema_decay(step_after, decay: float, warmup_steps: float):
    """The reference's dynamic EMA decay for update number ``step_after`` (1-based)."""
    g = jnp.asarray(step_after, jnp.float32)
    delta = g - warmup_steps
    dyn = jnp.minimum(decay, (1.0 + delta) / jnp.where(10.0 + delta == 0, 1.0, 10.0 + delta))
    dyn = jnp.where(10.0 + delta == 0, decay, dyn)
    return jnp.where(g >= warmup_steps, dyn, 0.0)


# ------------------------------------------------------------------------------------------------------ losses

def smooth_cross_entropy(logits, y, smoothing: float):
    """The reference's SmoothCrossEntropyLoss per sample: (1 - s) * (-log p_y) + s * mean_k(-log p_k). (B,)."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, y[:, None], axis=-1)[:, 0]
    return (1.0 - smoothing) * nll + smoothing * (-jnp.mean(logp, axis=-1))


def trades_objective(logits_nat, logits_adv, y, beta: float, smoothing: float):
    """(loss, ce, kl): mean smoothed CE on the clean logits + beta * mean KL(p_nat || p_adv)."""
    ce = jnp.mean(smooth_cross_entropy(logits_nat, y, smoothing))
    kl = jnp.mean(losses.kl_divergence(logits_nat, logits_adv))
    return ce + beta * kl, ce, kl


def _accuracy(logits, y):
    return jnp.mean((jnp.argmax(logits, -1) == y).astype(jnp.float32))


def cw_loss(logits, y, clean=None):
    """The reference's CWLoss per sample (its PGD-40 selection attack): -max(z_y - max_{j!=y} z_j, 0)."""
    return jnp.minimum(losses.margin(logits, y), 0.0)


def train_step(config, net: nn.Module, steps_per_epoch: int, total_steps: int, warmup_steps: float,
               state: TrainState, batch: dict, key: jax.Array):
    """One update (unjitted). batch: image uint8 (B, H, W, C), label int32 (B,). Returns (state, metrics)."""
    step = state.step
    k_aug, k_attack = jax.random.split(jax.random.fold_in(key, step))
    x = batch['image'].astype(jnp.float32) / 255.0
    y = batch['label']
    d = config.data
    if d.crop_padding or d.xflip:
        x = augment(k_aug, x, d.crop_padding, d.xflip)
    bn_m = 1.0 - config.model.bn_momentum
    if config.model.bn_reset_first_step:
        bn_m = jnp.where(step == 0, 0.0, bn_m)  # flax convention: running = m * running + (1 - m) * batch
    train_net = net.clone(bn_momentum=bn_m)
    params, stats = state.params, state.buffers
    frozen = jax.lax.stop_gradient(params)

    if config.method == 'trades':
        def attack_logits(z):  # training-mode BN on the batch's own statistics, running stats untouched
            return net.apply({'params': frozen, 'batch_stats': stats}, z, train=True, mutable=['batch_stats'])[0]
        x_adv = pgd(attack_logits, x, y, config.eps, key=k_attack, norm=config.norm, n_steps=config.attack_steps,
                    step_size=config.attack_step, loss='kl', random_start=True)
    else:
        def attack_logits(z):  # the reference attacks in eval mode (running statistics)
            return net.apply({'params': frozen, 'batch_stats': stats}, z, train=False)
        x_adv = pgd(attack_logits, x, y, config.eps, key=k_attack, norm=config.norm, n_steps=config.attack_steps,
                    step_size=config.attack_step, loss='ce', random_start=True)
    x_adv = jax.lax.stop_gradient(x_adv)

    def loss_fn(p):
        if config.method == 'trades':
            nat, upd = train_net.apply({'params': p, 'batch_stats': stats}, x, train=True, mutable=['batch_stats'])
            adv, upd = train_net.apply({'params': p, 'batch_stats': upd.get('batch_stats', stats)}, x_adv,
                                       train=True, mutable=['batch_stats'])
            loss, ce, kl = trades_objective(nat, adv, y, config.beta, config.label_smoothing)
        else:
            adv, upd = train_net.apply({'params': p, 'batch_stats': stats}, x_adv, train=True,
                                       mutable=['batch_stats'])
            loss = jnp.mean(smooth_cross_entropy(adv, y, config.label_smoothing))
            nat = net.apply({'params': jax.lax.stop_gradient(p), 'batch_stats': stats}, x, train=False)
            ce, kl = loss, jnp.zeros(())
        return loss, (upd.get('batch_stats', stats), nat, adv, ce, kl)

    (loss, (new_stats, nat, adv, ce, kl)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    lr, mom = schedule(config, steps_per_epoch, total_steps, step)
    o = config.optim
    new_params, buf = sgd_update(params, grads, state.opt_state['momentum'], lr, mom, o.weight_decay, o.nesterov,
                                 decay_mask(params) if o.no_decay_bn else None)
    decay = ema_decay(step + 1, decay_per_step(config.ema.halflife_img, config.batch_size), warmup_steps)
    ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema, new_params)
    bad = (~jnp.isfinite(loss)).astype(jnp.int32)
    new_state = state.replace(step=step + 1, params=new_params, ema=ema, opt_state={'momentum': buf},
                              buffers=new_stats, nonfinite=state.nonfinite + bad)
    metrics = dict(loss=loss, ce=ce, kl=kl, clean_acc=_accuracy(nat, y), adv_acc=_accuracy(adv, y), lr=lr,
                   momentum=mom, ema_decay=decay, grad_norm=jnp.sqrt(sum(jnp.sum(g * g) for g in
                                                                       jax.tree.leaves(grads))))
    return new_state, metrics


def eval_counts(config, net: nn.Module, params, stats, images, labels, weights, key):
    """(clean correct, PGD correct) counts (float32 ()) of an eval batch: eval-mode BN, PGD with
    ``eval.attack_steps`` steps of ``attack_step`` from a uniform start on ``eval.attack_loss`` ('cw' as the
    reference's selection attack, or 'ce'). images uint8 (B, H, W, C); weights (B,) 1 for real rows, 0 padding."""
    x = images.astype(jnp.float32) / 255.0
    logits_fn = lambda z: net.apply({'params': params, 'batch_stats': stats}, z, train=False)  # noqa: E731
    loss = cw_loss if config.eval.attack_loss == 'cw' else 'ce'
    x_adv = pgd(logits_fn, x, labels, config.eps, key=key, norm=config.norm, n_steps=config.eval.attack_steps,
                step_size=config.attack_step, loss=loss, random_start=True)
    clean = jnp.sum(weights * (jnp.argmax(logits_fn(x), -1) == labels))
    robust = jnp.sum(weights * (jnp.argmax(logits_fn(x_adv), -1) == labels))
    return clean, robust


# ------------------------------------------------------------------------------------------------------ jit

def jit_eval(config, net: nn.Module, mesh) -> Callable:
    """Jitted ``(params, stats, images, labels, weights, key) -> (clean, robust)`` counts."""
    rep, data = parallel.replicated(mesh), parallel.batch_sharding(mesh)
    return jax.jit(functools.partial(eval_counts, config, net), in_shardings=(rep, rep, data, data, data, rep),
                   out_shardings=(rep, rep))


def evaluate(eval_fn, params, stats, images: np.ndarray, labels: np.ndarray, batch_size: int, mesh,
             key) -> tuple[float, float]:
    """(clean accuracy, PGD accuracy) over the held-out slice, in fixed batches (the last one zero-padded)."""
    n = len(labels)
    clean = robust = 0.0
    for lo in range(0, n, batch_size):
        x, y = images[lo:lo + batch_size], labels[lo:lo + batch_size]
        w = np.ones(len(y), np.float32)
        pad = batch_size - len(y)
        if pad:
            x = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)])
            y = np.concatenate([y, np.zeros(pad, y.dtype)])
            w = np.concatenate([w, np.zeros(pad, np.float32)])
        sharding = parallel.batch_sharding(mesh)  # every host holds the whole slice: each fills its shards
        batch = {k: jax.make_array_from_callback(v.shape, sharding, lambda idx, v=v: v[idx])
                 for k, v in dict(x=x, y=y, w=w).items()}
        c, r = eval_fn(params, stats, batch['x'], batch['y'], batch['w'], jax.random.fold_in(key, lo))
        clean += float(c)
        robust += float(r)
    return clean / max(n, 1), robust / max(n, 1)
