"""AutoAttack's driver (Croce & Hein 2020, fra31/auto-attack): a fixed sequence of attacks, each run only on the
points that every earlier attack failed to fool.

Per stage: the attack gets the batch and the mask of still-robust points (``active``); its output is projected
into the eps-ball and [0, 1] (a guard: attacks already do this), re-classified, and a point counts as fooled
when it was still robust and the new prediction differs from the label. Fooled points keep that stage's
adversarial example; later stages leave them alone. The robust accuracy is recorded after every stage, with the
clean accuracy first, as the reference's ``robust_accuracy_dict``.

Standard version (Linf and L2): APGD-CE (1 run, 100 iterations) -> APGD-T (9 target classes, 1 run each,
100 iterations) -> FAB-T (9 target classes, 1 run each, 100 iterations; :mod:`jaxdiff.robust.fab`) -> Square
(5000 queries, p_init 0.8; :mod:`jaxdiff.robust.square`). :func:`standard_attacks` builds that list (smaller
budgets can be passed for quick runs). Pass ``attacks=`` to run any list of attack callables in the same way.
"""
from __future__ import annotations

from typing import Callable, Dict, NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp

from jaxdiff.robust.apgd import apgd, apgd_targeted
from jaxdiff.robust.fab import fab
from jaxdiff.robust.pgd import LogitsFn, _per_sample, check_norm, project
from jaxdiff.robust.square import N_QUERIES, square

# attack(logits_fn, x (B, ...), y (B,), key, active (B,) bool) -> x_adv (B, ...); only the active points matter.
AttackFn = Callable[[LogitsFn, jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]

STANDARD_ORDER = ('apgd-ce', 'apgd-t', 'fab-t', 'square')


class AutoAttackResult(NamedTuple):
    """x_adv (B, ...): the adversarial example of the first stage that fooled the point, x itself otherwise;
    robust (B,) bool: classified correctly on x and by no stage fooled; robust_accuracy: {'clean': (), then one
    () entry per stage name}, after that stage. The stages ran in the order of the attack list (a dict passed
    through jax.jit comes back with sorted keys, so read the order from the list, not the dict)."""
    x_adv: jax.Array
    robust: jax.Array
    robust_accuracy: Dict[str, jax.Array]


def standard_attacks(eps, norm: str = 'Linf', n_classes: int = 10, n_iter: int = 100,
                     n_queries: int = N_QUERIES) -> list:
    """Standard AutoAttack's stages, as [(name, AttackFn)] in the order APGD-CE -> APGD-T -> FAB-T -> Square:
    APGD-CE with one run; APGD-T and FAB-T with min(9, n_classes - 1) targets and one run each (the reference
    uses 9 and needs n_classes >= 10); all three with n_iter iterations (reference: 100); Square with n_queries
    queries (reference: 5000), p_init 0.8, the margin loss and the schedule not rescaled. Pass smaller n_iter /
    n_queries for quick checks (the result is then weaker than standard AutoAttack's)."""
    check_norm(norm)
    n_targets = min(9, n_classes - 1)

    def apgd_ce(logits_fn, x, y, key, active):
        return apgd(logits_fn, x, y, eps, key=key, norm=norm, n_iter=n_iter, n_restarts=1, loss='ce',
                    active=active).x_adv

    def apgd_t(logits_fn, x, y, key, active):
        return apgd_targeted(logits_fn, x, y, eps, key=key, norm=norm, n_iter=n_iter, n_restarts=1,
                             n_target_classes=n_targets, active=active).x_adv

    def fab_t(logits_fn, x, y, key, active):
        res = fab(logits_fn, x, y, eps, key=key, norm=norm, targeted=True, n_iter=n_iter, n_restarts=1,
                  n_target_classes=n_targets, active=active)
        # As the reference: only FAB's successes within eps are handed on (FAB's minimum-norm points outside
        # the ball would be projected by the driver and could then count, which the reference does not do).
        fooled = active & ~res.robust
        return jnp.where(_per_sample(fooled, x), res.x_adv, x)

    def square_attack(logits_fn, x, y, key, active):
        return square(logits_fn, x, y, eps, key=key, norm=norm, n_queries=n_queries, active=active).x_adv

    return [('apgd-ce', apgd_ce), ('apgd-t', apgd_t), ('fab-t', fab_t), ('square', square_attack)]


def run_stage(attack: AttackFn, logits_fn: LogitsFn, x: jax.Array, y: jax.Array, eps, norm: str, key: jax.Array,
              x_adv: jax.Array, robust: jax.Array) -> Tuple[jax.Array, jax.Array]:
    """One stage on the still-robust points (module docstring); skipped when none is left.
    -> updated (x_adv (B, ...), robust (B,))."""

    def attack_robust():
        candidate = project(attack(logits_fn, x, y, key, robust), x, eps, norm)
        fooled = robust & (jnp.argmax(logits_fn(candidate), -1) != y)
        return jnp.where(_per_sample(fooled, x), candidate, x_adv), robust & ~fooled

    return jax.lax.cond(jnp.any(robust), attack_robust, lambda: (x_adv, robust))


def autoattack(logits_fn: LogitsFn, x: jax.Array, y: jax.Array, eps, norm: str = 'Linf',
               version: str = 'standard', *, key: jax.Array,
               attacks: Optional[Sequence[Tuple[str, AttackFn]]] = None) -> AutoAttackResult:
    """Run AutoAttack's stages in order, each on the points still robust (module docstring).

    logits_fn: x (B, ...) -> (B, K). x (B, ...) in [0, 1]; y (B,) int; eps scalar or (B,); key: stage i uses
    fold_in(key, i). version: 'standard' (:func:`standard_attacks`) or 'custom' (then ``attacks`` is required).
    attacks: [(name, AttackFn)] to run instead of the standard list.
    Returns :class:`AutoAttackResult`. Jittable with norm, version and attacks static.
    """
    check_norm(norm)
    clean_correct = jnp.argmax(logits_fn(x), -1) == y
    if attacks is None:
        if version != 'standard':
            raise ValueError(f"version={version!r} needs attacks=[(name, attack_fn), ...]; "
                             "or use version='standard'.")
        k = jax.eval_shape(logits_fn, x).shape[-1]
        attacks = standard_attacks(eps, norm, n_classes=k)
    robust, x_adv = clean_correct, x
    accuracy = {'clean': jnp.mean(clean_correct.astype(jnp.float32))}
    for i, (name, attack) in enumerate(attacks):
        x_adv, robust = run_stage(attack, logits_fn, x, y, eps, norm, jax.random.fold_in(key, i), x_adv, robust)
        accuracy[name] = jnp.mean(robust.astype(jnp.float32))
    return AutoAttackResult(x_adv, robust, accuracy)
