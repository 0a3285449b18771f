"""Square Attack (Andriushchenko et al. 2020), a score-based black-box attack, Linf and L2, step for step as
fra31/auto-attack (``square.SquareAttack``) with AutoAttack's settings (n_queries = 5000, p_init = 0.8, one run,
margin loss, schedule not rescaled).

Per sample, with margin m(z) = z_y - max_{j != y} z_j (positive while classified correctly):

- start (one query): Linf: x + eps * s, s in {-1, +1} drawn per column and channel ("vertical stripes": the same
  sign down a whole column of the image), clipped to [0, 1]. L2 (:func:`l2_init`): the image is tiled by windows
  of side h // 5 (the tiling centred), each filled with the L2 pattern :func:`l2_window` (randomly transposed)
  times a random sign per channel, the whole rescaled to L2 norm eps and clipped to [0, 1].
- iteration i (one query): the window side s follows the fraction p = :func:`p_selection` (i) of the image's
  pixels: s = round(sqrt(p h w)) (Linf: at least 1; L2: at least 3 and odd), at most min(h, w); the window's
  corner is uniform over the positions {0 .. h - s - 1} x {0 .. w - s - 1} (as the reference draws it).
  Linf: inside the window, add 2 eps times a random sign per channel to the best point, project back into the
  ball and [0, 1]. L2 (:func:`l2_proposal`): a second window of the same size is drawn; the perturbation in the
  first window is replaced by (its own direction + a fresh random-sign :func:`l2_window`), rescaled per channel
  so that it takes the L2 mass of both windows plus an equal share of the room left in the eps-ball; the second
  window is zeroed; the whole is rescaled to norm eps and clipped to [0, 1].
- acceptance: the proposal replaces the best point when its loss is strictly lower (loss = margin, or -CE) or
  when it is misclassified (margin <= 0); otherwise it is discarded. Points with margin <= 0 (fooled) or not
  ``active`` are not updated any more. So the best margin of a point never increases.

Deviations from the reference, all deliberate:
- Windows, signs and the random transposes are drawn per sample, as in the original Square Attack code; the
  AutoAttack reference draws one window (and one sign per channel) per iteration for the whole batch. Per-sample
  draws make a sample's attack independent of the rest of the batch; the distribution per sample is the same.
- Static shapes: every iteration computes on the whole batch (``lax.scan`` of n_queries steps); an iteration is
  skipped (``lax.cond``) once no sample is left to fool, where the reference breaks out of its loop.
- The L2 start crops windows at the image border; the reference fails for sizes where the tiling overruns it
  (e.g. h = 12) and divides by zero for h < 5 (then the window side here is 1).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.robust import losses
from jaxdiff.robust.pgd import LogitsFn, _per_sample, check_norm, lp_norm, normalize

# Constants of the reference (square.SquareAttack and AutoAttack's settings for it).
N_QUERIES = 5000
P_INIT = 0.8
# p_selection: p = p_init / 2^(k+1) once the iteration count exceeds the k-th breakpoint (p_init up to 10).
P_BREAKPOINTS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)
NORM_EPS = 1e-12  # added to norms before dividing, as the reference does

SQUARE_LOSSES = ('margin', 'ce')


class SquareResult(NamedTuple):
    """x_adv (B, ...): the best point (lowest loss; the first misclassified one once found); x itself for samples
    misclassified on x or not ``active``. robust (B,) bool: clean prediction correct and, if attacked, never
    fooled. margin (B,): z_y - max_{j != y} z_j at x_adv. n_queries (B,) int: queries spent on the sample (the
    start counts one). margin_trace: (n_queries, B), the best margin after each iteration, or None."""
    x_adv: jax.Array
    robust: jax.Array
    margin: jax.Array
    n_queries: jax.Array
    margin_trace: Optional[jax.Array]


# --- schedule and window sizes (static Python) ---------------------------------------------------------------

def p_selection(it: int, n_queries: int = N_QUERIES, p_init: float = P_INIT, rescale: bool = False) -> float:
    """Fraction of the image's pixels a window covers at iteration ``it`` (0-based): p_init for it <= 10, then
    halved after each of the breakpoints 10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000 (strictly greater).
    rescale: stretch the schedule to n_queries, it -> int(it / n_queries * 10000) (the reference's default;
    AutoAttack turns it off, so with 5000 queries the last breakpoints are never reached)."""
    if rescale:
        it = int(it / n_queries * 10000)
    halvings = sum(it > bp for bp in P_BREAKPOINTS)
    return p_init / 2 ** halvings


def window_side(p: float, h: int, w: int, norm: str) -> int:
    """Side of the square window for pixel fraction p on an h x w image: round(sqrt(p h w)) (Python's round, as
    the reference), at least 1 for Linf and at least 3 and odd for L2, at most min(h, w)."""
    s = int(round(math.sqrt(p * h * w)))
    if norm == 'Linf':
        s = max(s, 1)
    else:
        s = max(s, 3)
        s += 1 - s % 2
    return min(s, min(h, w))


def _rectangles(nx: int, ny: int) -> np.ndarray:
    """Concentric rectangles around the centre of an nx x ny block, ring k weighted 1 / (k + 1)^2, unit L2 norm."""
    out = np.zeros((nx, ny))
    r0, r1 = nx // 2, ny // 2
    for k in range(max(nx // 2 + 1, ny // 2 + 1)):
        out[max(r0, 0):min(r0 + 2 * k + 1, nx), max(r1, 0):min(r1 + 2 * k + 1, ny)] += 1.0 / (k + 1) ** 2
        r0, r1 = r0 - 1, r1 - 1
    n = np.sqrt(np.sum(out ** 2))
    return out / n if n > 0 else out


def l2_window(s: int) -> np.ndarray:
    """Square Attack's L2 window pattern (s, s): the top half concentric rectangles, the bottom half the same with
    the opposite sign (so the window sums to about zero and changes the image's mean little), unit L2 norm."""
    out = np.concatenate([_rectangles(s // 2, s), -_rectangles(s - s // 2, s)], axis=0)
    return out / np.sqrt(np.sum(out ** 2))


def _schedule(n_queries: int, p_init: float, rescale: bool, h: int, w: int, norm: str):
    """Static per-iteration window sides (n_queries,) int, the distinct sides, and each iteration's index into
    them."""
    sides = np.array([window_side(p_selection(i, n_queries, p_init, rescale), h, w, norm)
                      for i in range(n_queries)], np.int32)
    distinct, level = np.unique(sides, return_inverse=True)
    return sides, distinct, level.astype(np.int32)


# --- per-sample windows (traced) -------------------------------------------------------------------------------

def _corner(key: jax.Array, b: int, size: int, s) -> jax.Array:
    """Window corner per sample, floor(U (size - s)): uniform over {0 .. size - s - 1}, 0 when s == size."""
    return jnp.floor(jax.random.uniform(key, (b,)) * (size - s)).astype(jnp.int32)


def _window_mask(vh: jax.Array, vw: jax.Array, s, h: int, w: int) -> jax.Array:
    """(B, H, W, 1) bool: the s x s window with corner (vh, vw) per sample."""
    rows = jnp.arange(h)[None, :, None]
    cols = jnp.arange(w)[None, None, :]
    inside = ((rows >= vh[:, None, None]) & (rows < vh[:, None, None] + s)
              & (cols >= vw[:, None, None]) & (cols < vw[:, None, None] + s))
    return inside[..., None]


def _place(table: jax.Array, vh: jax.Array, vw: jax.Array, transpose: jax.Array, h: int, w: int) -> jax.Array:
    """Place a padded (S, S) pattern with its corner at (vh, vw) per sample, transposed where ``transpose``.
    -> (B, H, W, 1); values outside the pattern's support are the table's zero padding, so mask afterwards."""
    big = table.shape[0] - 1
    i = jnp.clip(jnp.arange(h)[None, :, None] - vh[:, None, None], 0, big)
    j = jnp.clip(jnp.arange(w)[None, None, :] - vw[:, None, None], 0, big)
    t = transpose[:, None, None]
    return table[jnp.where(t, j, i), jnp.where(t, i, j)][..., None]


def _margin(logits: jax.Array, y: jax.Array) -> jax.Array:
    """z_y - max_{j != y} z_j: the reference's margin, > 0 while classified correctly. (B, K) -> (B,)."""
    return -losses.margin(logits, y)


# --- starts ----------------------------------------------------------------------------------------------------

def linf_init(key: jax.Array, x: jax.Array, eps) -> jax.Array:
    """Vertical stripes: x + eps * sign drawn per (sample, column, channel), clipped to [0, 1]. (B, H, W, C)."""
    b, _, w, c = x.shape
    stripes = jax.random.rademacher(key, (b, 1, w, c), x.dtype)
    return jnp.clip(x + _per_sample(eps, x) * stripes, 0.0, 1.0)


def l2_init(key: jax.Array, x: jax.Array, eps) -> jax.Array:
    """The tiling start (module docstring): windows of side max(h // 5, 1) from offset (h - 5 s) // 2, each the
    :func:`l2_window` pattern, transposed with probability 1/2, times a random sign per channel; rescaled to L2
    norm eps, clipped to [0, 1]. (B, H, W, C) -> (B, H, W, C)."""
    b, h, w, c = x.shape
    s = max(h // 5, 1)
    start = (h - 5 * s) // 2
    pattern = l2_window(s)
    placed, placed_t = [], []
    for r in range(h // s):
        for q in range(w // s):
            for dest, pat in ((placed, pattern), (placed_t, pattern.T)):
                canvas = np.zeros((h + s, w + s))  # room for windows that overrun the border (cropped below)
                r0, c0 = start + r * s, start + q * s
                canvas[r0:r0 + s, c0:c0 + s] = pat
                dest.append(canvas[:h, :w])
    placed, placed_t = jnp.asarray(np.stack(placed), x.dtype), jnp.asarray(np.stack(placed_t), x.dtype)
    n_win = placed.shape[0]
    ks, kt = jax.random.split(key)
    signs = jax.random.rademacher(ks, (b, n_win, c), x.dtype)
    flip = jax.random.bernoulli(kt, 0.5, (b, n_win, 1)).astype(x.dtype)
    delta = (jnp.einsum('khw,bkc->bhwc', placed, signs * (1.0 - flip))
             + jnp.einsum('khw,bkc->bhwc', placed_t, signs * flip))
    return jnp.clip(x + _per_sample(eps, x) * normalize(delta, 'L2'), 0.0, 1.0)


# --- proposals -------------------------------------------------------------------------------------------------

def linf_proposal(key: jax.Array, x: jax.Array, x_best: jax.Array, eps, s) -> jax.Array:
    """Linf step: the s x s window (random corner per sample) of the best point moves by 2 eps times a random sign
    per channel, then back into the eps-ball and [0, 1]. (B, H, W, C) -> (B, H, W, C); s may be traced."""
    b, h, w, c = x.shape
    kh, kw, ks = jax.random.split(key, 3)
    mask = _window_mask(_corner(kh, b, h, s), _corner(kw, b, w, s), s, h, w)
    e = _per_sample(eps, x)
    sign = jax.random.rademacher(ks, (b, 1, 1, c), x.dtype)
    x_new = jnp.clip(x_best + mask * 2.0 * e * sign, x - e, x + e)
    return jnp.clip(x_new, 0.0, 1.0)


def l2_proposal(key: jax.Array, x: jax.Array, x_best: jax.Array, eps, s, table: jax.Array) -> jax.Array:
    """L2 step (module docstring). table: the padded :func:`l2_window` pattern of side s, (S, S) with S >= s.
    (B, H, W, C) -> (B, H, W, C); s may be traced."""
    b, h, w, c = x.shape
    k1h, k1w, k2h, k2w, ks, kt = jax.random.split(key, 6)
    vh, vw = _corner(k1h, b, h, s), _corner(k1w, b, w, s)
    win1 = _window_mask(vh, vw, s, h, w)
    win2 = _window_mask(_corner(k2h, b, h, s), _corner(k2w, b, w, s), s, h, w)
    delta = x_best - x

    def channel_norm(v):  # per sample and channel, over the pixels: (B, 1, 1, C)
        return jnp.sqrt(jnp.sum(v ** 2, axis=(1, 2), keepdims=True))

    norm_image = _per_sample(lp_norm(delta, 'L2'), x)
    norm_windows = channel_norm(delta * (win1 | win2))
    old = delta * win1 / (NORM_EPS + channel_norm(delta * win1))
    sign = jax.random.rademacher(ks, (b, 1, 1, c), x.dtype)
    fresh = _place(table, vh, vw, jax.random.bernoulli(kt, 0.5, (b,)), h, w) * win1 * sign
    new = fresh + old
    # The window takes the mass of both windows (the second is emptied) plus a 1/C share per channel of the
    # room left in the ball.
    e = _per_sample(eps, x)
    target = jnp.sqrt(jnp.maximum(e ** 2 - norm_image ** 2, 0.0) / c + norm_windows ** 2)
    new = new / (NORM_EPS + channel_norm(new)) * target
    delta = jnp.where(win1, new, jnp.where(win2, 0.0, delta))
    return jnp.clip(x + e * normalize(delta, 'L2'), 0.0, 1.0)


# --- the attack ------------------------------------------------------------------------------------------------

def square(logits_fn: LogitsFn, x: jax.Array, y: jax.Array, eps, *, key: jax.Array, norm: str = 'Linf',
           n_queries: int = N_QUERIES, p_init: float = P_INIT, rescale_schedule: bool = False,
           loss: str = 'margin', active: Optional[jax.Array] = None, trace: bool = False) -> SquareResult:
    """Square Attack (module docstring), one run of n_queries iterations on the samples still robust.

    logits_fn: x (B, H, W, C) -> (B, K) (only its outputs are used). x in [0, 1]; y (B,) int; eps scalar or (B,).
    key: the start uses fold_in(key, n_queries), iteration i fold_in(key, i). loss: 'margin' (AutoAttack) or 'ce'
    (accept when the cross-entropy increases). rescale_schedule: see :func:`p_selection` (AutoAttack: False).
    active: optional (B,) bool, the samples to attack. trace: also return the best margin after every iteration.
    Returns :class:`SquareResult`. Jittable with norm, n_queries, p_init, rescale_schedule, loss, trace static.
    Cost: n_queries + 2 forward passes (the clean one included).
    """
    check_norm(norm)
    if loss not in SQUARE_LOSSES:
        raise ValueError(f'loss must be one of {SQUARE_LOSSES}, got {loss!r}.')
    if x.ndim != 4:
        raise ValueError(f'square needs images (B, H, W, C), got shape {x.shape}; reshape flat inputs to '
                         '(B, H, W, C) (the windows are squares of pixels).')
    b, h, w, c = x.shape
    sides, distinct, level = _schedule(n_queries, p_init, rescale_schedule, h, w, norm)
    side = int(distinct.max())
    tables = np.zeros((len(distinct), side, side))
    if norm == 'L2':
        for i, s in enumerate(distinct):
            tables[i, :s, :s] = l2_window(int(s))
    tables = jnp.asarray(tables, x.dtype)

    def scores(z):
        logits = logits_fn(z)
        m = _margin(logits, y)
        return m, (m if loss == 'margin' else -losses.cross_entropy(logits, y))

    clean_correct = jnp.argmax(logits_fn(x), -1) == y
    active = jnp.ones_like(clean_correct) if active is None else jnp.asarray(active, bool)
    attacked = clean_correct & active
    start_key = jax.random.fold_in(key, n_queries)  # distinct from the iterations' fold_in(key, i), i < n_queries
    x_best = linf_init(start_key, x, eps) if norm == 'Linf' else l2_init(start_key, x, eps)
    x_best = jnp.where(_per_sample(attacked, x), x_best, x)
    margin_best, loss_best = scores(x_best)
    queries = attacked.astype(jnp.int32)

    def iterate(carry, inputs):
        it, s, lvl = inputs
        x_best, margin_best, loss_best, queries = carry
        todo = attacked & (margin_best > 0)

        def propose():
            k = jax.random.fold_in(key, it)
            if norm == 'Linf':
                x_new = linf_proposal(k, x, x_best, eps, s)
            else:
                x_new = l2_proposal(k, x, x_best, eps, s, tables[lvl])
            margin, loss_new = scores(x_new)
            better = todo & (loss_new < loss_best)
            accept = better | (todo & (margin <= 0))  # a misclassified proposal is kept even if its loss is not
            return (jnp.where(_per_sample(accept, x), x_new, x_best), jnp.where(accept, margin, margin_best),
                    jnp.where(better, loss_new, loss_best), queries + todo.astype(jnp.int32))

        carry = jax.lax.cond(jnp.any(todo), propose, lambda: carry)
        return carry, (carry[1] if trace else None)

    xs = (jnp.arange(n_queries), jnp.asarray(sides), jnp.asarray(level))
    (x_best, margin_best, _, queries), margin_trace = jax.lax.scan(
        iterate, (x_best, margin_best, loss_best, queries), xs)
    x_adv = jnp.where(_per_sample(attacked, x), x_best, x)
    robust = clean_correct & ~(attacked & (margin_best <= 0))
    return SquareResult(x_adv, robust, margin_best, queries, margin_trace)
