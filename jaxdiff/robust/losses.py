"""Per-sample attack losses on logits: cross-entropy, margin, DLR, targeted DLR, TRADES' KL.

Every function takes logits (B, K) and returns (B,), one value per sample, so that the gradient of the batch
sum is the per-sample gradient (the attacks rely on this) and the attacks can keep per-sample bookkeeping.
All of them are "bigger = more adversarial" (the attacker maximises them).

DLR (Croce & Hein 2020, "Reliable evaluation of adversarial robustness with an ensemble of diverse
parameter-free attacks") with logits sorted in decreasing order z_pi1 >= z_pi2 >= ...:

    DLR(z, y)      = -(z_y - max_{j != y} z_j) / (z_pi1 - z_pi3 + 1e-12)
    DLR_T(z, y, t) = -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2 + 1e-12)

Both are invariant to shifting the logits and to scaling them by a positive factor (up to the 1e-12), which is
why AutoAttack uses them: a model cannot hide behind saturated or rescaled logits as it can with cross-entropy.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

# Added to the DLR denominators as in the paper: it only matters when the top logits tie exactly.
DLR_EPS = 1e-12


def _pick(logits: jax.Array, idx: jax.Array) -> jax.Array:
    """logits (B, K), idx (B,) int -> logits[b, idx[b]] (B,)."""
    return jnp.take_along_axis(logits, idx[:, None].astype(jnp.int32), axis=1)[:, 0]


def _max_other(logits: jax.Array, y: jax.Array) -> jax.Array:
    """max_{j != y} z_j, (B,). The true class is masked to -inf rather than read off a sort, so ties between the
    true class and another one give that other logit (as the definition says)."""
    mask = jax.nn.one_hot(y, logits.shape[-1], dtype=bool)
    return jnp.max(jnp.where(mask, -jnp.inf, logits), axis=-1)


def _check_classes(logits: jax.Array, needed: int, name: str) -> None:
    """Static check (shapes are known at trace time): DLR reads the 3rd (targeted: 4th) largest logit."""
    if logits.ndim != 2 or logits.shape[-1] < needed:
        raise ValueError(f'{name} needs logits of shape (B, K) with K >= {needed}, got {logits.shape}; '
                         f'use the cross-entropy or margin loss for fewer classes.')


def cross_entropy(logits: jax.Array, y: jax.Array) -> jax.Array:
    """-log softmax(z)_y. logits (B, K), y (B,) int -> (B,)."""
    return -_pick(jax.nn.log_softmax(logits, axis=-1), y)


def margin(logits: jax.Array, y: jax.Array) -> jax.Array:
    """CW-style margin max_{j != y} z_j - z_y: positive exactly when the sample is misclassified.
    logits (B, K), y (B,) int -> (B,)."""
    return _max_other(logits, y) - _pick(logits, y)


def dlr(logits: jax.Array, y: jax.Array) -> jax.Array:
    """Difference-of-logits-ratio loss -(z_y - max_{j != y} z_j) / (z_pi1 - z_pi3 + 1e-12) (module docstring).
    logits (B, K) with K >= 3, y (B,) int -> (B,)."""
    _check_classes(logits, 3, 'DLR')
    top = jnp.sort(logits, axis=-1)  # ascending: top[:, -1] = z_pi1
    return -(_pick(logits, y) - _max_other(logits, y)) / (top[:, -1] - top[:, -3] + DLR_EPS)


def dlr_targeted(logits: jax.Array, y: jax.Array, y_target: jax.Array) -> jax.Array:
    """Targeted DLR -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2 + 1e-12) (module docstring).
    logits (B, K) with K >= 4, y and y_target (B,) int -> (B,)."""
    _check_classes(logits, 4, 'targeted DLR')
    top = jnp.sort(logits, axis=-1)
    denom = top[:, -1] - 0.5 * (top[:, -3] + top[:, -4]) + DLR_EPS
    return -(_pick(logits, y) - _pick(logits, y_target)) / denom


def kl_divergence(logits_clean: jax.Array, logits_adv: jax.Array) -> jax.Array:
    """KL(softmax(clean) || softmax(adv)), TRADES' robustness term (Zhang et al. 2019).
    logits_clean, logits_adv (B, K) -> (B,), >= 0, zero when the two agree. The attack treats the clean logits as
    constants (stop the gradient through them when they come from the same network)."""
    logp = jax.nn.log_softmax(logits_clean, axis=-1)
    logq = jax.nn.log_softmax(logits_adv, axis=-1)
    return jnp.sum(jnp.exp(logp) * (logp - logq), axis=-1)
