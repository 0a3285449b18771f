"""What CFG and autoguidance share: D = D_ref + w (D_main - D_ref), optionally only inside a guidance interval,
with the extra network evaluations skipped outside it, and the conditions of one network stacked into one call.

Guidance interval (Kynkäänniemi et al. 2024, "Applying guidance in a limited interval improves sample and
distribution quality in diffusion models"; code: kynkaat/guidance-interval): guide only at noise levels in
(lo, hi]; elsewhere the transform returns the main (conditional) denoiser alone and does not evaluate the reference
(``lax.cond``), so the evaluations per image drop. Two forms:

- **the reference code's** (:class:`GuidanceInterval` with ``step_sigmas``, what sample.py builds): the decision is
  made once per solver step, on the step's first noise level (sigma_hat_i; sigma_i without churn), so both
  evaluations of a Heun step use one weight, as the reference switches the denoiser per step index. The step of
  each evaluation comes from the solver's :class:`jaxdiff.solvers.plan.EvaluationPlan`; the transform counts its
  evaluations (its state) to know which one it is.
- **the paper's** w(sigma) (``step_sigmas=None``): each evaluation is judged by its own sigma, so a Heun step whose
  correction lands on the interval's edge mixes weights. Stateless.

Batched conditions: the evaluations of one network under several conditions (CFG's conditional, unconditional and
negative rows) run as one call on the stacked batch (n x B rows), as fast implementations do on accelerators. The
separate-call path remains where the inner denoiser is not a model but another transform's output
(:func:`jaxdiff.transforms.base.is_transformed`): a stateful one holds state for B rows, and a stateless one may read
the condition (attribute switching replaces it but keeps None unconditional, which a stacked zero row is not) or
close over per-sample arrays; and on request (``batched=False``: a model too large for n x B rows). Put CFG first in
a chain to have it batched.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.denoiser import AnyDenoiser, StatefulDenoiser, expand_sigma, per_sample_sigma, sigma_grid, with_sigma_grid
from jaxdiff.transforms.base import Call, Transform, is_transformed, threaded, transformed

# guided(call, x, sigma, cond, batched) -> (guided x0_hat, main x0_hat): the guided output and the main
# denoiser's own output (which it computes anyway), so samples outside the interval take the latter.
Guided = Callable[[Call, jax.Array, jax.Array, Any, bool], tuple[jax.Array, jax.Array]]


class GuidanceInterval(NamedTuple):
    """Guide only for noise levels in (lo, hi].

    step_sigmas: None (each evaluation judged by its own sigma: the paper's form) or (K,) the sampler's
        :attr:`jaxdiff.solvers.plan.EvaluationPlan.step_sigmas` (evaluation k guided iff lo < step_sigmas[k] <= hi:
        the reference code's one decision per step). Evaluations beyond K (another sampler) use the last entry.
    """
    lo: float
    hi: float
    step_sigmas: Optional[np.ndarray] = None

    def inside(self, sigma) -> jax.Array:
        """Whether sigma (any shape) lies in (lo, hi]."""
        return (sigma > self.lo) & (sigma <= self.hi)


def evaluations_per_image(step_sigmas: np.ndarray, guided: bool = True,
                          interval: Optional[tuple[float, float]] = None) -> float:
    """Network evaluations per image of a sampler run whose plan has ``step_sigmas`` (K,) (one per evaluation): K,
    plus one for every evaluation where CFG or autoguidance runs (all of them, or those inside ``interval``)."""
    steps = np.asarray(step_sigmas, np.float64)
    if not guided:
        return float(len(steps))
    inside = np.ones(len(steps), bool) if interval is None else GuidanceInterval(*interval).inside(steps)
    return float(len(steps) + inside.sum())


def parse_interval(text: Any) -> tuple[float, float]:
    """'0.28:2.9' (or a (lo, hi) pair) -> (0.28, 2.9); ValueError unless 0 <= lo < hi."""
    try:
        lo, hi = (float(v) for v in (text.split(':') if isinstance(text, str) else text))
    except (TypeError, ValueError):
        raise ValueError(f'interval={text!r}: expected LO:HI noise levels, e.g. 0.28:2.9') from None
    if not 0 <= lo < hi:
        raise ValueError(f'interval={text!r}: needs 0 <= LO < HI')
    return lo, hi


def evaluate_conditions(call: Call, x: jax.Array, sigma, conds: Sequence[Any], batched: bool) -> list[jax.Array]:
    """[D(x, sigma, c) for c in conds] (each (B, ...)): one call on the stacked batch (len(conds) x B rows) when
    ``batched``, else one call each. A None condition is stacked as zeros shaped like the others (the networks'
    and mixtures' "unconditional"); with every condition None there is nothing to stack."""
    present = [c for c in conds if c is not None]
    if not batched or len(conds) == 1 or not present:
        return [call(x, sigma, c) for c in conds]
    like = present[0]
    full = [jax.tree.map(jnp.zeros_like, like) if c is None else c for c in conds]
    n, b = len(conds), x.shape[0]
    stacked = call(jnp.concatenate([x] * n), jnp.tile(per_sample_sigma(sigma, x), n),
                   jax.tree.map(lambda *leaves: jnp.concatenate(leaves), *full))
    return [stacked[i * b:(i + 1) * b] for i in range(n)]


def guided_transform(guided: Guided, interval: Optional[GuidanceInterval] = None, batched: bool = True
                     ) -> Transform:
    """A transform evaluating ``guided`` (see :data:`Guided`), inside ``interval`` only when one is given.

    Outside the interval the inner denoiser is called once (the main model alone); when some samples of a batch are
    inside and some outside (per-sample sigmas that differ), the guided branch runs and each sample takes its own.
    A stateful inner denoiser is threaded through whichever branch runs and is never given stacked batches.
    Shapes: x (B, ...), sigma () or (B,), cond the inner denoiser's; the output is (B, ...).
    """

    def transform(inner: AnyDenoiser) -> AnyDenoiser:
        sd = inner if isinstance(inner, StatefulDenoiser) else None
        stack = batched and not is_transformed(inner)

        def run(fn, x, sigma, cond, inner_state):
            if sd is None:
                return fn(inner, x, sigma, cond), inner_state
            call, final = threaded(sd, inner_state)
            out = fn(call, x, sigma, cond)
            return out, final()

        def guided_only(call, x, sigma, cond):
            return guided(call, x, sigma, cond, stack)[0]

        def evaluate(x, sigma, cond, on, inner_state):
            def both(state):
                (g, main), state = run(lambda *a: guided(*a, stack), x, sigma, cond, state)
                return jnp.where(expand_sigma(on, g), g, main), state

            def main_only(state):
                return run(lambda call, *a: call(*a), x, sigma, cond, state)

            return jax.lax.cond(jnp.any(on), both, main_only, inner_state)

        if interval is None:
            if sd is None:
                return transformed(with_sigma_grid(lambda x, sigma, cond=None: guided_only(inner, x, sigma, cond),
                                                   sigma_grid(inner)))
            return StatefulDenoiser(sd.init, lambda x, sigma, cond, state: run(guided_only, x, sigma, cond, state))

        if interval.step_sigmas is None:
            def by_sigma(x, sigma, cond, inner_state):
                return evaluate(x, sigma, cond, interval.inside(per_sample_sigma(sigma, x)), inner_state)

            if sd is None:
                return transformed(with_sigma_grid(lambda x, sigma, cond=None: by_sigma(x, sigma, cond, None)[0],
                                                   sigma_grid(inner)))
            return StatefulDenoiser(sd.init, by_sigma)

        table = jnp.asarray(interval.inside(np.asarray(interval.step_sigmas, np.float64)))

        def init(x):
            return jnp.int32(0), (sd.init(x) if sd else None)

        def by_step(x, sigma, cond, state):
            k, inner_state = state
            on = jnp.broadcast_to(table[jnp.minimum(k, table.shape[0] - 1)], x.shape[:1])
            out, inner_state = evaluate(x, sigma, cond, on, inner_state)
            return out, (k + 1, inner_state)

        return StatefulDenoiser(init, by_step)

    return transform
