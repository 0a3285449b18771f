"""Auto-PGD (Croce & Hein 2020): APGD-CE, APGD-DLR and the targeted APGD-T, step for step as fra31/auto-attack.

One run (:func:`apgd_run`) of n_iter iterations, per sample (every quantity below is per sample):

- start: x_0 = clip(x + eps * t / ||t||), t ~ U[-1, 1]^d for Linf (so one coordinate sits on the face of the
  cube), t ~ N(0, I) for L2 (a point on the sphere); the clip is to [0, 1].
- step size eta_0 = 2 * eps (both norms); momentum alpha = 0.75, except the first step which has none:
      z_{k+1} = P(x_k + eta_k * ascent_direction(grad f(x_k)))
      x_{k+1} = P(x_k + alpha (z_{k+1} - x_k) + (1 - alpha)(x_k - x_{k-1}))
  with P the projection into the eps-ball and [0, 1] (:func:`jaxdiff.robust.pgd.project`).
- checkpoints (:func:`checkpoint_schedule`): the first after 22% of the iterations, then intervals shrinking by
  3% of the iterations down to a floor of 6% (integers as in the reference: int(0.22 n), int(0.03 n), int(0.06 n),
  each at least 1). For n_iter = 100: 22, 41, 57, 70, 80, 87, 93, 99, i.e. the paper's
  p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06) with p_1 = 0.22.
- at a checkpoint (:func:`should_halve`) the step size is halved and the iterate (and its gradient) reset to the
  best point so far when the loss increased in at most rho = 75% of the steps of the interval just ended, or
  when the step size was not halved at the previous checkpoint and the best loss has not changed since then.
  At the first checkpoint the second condition is off (the reference initialises "halved last time" to true).
- bookkeeping: the best-loss point (strictly greater loss replaces it) and, separately, the adversarial point:
  the latest iterate that the classifier gets wrong (the start point counts).

Restarts (:func:`apgd`, :func:`apgd_targeted`): a sample keeps the adversarial example of the first run that found
one; the remaining runs only matter for the samples still robust. APGD-T runs n_restarts runs for each of the
targets "2nd, 3rd, ..., (n_target_classes+1)-th largest clean logit" on the targeted DLR loss.

Deviations from the reference, all deliberate:
- Shapes are static: every run computes on the whole batch and per-sample masks decide what is kept, where the
  reference gathers the still-robust samples. Runs after the first are skipped (``lax.cond``) once no sample is
  left to attack. The outputs agree with the reference's, up to the random numbers.
- The first step's "did the loss increase" compares with the start point's loss. The reference reads the loss
  buffer at index -1 there (a buffer of zeros at that time, so it compares with 0); the paper compares with
  the start point, as here.
- For samples no run fooled, the reference returns the clean x; here ``x_adv`` is the highest-loss point found
  (still classified correctly: every iterate of every run was), which is more useful for training and plots.
  Robust accuracy is unaffected.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.robust import losses
from jaxdiff.robust.pgd import (LogitsFn, _per_sample, ascent_direction, check_norm, normalize,
                                project)

# Constants of the reference (autopgd_base.APGDAttack).
INIT_STEP = 2.0          # eta_0 = INIT_STEP * eps, Linf and L2
MOMENTUM = 0.75          # alpha
RHO = 0.75               # oscillation threshold
FIRST_CHECK = 0.22       # first checkpoint, fraction of n_iter
CHECK_DECREASE = 0.03    # each interval shrinks by this fraction of n_iter...
MIN_INTERVAL = 0.06      # ...down to this fraction

# A per-sample loss of the attack: (logits (B, K), y (B,)) -> (B,), to be maximised.
APGDLoss = Callable[[jax.Array, jax.Array], jax.Array]
APGD_LOSSES = {'ce': losses.cross_entropy, 'dlr': losses.dlr}


class RunResult(NamedTuple):
    """One APGD run. x_best (B, ...): highest-loss point seen (the start counts); loss_best (B,); x_adv (B, ...):
    the latest misclassified iterate, or the start point when there is none; robust (B,) bool: no iterate (start
    included) was misclassified; loss_trace (n_iter, B): loss of iterate k+1 at row k; step_trace (n_iter, B):
    step size after iteration k's checkpoint (if any), i.e. the one the next step uses."""
    x_best: jax.Array
    loss_best: jax.Array
    x_adv: jax.Array
    robust: jax.Array
    loss_trace: jax.Array
    step_trace: jax.Array


class APGDResult(NamedTuple):
    """Outcome over all runs. x_adv (B, ...): the first adversarial example found for the sample; for samples
    still robust, the highest-loss point (classified correctly); for samples misclassified on the clean input or
    not attacked (``active`` false), x itself. robust (B,) bool: clean prediction correct and no run fooled it.
    x_best (B, ...), loss_best (B,): the highest-loss point over all runs (for APGD-T, over all targets)."""
    x_adv: jax.Array
    robust: jax.Array
    x_best: jax.Array
    loss_best: jax.Array


# --- the step-size rule, as small pure functions -------------------------------------------------------------

def checkpoint_schedule(n_iter: int) -> tuple:
    """Iteration counts after which the step-size rule is checked, e.g. (22, 41, 57, 70, 80, 87, 93, 99) for
    n_iter = 100. Integer arithmetic of the reference: first interval int(0.22 n), then each interval
    int(0.03 n) shorter, never shorter than int(0.06 n) (each at least 1)."""
    interval = max(int(FIRST_CHECK * n_iter), 1)
    decrease = max(int(CHECK_DECREASE * n_iter), 1)
    shortest = max(int(MIN_INTERVAL * n_iter), 1)
    out, t = [], 0
    while t + interval <= n_iter:
        t += interval
        out.append(t)
        interval = max(interval - decrease, shortest)
    return tuple(out)


def count_increases(losses_interval: jax.Array, loss_before: jax.Array) -> jax.Array:
    """Number of steps in an interval that increased the loss. losses_interval (k, B): losses of the k iterates of
    the interval; loss_before (B,): the loss of the iterate before it. -> (B,) int32."""
    prev = jnp.concatenate([loss_before[None], losses_interval[:-1]], axis=0)
    return jnp.sum(losses_interval > prev, axis=0).astype(jnp.int32)


def should_halve(n_increases: jax.Array, interval, halved_last: jax.Array, loss_best: jax.Array,
                 loss_best_last: jax.Array, rho: float = RHO) -> jax.Array:
    """The checkpoint rule: halve (and restart from the best point) where

        n_increases <= rho * interval                      (the loss went up in at most rho of the steps)
        or (not halved_last and loss_best <= loss_best_last)  (no halving last time and no progress since).

    n_increases (B,) int; interval: steps since the last checkpoint; halved_last (B,) bool: the decision at the
    previous checkpoint (True before the first, which switches the second condition off there); loss_best,
    loss_best_last (B,): best loss now and at the previous checkpoint (the start loss before the first).
    -> (B,) bool."""
    oscillating = n_increases <= rho * interval
    stalled = jnp.logical_not(halved_last) & (loss_best <= loss_best_last)
    return oscillating | stalled


def halving_decisions(loss_trace: jax.Array, loss_start: jax.Array, rho: float = RHO) -> jax.Array:
    """The decisions of the rule at every checkpoint of a run whose iterates had the losses ``loss_trace``
    (n_iter, B) after a start with loss ``loss_start`` (B,). -> (n_checkpoints, B) bool. The rule only depends on
    the losses (resets to the best point do not change the best loss), so this replays a whole run."""
    n_iter = loss_trace.shape[0]
    running_best = jnp.maximum(loss_start, jax.lax.cummax(loss_trace, axis=0))
    halved_last = jnp.ones_like(loss_start, dtype=bool)
    best_last, prev_t, out = loss_start, 0, []
    for t in checkpoint_schedule(n_iter):
        before = loss_start if prev_t == 0 else loss_trace[prev_t - 1]
        n_inc = count_increases(loss_trace[prev_t:t], before)
        best = running_best[t - 1]
        halved_last = should_halve(n_inc, t - prev_t, halved_last, best, best_last, rho)
        out.append(halved_last)
        best_last, prev_t = best, t
    return jnp.stack(out)


def _checkpoint_arrays(n_iter: int):
    """(is_checkpoint, interval) per iteration index (n_iter,): iteration k ends an interval of that length."""
    is_check = np.zeros(n_iter, bool)
    interval = np.ones(n_iter, np.int32)
    prev = 0
    for t in checkpoint_schedule(n_iter):
        is_check[t - 1], interval[t - 1], prev = True, t - prev, t
    return jnp.asarray(is_check), jnp.asarray(interval)


# --- one run ---------------------------------------------------------------------------------------------------

def reference_start(key: jax.Array, x: jax.Array, eps, norm: str) -> jax.Array:
    """APGD's start: x + eps * t / ||t|| with t ~ U[-1, 1]^d (Linf) or N(0, I) (L2), clipped to [0, 1].
    (B, ...) -> (B, ...)."""
    if norm == 'Linf':
        t = jax.random.uniform(key, x.shape, x.dtype, -1.0, 1.0)
    else:
        t = jax.random.normal(key, x.shape, x.dtype)
    return jnp.clip(x + _per_sample(eps, x) * normalize(t, norm), 0.0, 1.0)


def apgd_run(logits_fn: LogitsFn, x: jax.Array, y: jax.Array, eps, loss_fn: APGDLoss, key: jax.Array, *,
             norm: str = 'Linf', n_iter: int = 100, rho: float = RHO,
             x_init: Optional[jax.Array] = None) -> RunResult:
    """One APGD run (module docstring) on a per-sample loss ``loss_fn(logits, y) -> (B,)``.
    x (B, ...) in [0, 1]; y (B,) int; eps scalar or (B,); key for the start (unused with ``x_init``).
    Cost: n_iter + 1 forward+backward passes. Jittable with n_iter, norm static."""
    check_norm(norm)

    def objective(z):
        logits = logits_fn(z)
        per_sample = loss_fn(logits, y)
        return jnp.sum(per_sample), (per_sample, logits)

    value_grad = jax.grad(objective, has_aux=True)

    x0 = reference_start(key, x, eps, norm) if x_init is None else jnp.clip(x_init, 0.0, 1.0)
    grad0, (loss0, logits0) = value_grad(x0)
    b = x.shape[0]
    carry = dict(x=x0, x_prev=x0, grad=grad0, step=jnp.full((b,), INIT_STEP, x.dtype) * jnp.asarray(eps, x.dtype),
                 x_best=x0, grad_best=grad0, loss_best=loss0, loss_prev=loss0,
                 n_inc=jnp.zeros((b,), jnp.int32), halved_last=jnp.ones((b,), bool), best_last=loss0,
                 robust=jnp.argmax(logits0, -1) == y, x_adv=x0)

    def body(c, inputs):
        k, is_check, interval = inputs
        alpha = jnp.where(k > 0, MOMENTUM, 1.0)
        xk = c['x']
        z = project(xk + _per_sample(c['step'], x) * ascent_direction(c['grad'], norm), x, eps, norm)
        x_new = project(xk + alpha * (z - xk) + (1.0 - alpha) * (xk - c['x_prev']), x, eps, norm)
        grad, (loss, logits) = value_grad(x_new)

        wrong = jnp.argmax(logits, -1) != y
        better = loss > c['loss_best']
        loss_best = jnp.where(better, loss, c['loss_best'])
        x_best = jnp.where(_per_sample(better, x), x_new, c['x_best'])
        grad_best = jnp.where(_per_sample(better, x), grad, c['grad_best'])
        n_inc = c['n_inc'] + (loss > c['loss_prev']).astype(jnp.int32)

        halve = is_check & should_halve(n_inc, interval, c['halved_last'], loss_best, c['best_last'], rho)
        hb = _per_sample(halve, x)
        new = dict(x=jnp.where(hb, x_best, x_new), x_prev=xk, grad=jnp.where(hb, grad_best, grad),
                   step=jnp.where(halve, 0.5 * c['step'], c['step']),
                   x_best=x_best, grad_best=grad_best, loss_best=loss_best, loss_prev=loss,
                   n_inc=jnp.where(is_check, 0, n_inc),
                   halved_last=jnp.where(is_check, halve, c['halved_last']),
                   best_last=jnp.where(is_check, loss_best, c['best_last']),
                   robust=c['robust'] & ~wrong,
                   x_adv=jnp.where(_per_sample(wrong, x), x_new, c['x_adv']))
        return new, (loss, new['step'])

    is_check, interval = _checkpoint_arrays(n_iter)
    c, (loss_trace, step_trace) = jax.lax.scan(body, carry, (jnp.arange(n_iter), is_check, interval))
    return RunResult(c['x_best'], c['loss_best'], c['x_adv'], c['robust'], loss_trace, step_trace)


# --- restarts and targets --------------------------------------------------------------------------------------

def _runs(run: Callable[[jax.Array], RunResult], n_runs: int, x: jax.Array, todo: jax.Array) -> tuple:
    """Fold ``run(j)`` for j < n_runs into (x_adv, still_robust, x_best, loss_best): a sample keeps the adversarial
    point of the first run that fooled it. Run 0 always happens (it also gives every sample a best point); later
    runs are skipped once no sample is left in ``todo``. All runs share one traced copy of the run (a scan), so
    compile time does not grow with the number of runs."""

    def fold(state, res):
        x_adv, todo, x_best, loss_best = state
        fooled = todo & ~res.robust
        better = res.loss_best > loss_best
        return (jnp.where(_per_sample(fooled, x), res.x_adv, x_adv), todo & res.robust,
                jnp.where(_per_sample(better, x), res.x_best, x_best), jnp.where(better, res.loss_best, loss_best))

    state = (x, todo, x, jnp.full(x.shape[:1], -jnp.inf, x.dtype))
    if n_runs == 1:
        return fold(state, run(jnp.asarray(0)))

    def step(s, j):
        go = (j == 0) | jnp.any(s[1])
        return jax.lax.cond(go, lambda: fold(s, run(j)), lambda: s), None

    return jax.lax.scan(step, state, jnp.arange(n_runs))[0]


def _finish(x: jax.Array, clean_correct: jax.Array, active: jax.Array, state: tuple) -> APGDResult:
    x_adv, todo, x_best, loss_best = state
    x_adv = jnp.where(_per_sample(todo, x), x_best, x_adv)
    robust = todo | (clean_correct & ~active)
    return APGDResult(x_adv, robust, x_best, loss_best)


def _prepare(logits_fn, x, y, active):
    clean = logits_fn(x)
    clean_correct = jnp.argmax(clean, -1) == y
    active = jnp.ones_like(clean_correct) if active is None else jnp.asarray(active, bool)
    return clean, clean_correct, active


def apgd(logits_fn: LogitsFn, x: jax.Array, y: jax.Array, eps, *, key: jax.Array, norm: str = 'Linf',
         n_iter: int = 100, n_restarts: int = 1, loss: str = 'ce', rho: float = RHO,
         active: Optional[jax.Array] = None) -> APGDResult:
    """APGD-CE (loss='ce') or APGD-DLR (loss='dlr', needs K >= 3): n_restarts runs of :func:`apgd_run`, each from
    its own random start (key folded with the restart index), on the samples still robust.

    logits_fn: x (B, ...) -> (B, K). x (B, ...) in [0, 1]; y (B,) int; eps scalar or (B,).
    active: optional (B,) bool, the samples to attack (AutoAttack passes the still-robust ones); the others come
        back unchanged. AutoAttack's standard setting for APGD-CE is n_restarts=1, n_iter=100.
    Returns :class:`APGDResult`. Jittable with n_iter, n_restarts, norm, loss static. Cost: up to
    n_restarts * (n_iter + 1) forward+backward passes on the whole batch.
    """
    if loss not in APGD_LOSSES:
        raise ValueError(f"loss must be one of {sorted(APGD_LOSSES)}, got {loss!r}; "
                         "for the targeted DLR loss use apgd_targeted.")
    _, clean_correct, active = _prepare(logits_fn, x, y, active)

    def run(j):
        return apgd_run(logits_fn, x, y, eps, APGD_LOSSES[loss], jax.random.fold_in(key, j), norm=norm,
                        n_iter=n_iter, rho=rho)

    return _finish(x, clean_correct, active, _runs(run, n_restarts, x, clean_correct & active))


def target_classes(clean_logits: jax.Array, n_target_classes: int) -> jax.Array:
    """APGD-T's targets: row c-2 holds, per sample, the class with the c-th largest clean logit, c = 2 ..
    n_target_classes + 1 (for a correctly classified sample: the most likely wrong classes, in order).
    clean_logits (B, K) -> (n_target_classes, B) int32."""
    k = clean_logits.shape[-1]
    if n_target_classes + 1 > k:
        raise ValueError(f'n_target_classes={n_target_classes} needs at least {n_target_classes + 1} classes, '
                         f'the classifier has {k}; pass n_target_classes <= {k - 1}.')
    order = jnp.argsort(clean_logits, axis=-1)  # ascending
    return order[:, k - 2 - jnp.arange(n_target_classes)].T.astype(jnp.int32)


def apgd_targeted(logits_fn: LogitsFn, x: jax.Array, y: jax.Array, eps, *, key: jax.Array, norm: str = 'Linf',
                  n_iter: int = 100, n_restarts: int = 1, n_target_classes: int = 9, rho: float = RHO,
                  active: Optional[jax.Array] = None) -> APGDResult:
    """APGD-T: for each target of :func:`target_classes` (targets from the clean logits), n_restarts APGD runs on
    the targeted DLR loss (needs K >= 4 and K >= n_target_classes + 1). Success means untargeted
    misclassification, as in the reference. AutoAttack's standard setting: n_target_classes=9, n_restarts=1,
    n_iter=100. Shapes, ``active`` and the result as :func:`apgd`. Cost: up to
    n_target_classes * n_restarts * (n_iter + 1) forward+backward passes."""
    clean, clean_correct, active = _prepare(logits_fn, x, y, active)
    targets = target_classes(clean, n_target_classes)

    def run(j):
        y_target = targets[j // n_restarts]
        return apgd_run(logits_fn, x, y, eps, lambda logits, yy: losses.dlr_targeted(logits, yy, y_target),
                        jax.random.fold_in(key, j), norm=norm, n_iter=n_iter, rho=rho)

    return _finish(x, clean_correct, active,
                   _runs(run, n_target_classes * n_restarts, x, clean_correct & active))
