"""Which noise level and which step every denoiser evaluation of a sampler run has, found by running the sampler
once on a stand-in denoiser (a 1-sample latent; the stand-in returns zeros, so nothing is computed).

A Heun step evaluates D twice (at sigma_hat_i, then the correction at sigma_{i+1}); the next step's first evaluation
is again at sigma_{i+1}. So the step of an evaluation is not a function of its sigma, and a transform that must use
one setting per step (the guidance interval, as its reference code decides per step) reads it from this plan: the
k-th evaluation of the run belongs to step ``steps[k]``, whose first evaluation was at ``step_sigmas[k]``.
Steps are the iterations of :func:`jaxdiff.solvers._scan.scan_steps`, which every sampler runs on; an evaluation
after the last step (e.g. Langevin's final denoising) belongs to the last one.
"""
from __future__ import annotations

import contextlib
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.solvers import _scan


class EvaluationPlan(NamedTuple):
    """sigmas (K,): each evaluation's noise level, in call order; steps (K,): its step index; step_sigmas (K,):
    the noise level of the first evaluation of its step (sigma_hat_i for EDM's Heun: sigma_i without churn)."""
    sigmas: np.ndarray
    steps: np.ndarray
    step_sigmas: np.ndarray

    def grid(self) -> np.ndarray:
        """The distinct positive noise levels, decreasing, then 0 (N+1,)."""
        levels = np.unique(self.sigmas[self.sigmas > 0])[::-1]
        return np.concatenate([levels, [0.0]])


@contextlib.contextmanager
def _listening(listener: Callable):
    _scan.STEP_LISTENERS.append(listener)
    try:
        yield
    finally:
        _scan.STEP_LISTENERS.remove(listener)


def evaluation_plan(sampler: Callable) -> EvaluationPlan:
    """The :class:`EvaluationPlan` of ``sampler(denoiser, latents (B, D), keys (B,), cond)`` (a sampler with its
    options bound, as :func:`jaxdiff.sampling.options.make_solver` returns)."""
    events: list[tuple[str, float]] = []

    def stand_in(x, sigma, cond=None):
        jax.debug.callback(lambda s: events.append(('eval', float(np.ravel(s)[0]))), sigma, ordered=True)
        return jnp.zeros_like(x)

    with _listening(lambda i: events.append(('step', int(i)))):
        jax.block_until_ready(sampler(stand_in, jnp.zeros((1, 1)), jax.random.key(0)[None], None))
    jax.effects_barrier()
    sigmas, steps, step_sigmas = [], [], []
    step, first = 0, None
    for kind, value in events:
        if kind == 'step':
            step, first = int(value), None
            continue
        first = value if first is None else first
        sigmas.append(value)
        steps.append(step)
        step_sigmas.append(first)
    return EvaluationPlan(np.asarray(sigmas, np.float64), np.asarray(steps, np.int32),
                          np.asarray(step_sigmas, np.float64))
