"""FAB, the Fast Adaptive Boundary attack (Croce & Hein 2020), targeted (FAB-T) and untargeted, Linf and L2,
step for step as fra31/auto-attack (``fab_base.FABAttack.attack_single_run`` and ``perturb``).

FAB looks for the adversarial point of smallest norm. One run (:func:`fab_run`) of n_iter iterations, per sample,
from x_1 = x (first run) or a random start (:func:`fab_start`, later restarts):

1. Linearise the decision boundary at x_1 (:func:`target_plane`, :func:`nearest_plane`): with f the logit
   difference z_t - z_y (FAB-T: t is the target class; FAB: the class whose linearised boundary is nearest in the
   dual norm), the boundary is approximated by the hyperplane {z : f(x_1) + grad f(x_1) . (z - x_1) = 0}.
2. Project both x_1 and the clean x onto that hyperplane intersected with the box [0, 1]^d, in the attack's norm
   (:func:`hyperplane_step`): steps d_1 and d_2.
3. Extrapolate (biased towards the clean point so the result stays close to it):
       alpha = clip(||d_1|| / (||d_1|| + ||d_2||), 0, alpha_max)                (norms floored at 1e-8)
       x_1 <- clip((1 - alpha)(x_1 + eta d_1) + alpha (x + eta d_2), 0, 1)      (eta > 1 overshoots)
4. If x_1 is misclassified (untargeted success, also for FAB-T): keep it when it is the smallest-norm
   adversarial point of the run so far, then step back towards x: x_1 <- x + beta (x_1 - x).

Constants of the reference: n_iter = 100, alpha_max = 0.1, eta = 1.05, beta = 0.9; random starts at distance
eps / 2 from x in the attack's norm. AutoAttack's standard FAB-T: targets = the classes with the 2nd .. 10th
largest clean logit (n_target_classes = 9, as APGD-T), one run each from the clean point (n_restarts = 1).

The projection (step 2), for a point t, hyperplane w . z = b and box [0, 1]^d: with c = w . t - b made >= 0 by
flipping the signs of w and b, every coordinate moves "downhill" (against sign(w_i)) by at most its distance to
the box face on that side, p_i (t_i when w_i > 0, 1 - t_i when w_i < 0). Then
- Linf: d_i = -sign(w_i) min(lambda, p_i) with the smallest lambda such that sum_i |w_i| min(lambda, p_i) = c;
- L2:   d_i = -w_i min(alpha, p_i / |w_i|) with alpha such that sum_i w_i^2 min(alpha, p_i / |w_i|) = c
  (the KKT point: the unconstrained step -alpha w, clipped to the box).
Both are "find s with sum_i v_i min(s, q_i) = c" for an increasing piecewise-linear function
(:func:`solve_capped_sum`). Without the box this gives the closed forms -c sign(w) / ||w||_1 (Linf) and
-c w / ||w||_2^2 (L2). When even the corner of the box that decreases w . z most does not reach the hyperplane,
the step goes to that corner, as in the reference.

Deviations from the reference, all deliberate:
- Static shapes: every run computes on the whole batch, masks decide what is kept; runs after the first are
  skipped (``lax.cond``) once no sample is left to fool within eps. The reference gathers the still-robust points.
- The projection is computed by sorting the breakpoints and evaluating the piecewise-linear function at all of them
  (one sort, two cumulative sums) instead of the reference's bisection over the sorted breakpoints; the result is
  the same point (up to float rounding; for Linf the minimiser is not unique, and both return the one that moves
  every coordinate by min(lambda, p_i)).
- Across runs a sample keeps the smallest-norm adversarial point of the runs that attacked it (the reference keeps
  the first one within eps; a sample stops being attacked, in both, once it has one within eps). Success within
  eps is the same event either way; for the samples not fooled within eps, ``adv_norm`` is then the best
  minimum-norm estimate, which is what FAB is for.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from jaxdiff.robust.apgd import reference_start, target_classes
from jaxdiff.robust.pgd import LogitsFn, _per_sample, check_norm, lp_norm

# Constants of the reference (fab_base.FABAttack).
ALPHA_MAX = 0.1     # cap on the weight of the step from the clean point
ETA = 1.05          # overshoot of the projection steps
BETA = 0.9          # backward step towards x after a success
START_SCALE = 0.5   # random starts lie at distance START_SCALE * eps from x
MIN_STEP_NORM = 1e-8   # floor on ||d_1||, ||d_2|| in alpha (avoids 0 / 0 when x_1 is on the hyperplane)
DUAL_EPS = 1e-12       # added to the dual norms of the gradients (untargeted choice of the boundary)
L2_ZERO_W = 1e-8       # |w_i| below this is treated as 0 by the L2 projection (the reference's threshold)
NOT_FOUND = jnp.inf    # adv_norm of a sample without an adversarial point

# A boundary linearisation: (x_1 (B, ...)) -> (f (B,), grad f (B, ...)), f = z_t - z_y for some class t.
PlaneFn = Callable[[jax.Array], tuple]


class RunResult(NamedTuple):
    """One FAB run. x_adv (B, ...): smallest-norm misclassified iterate (x itself when none); adv_norm (B,): its
    distance to x in the attack's norm (inf when none)."""
    x_adv: jax.Array
    adv_norm: jax.Array


class FABResult(NamedTuple):
    """Outcome over all runs. x_adv (B, ...): smallest-norm adversarial point of the runs that attacked the sample
    (it may lie outside the eps-ball; x itself when none was found or the sample was not attacked); adv_norm (B,):
    its norm, inf when none; robust (B,) bool: clean prediction correct and no adversarial point within eps
    (for samples not ``active``: clean prediction correct)."""
    x_adv: jax.Array
    robust: jax.Array
    adv_norm: jax.Array


# --- projection onto a hyperplane intersected with the box -----------------------------------------------------

def solve_capped_sum(v: jax.Array, q: jax.Array, c: jax.Array) -> jax.Array:
    """The smallest s >= 0 with h(s) = sum_i v_i min(s, q_i) = c, per row.

    v (B, D) >= 0 slopes; q (B, D) >= 0 caps (breakpoints); c (B,) >= 0. h is continuous, nondecreasing and
    piecewise linear with breakpoints q_i. Returns s (B,); inf where c > h(inf) = sum_i v_i q_i (no solution).
    With q sorted ascending, h(q_(k)) = sum_{j<=k} v_(j) q_(j) + q_(k) sum_{j>k} v_(j); the root lies in the first
    segment whose right end reaches c, where h(s) = sum_{j<k} v_(j) q_(j) + s sum_{j>=k} v_(j)."""
    order = jnp.argsort(q, axis=1)
    qs = jnp.take_along_axis(q, order, axis=1)
    vs = jnp.take_along_axis(v, order, axis=1)
    vq_incl = jnp.cumsum(vs * qs, axis=1)
    v_tail = jnp.sum(vs, axis=1, keepdims=True) - jnp.cumsum(vs, axis=1)  # sum_{j>k} v_(j)
    h_at_breaks = vq_incl + qs * v_tail
    k = jnp.sum(h_at_breaks < c[:, None], axis=1)  # index of the first breakpoint with h >= c
    d = q.shape[1]
    kc = jnp.minimum(k, d - 1)[:, None]
    vq_before = jnp.take_along_axis(vq_incl - vs * qs, kc, axis=1)[:, 0]
    slope = jnp.take_along_axis(v_tail + vs, kc, axis=1)[:, 0]
    # slope == 0 only when every v_j is 0 from k on, i.e. when c == h(q_(k-1)) = 0 was already met at s = 0.
    s = jnp.where(slope > 0, (c - vq_before) / jnp.where(slope > 0, slope, 1.0), 0.0)
    return jnp.where(k >= d, jnp.inf, jnp.maximum(s, 0.0))


def _downhill(t: jax.Array, w: jax.Array, b: jax.Array):
    """Orient the hyperplane so that the point has to decrease w . z: -> (w', c >= 0, p): w' = sign * w,
    c = |w . t - b|, p (B, D) the room each coordinate has against sign(w'_i) before the box face."""
    gap = jnp.sum(w * t, axis=1) - b
    sign = jnp.where(gap >= 0, 1.0, -1.0).astype(t.dtype)
    w = w * sign[:, None]
    room = jnp.where(w > 0, t, 1.0 - t)
    return w, gap * sign, room


def hyperplane_step_linf(t: jax.Array, w: jax.Array, b: jax.Array) -> jax.Array:
    """Smallest-Linf step d with w . (t + d) = b and t + d in [0, 1]^D (module docstring).
    t (B, D) in [0, 1]; w (B, D); b (B,) -> d (B, D). Infeasible rows get the step to the box corner that
    decreases |w . z - b| most."""
    w, c, room = _downhill(t, w, b)
    lam = solve_capped_sum(jnp.abs(w), room, c)
    return -jnp.sign(w) * jnp.minimum(lam[:, None], room)


def hyperplane_step_l2(t: jax.Array, w: jax.Array, b: jax.Array) -> jax.Array:
    """Smallest-L2 step d with w . (t + d) = b and t + d in [0, 1]^D (module docstring).
    t (B, D) in [0, 1]; w (B, D); b (B,) -> d (B, D). Coordinates with |w_i| < 1e-8 do not move; infeasible rows
    get the step to the box corner that decreases |w . z - b| most."""
    w, c, room = _downhill(t, w, b)
    live = jnp.abs(w) >= L2_ZERO_W
    safe_w = jnp.where(live, w, 1.0)
    cap = jnp.where(live, room / jnp.abs(safe_w), 0.0)  # the alpha at which coordinate i reaches the box
    alpha = solve_capped_sum(jnp.where(live, w ** 2, 0.0), cap, c)
    return jnp.where(live, -w * jnp.minimum(alpha[:, None], cap), 0.0)


def hyperplane_step(t: jax.Array, w: jax.Array, b: jax.Array, norm: str) -> jax.Array:
    """:func:`hyperplane_step_linf` or :func:`hyperplane_step_l2`. (B, D), (B, D), (B,) -> (B, D)."""
    return hyperplane_step_linf(t, w, b) if norm == 'Linf' else hyperplane_step_l2(t, w, b)


# --- boundary linearisations -----------------------------------------------------------------------------------

def _pick(v: jax.Array, idx: jax.Array) -> jax.Array:
    return jnp.take_along_axis(v, idx[:, None], axis=1)[:, 0]


def target_plane(logits_fn: LogitsFn, y: jax.Array, y_target: jax.Array) -> PlaneFn:
    """FAB-T's boundary: f = z_t - z_y and its gradient (one backward pass; the gradient of the batch sum is the
    per-sample gradient). -> PlaneFn."""

    def plane(x1):
        def diff(z):
            logits = logits_fn(z)
            f = _pick(logits, y_target) - _pick(logits, y)
            return jnp.sum(f), f

        grad, f = jax.grad(diff, has_aux=True)(x1)
        return f, grad

    return plane


def nearest_plane(logits_fn: LogitsFn, y: jax.Array, norm: str) -> PlaneFn:
    """Untargeted FAB's boundary: among f_k = z_k - z_y (k != y), the one whose linearised boundary is nearest,
    |f_k| / ||grad f_k||_dual (dual of Linf is L1, of L2 is L2). Needs the full Jacobian (K backward passes).
    -> PlaneFn."""

    def plane(x1):
        logits, vjp = jax.vjp(logits_fn, x1)
        k = logits.shape[-1]
        cotangents = jnp.broadcast_to(jnp.eye(k, dtype=logits.dtype)[:, None, :], (k,) + logits.shape)
        jac = jax.vmap(lambda ct: vjp(ct)[0])(cotangents)           # (K, B, ...)
        jac = jnp.moveaxis(jac, 0, 1).reshape(x1.shape[0], k, -1)   # (B, K, D)
        df = logits - _pick(logits, y)[:, None]
        dg = jac - jnp.take_along_axis(jac, y[:, None, None], axis=1)
        dual = jnp.sum(jnp.abs(dg), -1) if norm == 'Linf' else jnp.sqrt(jnp.sum(dg ** 2, -1))
        dist = jnp.abs(df) / (dual + DUAL_EPS)
        dist = jnp.where(jax.nn.one_hot(y, k, dtype=bool), jnp.inf, dist)  # the true class is no boundary
        ind = jnp.argmin(dist, axis=1)
        return _pick(df, ind), jnp.take_along_axis(dg, ind[:, None, None], axis=1)[:, 0].reshape(x1.shape)

    return plane


# --- one run ---------------------------------------------------------------------------------------------------

def fab_start(key: jax.Array, x: jax.Array, eps, norm: str) -> jax.Array:
    """FAB's random start: APGD's (:func:`jaxdiff.robust.apgd.reference_start`) at distance START_SCALE * eps,
    x + (eps / 2) t / ||t|| clipped to [0, 1]. (B, ...) -> (B, ...)."""
    return reference_start(key, x, START_SCALE * jnp.asarray(eps, x.dtype), norm)


def fab_run(logits_fn: LogitsFn, x: jax.Array, y: jax.Array, plane: PlaneFn, x_start: jax.Array, *,
            norm: str = 'Linf', n_iter: int = 100, alpha_max: float = ALPHA_MAX, eta: float = ETA,
            beta: float = BETA) -> RunResult:
    """One FAB run (module docstring, steps 1-4) from ``x_start`` towards the boundary given by ``plane``.
    x, x_start (B, ...) in [0, 1]; y (B,) int. Cost: n_iter linearisations + n_iter forward passes.
    Jittable with n_iter, norm static."""
    b = x.shape[0]
    x0 = x.reshape(b, -1)

    def body(c, _):
        x1, adv, adv_norm = c
        f, grad = plane(x1)
        w = grad.reshape(b, -1)
        x1f = x1.reshape(b, -1)
        offset = jnp.sum(w * x1f, axis=1) - f                # the hyperplane w . z = offset
        d1 = hyperplane_step(x1f, w, offset, norm)
        d2 = hyperplane_step(x0, w, offset, norm)
        a1 = jnp.maximum(lp_norm(d1, norm), MIN_STEP_NORM)
        a2 = jnp.maximum(lp_norm(d2, norm), MIN_STEP_NORM)
        alpha = jnp.clip(a1 / (a1 + a2), 0.0, alpha_max)[:, None]
        x1f = jnp.clip((1.0 - alpha) * (x1f + eta * d1) + alpha * (x0 + eta * d2), 0.0, 1.0)
        x1 = x1f.reshape(x.shape)

        is_adv = jnp.argmax(logits_fn(x1), -1) != y
        dist = lp_norm(x1f - x0, norm)
        better = is_adv & (dist < adv_norm)
        adv = jnp.where(_per_sample(better, x), x1, adv)
        adv_norm = jnp.where(better, dist, adv_norm)
        # Back towards x after a success: the next linearisation starts from the clean side of the boundary.
        x1 = jnp.where(_per_sample(is_adv, x), x + beta * (x1 - x), x1)
        return (x1, adv, adv_norm), None

    init = (x_start, x, jnp.full((b,), NOT_FOUND, x.dtype))
    (_, adv, adv_norm), _ = jax.lax.scan(body, init, None, length=n_iter)
    return RunResult(adv, adv_norm)


# --- restarts and targets --------------------------------------------------------------------------------------

def fab(logits_fn: LogitsFn, x: jax.Array, y: jax.Array, eps, *, key: jax.Array, norm: str = 'Linf',
        targeted: bool = True, n_iter: int = 100, n_restarts: int = 1, n_target_classes: int = 9,
        alpha_max: float = ALPHA_MAX, eta: float = ETA, beta: float = BETA,
        active: Optional[jax.Array] = None) -> FABResult:
    """FAB-T (targeted=True) or FAB (targeted=False) on the samples still robust.

    FAB-T: for each target of :func:`jaxdiff.robust.apgd.target_classes` (2nd, 3rd, ... largest clean logit;
    needs K >= n_target_classes + 1), n_restarts runs; FAB: n_restarts runs on the nearest boundary (K backward
    passes per iteration). The first run of each target starts at x, later ones at :func:`fab_start` (key folded
    with the run index). A run is skipped once every sample has an adversarial point within eps.

    logits_fn: x (B, ...) -> (B, K). x (B, ...) in [0, 1]; y (B,) int; eps scalar or (B,): the success radius and
    the scale of the random starts. active: optional (B,) bool, the samples to attack (AutoAttack passes the
    still-robust ones). AutoAttack's standard FAB-T: targeted, n_iter=100, n_restarts=1, n_target_classes=9.
    Returns :class:`FABResult`. Jittable with norm, targeted, n_iter, n_restarts, n_target_classes static.
    """
    check_norm(norm)
    clean = logits_fn(x)
    clean_correct = jnp.argmax(clean, -1) == y
    active = jnp.ones_like(clean_correct) if active is None else jnp.asarray(active, bool)
    n_runs = n_target_classes * n_restarts if targeted else n_restarts
    targets = target_classes(clean, n_target_classes) if targeted else None
    eps_b = jnp.broadcast_to(jnp.asarray(eps, x.dtype), y.shape)

    def run(j):
        plane = (target_plane(logits_fn, y, targets[j // n_restarts]) if targeted
                 else nearest_plane(logits_fn, y, norm))
        random_start = (j % n_restarts) > 0
        x_start = jnp.where(random_start, fab_start(jax.random.fold_in(key, j), x, eps, norm), x)
        return fab_run(logits_fn, x, y, plane, x_start, norm=norm, n_iter=n_iter, alpha_max=alpha_max,
                       eta=eta, beta=beta)

    def fold(state, res):
        adv, adv_norm, todo = state
        better = todo & (res.adv_norm < adv_norm)
        adv_norm = jnp.where(better, res.adv_norm, adv_norm)
        return (jnp.where(_per_sample(better, x), res.x_adv, adv), adv_norm, todo & ~(adv_norm <= eps_b))

    def step(state, j):
        go = (j == 0) | jnp.any(state[2])
        return jax.lax.cond(go, lambda: fold(state, run(j)), lambda: state), None

    todo = clean_correct & active
    state = (x, jnp.full(y.shape, NOT_FOUND, x.dtype), todo)
    adv, adv_norm, still = jax.lax.scan(step, state, jnp.arange(n_runs))[0]
    robust = still | (clean_correct & ~active)
    return FABResult(adv, robust, adv_norm)
