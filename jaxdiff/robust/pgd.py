"""FGSM and PGD (Madry et al. 2018) for the Linf and L2 threat models, plus the geometry every attack shares.

Conventions of :mod:`jaxdiff.robust`: a classifier is ``logits_fn(x (B, H, W, C) in [0, 1]) -> logits (B, K)``,
a pure function (closures over params are fine); labels y are (B,) int; eps is the radius of the ball around
the clean x. Every attack returns points inside the eps-ball around x *and* inside [0, 1]^d (the image box).

The gradient of the batch sum of per-sample losses is used as the per-sample gradient, so ``logits_fn`` must
treat samples independently (inference-mode batch norm, no cross-sample attention).

Geometry (also used by :mod:`jaxdiff.robust.apgd`):

- ``project``: Linf clips the perturbation coordinate-wise; L2 rescales it onto the sphere when it is longer
  than eps. Both are then clipped to [0, 1]. Clipping to the box after the ball projection keeps the point in
  the ball because x itself is in the box (each coordinate only moves towards x). The composition is not the
  exact Euclidean projection onto the intersection for L2, but it is what PGD and AutoAttack use.
- ``ascent_direction``: sign(g) for Linf (the steepest-ascent direction of the Linf ball), g / ||g||_2 for L2.
"""
from __future__ import annotations

from typing import Callable, Optional, Union

import jax
import jax.numpy as jnp

from jaxdiff.robust import losses

LogitsFn = Callable[[jax.Array], jax.Array]
# A PGD loss: (logits_adv (B, K), y (B,), logits_clean (B, K)) -> (B,), to be maximised.
PGDLoss = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]
NORMS = ('Linf', 'L2')

# Added to norms before dividing, as the reference implementations do, so a zero gradient gives a zero step.
NORM_EPS = 1e-12

PGD_LOSSES = {
    'ce': lambda logits, y, clean: losses.cross_entropy(logits, y),
    'margin': lambda logits, y, clean: losses.margin(logits, y),
    'kl': lambda logits, y, clean: losses.kl_divergence(clean, logits),
}


def check_norm(norm: str) -> None:
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}.")


def _per_sample(v: jax.Array, x: jax.Array) -> jax.Array:
    """Broadcast a (B,) or scalar value against x (B, ...)."""
    v = jnp.asarray(v, x.dtype)
    return v.reshape(v.shape + (1,) * (x.ndim - v.ndim)) if v.ndim else v


def lp_norm(v: jax.Array, norm: str) -> jax.Array:
    """Per-sample norm of v (B, ...) -> (B,): max |v| for Linf, sqrt(sum v^2) for L2."""
    flat = v.reshape(v.shape[0], -1)
    return jnp.max(jnp.abs(flat), axis=1) if norm == 'Linf' else jnp.sqrt(jnp.sum(flat ** 2, axis=1))


def normalize(v: jax.Array, norm: str) -> jax.Array:
    """v / (||v|| + 1e-12) per sample, (B, ...) -> (B, ...)."""
    return v / _per_sample(lp_norm(v, norm) + NORM_EPS, v)


def ascent_direction(grad: jax.Array, norm: str) -> jax.Array:
    """Unit steepest-ascent direction for the norm: sign(g) (Linf) or g / ||g||_2 (L2). (B, ...) -> (B, ...)."""
    return jnp.sign(grad) if norm == 'Linf' else normalize(grad, 'L2')


def project(x_adv: jax.Array, x: jax.Array, eps, norm: str) -> jax.Array:
    """Back into the eps-ball around x, then into [0, 1] (module docstring). eps: scalar or (B,).
    x_adv, x (B, ...) -> (B, ...)."""
    delta = x_adv - x
    e = _per_sample(eps, x)
    if norm == 'Linf':
        delta = jnp.clip(delta, -e, e)
    else:
        length = _per_sample(lp_norm(delta, 'L2'), x)
        delta = delta / (length + NORM_EPS) * jnp.minimum(e, length)
    return jnp.clip(x + delta, 0.0, 1.0)


def uniform_start(key: jax.Array, x: jax.Array, eps, norm: str) -> jax.Array:
    """A point drawn uniformly from the eps-ball around x (Linf: the cube; L2: direction uniform on the sphere,
    radius eps * U^(1/d) so the volume is uniform), then clipped to [0, 1]. (B, ...) -> (B, ...)."""
    kd, kr = jax.random.split(key)
    e = _per_sample(eps, x)
    if norm == 'Linf':
        delta = jax.random.uniform(kd, x.shape, x.dtype, -1.0, 1.0) * e
    else:
        d = x[0].size
        radius = jax.random.uniform(kr, (x.shape[0],), x.dtype) ** (1.0 / d)
        delta = normalize(jax.random.normal(kd, x.shape, x.dtype), 'L2') * _per_sample(radius, x) * e
    return jnp.clip(x + delta, 0.0, 1.0)


def resolve_loss(loss: Union[str, PGDLoss]) -> PGDLoss:
    if callable(loss):
        return loss
    if loss not in PGD_LOSSES:
        raise ValueError(f"loss must be one of {sorted(PGD_LOSSES)} or a callable "
                         f"(logits_adv, y, logits_clean) -> (B,), got {loss!r}.")
    return PGD_LOSSES[loss]


def pgd(logits_fn: LogitsFn, x: jax.Array, y: jax.Array, eps, *, key: Optional[jax.Array] = None,
        norm: str = 'Linf', n_steps: int = 10, step_size=None, loss: Union[str, PGDLoss] = 'ce',
        random_start: bool = True, keep_best: bool = False) -> jax.Array:
    """Projected gradient ascent on a per-sample loss inside the eps-ball (Linf or L2) and [0, 1].

    x_{k+1} = project(x_k + step_size * ascent_direction(grad loss(x_k))), n_steps times, from x_0 = x or a point
    drawn uniformly from the ball (``random_start``, needs ``key``).

    logits_fn: x (B, ...) -> (B, K). x (B, ...) in [0, 1]; y (B,) int (ignored by 'kl').
    eps: radius, scalar or (B,). step_size: scalar or (B,); default 2.5 * eps / n_steps (Madry et al.: enough to
        cross the ball from any start). loss: 'ce', 'margin', 'kl' (KL(softmax(clean) || softmax(adv)), TRADES'
        inner maximisation; the clean logits are computed once and held constant; its gradient vanishes at x, so
        use a random start), or a callable (logits_adv, y, logits_clean) -> (B,).
    keep_best: return, per sample, the iterate with the highest loss among x_0..x_n (one extra forward pass)
        instead of the last iterate x_n. Off by default, as in standard PGD; it never lowers the loss.
    Returns x_adv (B, ...). Jittable with n_steps, norm, loss, random_start, keep_best static; eps and step_size
    may be traced. Cost: n_steps forward+backward passes (+1 forward with keep_best).
    """
    check_norm(norm)
    if random_start and key is None:
        raise ValueError('pgd(random_start=True) needs key=jax.random.key(...); or pass random_start=False.')
    loss_fn = resolve_loss(loss)
    if step_size is None:
        step_size = 2.5 * jnp.asarray(eps, x.dtype) / n_steps
    step = _per_sample(step_size, x)
    clean = jax.lax.stop_gradient(logits_fn(x))

    def objective(z):
        per_sample = loss_fn(logits_fn(z), y, clean)
        return jnp.sum(per_sample), per_sample

    x0 = uniform_start(key, x, eps, norm) if random_start else x

    def body(carry, _):
        x_adv, x_best, loss_best = carry
        grad, loss_here = jax.grad(objective, has_aux=True)(x_adv)
        better = loss_here > loss_best
        x_best = jnp.where(_per_sample(better, x), x_adv, x_best)
        loss_best = jnp.where(better, loss_here, loss_best)
        x_adv = project(x_adv + step * ascent_direction(grad, norm), x, eps, norm)
        return (x_adv, x_best, loss_best), None

    init = (x0, x0, jnp.full(x.shape[:1], -jnp.inf, x.dtype))
    (x_last, x_best, loss_best), _ = jax.lax.scan(body, init, None, length=n_steps)
    if not keep_best:
        return x_last
    better = objective(x_last)[1] > loss_best
    return jnp.where(_per_sample(better, x), x_last, x_best)


def fgsm(logits_fn: LogitsFn, x: jax.Array, y: jax.Array, eps, *, norm: str = 'Linf',
         loss: Union[str, PGDLoss] = 'ce') -> jax.Array:
    """Fast gradient (sign) method (Goodfellow et al. 2015): one step of length eps from x,
    x + eps * ascent_direction(grad), projected into [0, 1]. Shapes as :func:`pgd`; returns (B, ...)."""
    return pgd(logits_fn, x, y, eps, norm=norm, n_steps=1, step_size=eps, loss=loss, random_start=False)
