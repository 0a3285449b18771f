"""DiffPure (Nie et al. 2022; reference NVlabs/DiffPure ``runners/diffpure_sde.py``): diffuse the input a little,
run the reverse process back to clean data, classify the result.

VP time t* -> EDM sigma*. DiffPure works with Song's VP SDE (beta_min = 0.1, beta_max = 20) and diffuses to
t* (0.1 for CIFAR-10 Linf): x_vp = sqrt(abar) x + sqrt(1 - abar) n with abar(t) = exp(-beta_d t^2 / 2 - beta_min t),
beta_d = 19.9. EDM's unscaled variable is x_vp / sqrt(abar) = x + sigma n with

    sigma(t) = sqrt(1/abar - 1) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)   (:func:`jaxdiff.schedules.vp_sigma`),

so t* = 0.1 is sigma* = 0.3402 in the model's [-1, 1] data space. (The reference uses the discrete abar of
step t = 100 of its 1000-step chain, sigma = 0.3388; the continuous value is used here.)

Why the unscaled (variance-exploding) form. Dividing the VP SDE by its scale s(t) = sqrt(abar(t)) turns it into
dx = sqrt(d sigma^2 / dt) dW, a VE SDE with noise level sigma(t); the reverse SDE transforms the same way. So
DiffPure's reverse VP SDE and the reverse VE SDE in x = x_vp / s have the same paths up to the factor s(t), which
is 1 at t = 0: purifying in EDM's variables, with the repository's denoiser D(x, sigma, cond) and its solvers, is
DiffPure's procedure, discretised differently.

Procedure (all in [-1, 1]): x = 2 x01 - 1; x* = x + sigma* n; reverse process on the grid
sigma_i = sigma(t_i), t_i uniform from t* down to 0 (the reference's uniform time steps, dt = t*/num_steps);
return (x_0 + 1) / 2.

- ``solver='sde'``: the reverse SDE by ancestral steps (:func:`jaxdiff.solvers.ddpm_sampler` on that grid):
  x' = D + (sigma'^2/sigma^2)(x - D) + sigma' sqrt(1 - sigma'^2/sigma^2) z. The reference integrates with
  Euler-Maruyama (torchsde 'euler', dt = 1e-3, 100 steps for t* = 0.1); ancestral steps are another discretisation
  of the same reverse SDE, chosen because each step is the exact transition when the posterior is a point mass
  (and, for Gaussian data, keeps the output mean exact), so the small step counts an attack can afford to
  differentiate through stay accurate; Euler-Maruyama overshoots on the last steps, where sigma_{i+1} << sigma_i.
  The last step (sigma' = 0) returns D, where the reference stops at t = 1e-5 (sigma = 1e-3) instead.
- ``solver='ode'``: the probability-flow ODE with EDM's Heun steps (:func:`jaxdiff.solvers.heun_sampler`,
  deterministic given the forward noise), DiffPure's ODE variant (which uses Euler, dt = 1e-3).

Attacks differentiate through everything (full backprop through the solver's scan). The denoiser is wrapped in
``jax.checkpoint`` by default, so backprop stores each step's input rather than the network's activations.
Randomness (forward noise and solver noise) makes the purified classifier stochastic: attack it with
:func:`eot_logits_fn` (expectation over transformation).
"""
from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.denoiser import StatefulDenoiser
from jaxdiff.robust.smoothing import is_per_sample_key, normal_like
from jaxdiff.schedules import VP_BETA_D, VP_BETA_MIN, vp_sigma
from jaxdiff.solvers import ddpm_sampler, heun_sampler

SOLVERS = ("sde", "ode")

# A stochastic classifier f(x (B, H, W, C) in [0, 1], key) -> logits (B, K).
KeyedLogitsFn = Callable[[jax.Array, jax.Array], jax.Array]


def vp_time_to_sigma(t_star: float, beta_d: float = VP_BETA_D, beta_min: float = VP_BETA_MIN) -> float:
    """EDM noise level of VP time t*: sqrt(exp(beta_d t*^2 / 2 + beta_min t*) - 1) (0.3402 for t* = 0.1)."""
    return float(vp_sigma(np.float64(t_star), beta_d, beta_min))


def purification_sigmas(t_star: float, num_steps: int, beta_d: float = VP_BETA_D,
                        beta_min: float = VP_BETA_MIN) -> np.ndarray:
    """The reverse grid (num_steps + 1,) float64: sigma(t_i) for t_i uniform from t* down to 0 (last entry 0)."""
    if not 0.0 < t_star <= 1.0:
        raise ValueError(f"diffpure: t_star must be in (0, 1] (VP time; DiffPure uses 0.1), got {t_star}")
    if int(num_steps) < 1:
        raise ValueError(f"diffpure: num_steps must be >= 1, got {num_steps}")
    return vp_sigma(np.linspace(float(t_star), 0.0, int(num_steps) + 1), beta_d, beta_min)


def _split(key):
    """Two independent keys (forward noise, solver) of the same form as key (one key or (B,) keys)."""
    if is_per_sample_key(key):
        pair = jax.vmap(jax.random.split)(key)
        return pair[:, 0], pair[:, 1]
    pair = jax.random.split(key)
    return pair[0], pair[1]


def _fold_in(key, j):
    return jax.vmap(lambda k: jax.random.fold_in(k, j))(key) if is_per_sample_key(key) else jax.random.fold_in(key, j)


def diffpure(denoiser, x01: jax.Array, t_star: float, key, *, num_steps: int, solver: str = "sde", cond=None,
             remat: bool = True, beta_d: float = VP_BETA_D, beta_min: float = VP_BETA_MIN) -> jax.Array:
    """Purify x01 (B, H, W, C) in [0, 1]: diffuse to VP time t_star, solve the reverse process back to sigma = 0.

    denoiser: D(x, sigma, cond) -> x0_hat in EDM's [-1, 1] data space (a plain callable or StatefulDenoiser).
    t_star: VP diffusion time (Python float, static; 0.1 = DiffPure's CIFAR-10 Linf setting).
    key: one key or (B,) per-sample keys; split into the forward-noise key and the solver's key.
    num_steps: reverse steps (static); NFE num_steps ('sde') or 2 num_steps - 1 ('ode').
    solver: 'sde' (ancestral reverse SDE) or 'ode' (Heun on the probability-flow ODE); module docstring.
    remat: wrap a plain denoiser in jax.checkpoint (memory for backprop; no effect on values).
    Returns (B, H, W, C) in [0, 1] up to the denoiser's overshoot (not clipped, as in the reference, so no
    gradient is cut). Differentiable in x01; jits once for fixed shapes and static arguments.
    """
    if solver not in SOLVERS:
        raise ValueError(f"diffpure: solver must be one of {SOLVERS}, got {solver!r}")
    sig = purification_sigmas(t_star, num_steps, beta_d, beta_min)
    if remat and not isinstance(denoiser, StatefulDenoiser):
        denoiser = jax.checkpoint(denoiser)
    x = 2.0 * jnp.asarray(x01) - 1.0
    k_noise, k_solve = _split(key)
    noisy = x + float(sig[0]) * normal_like(k_noise, x)
    # The samplers start from latents times their own prior scale; dividing by it makes the start exactly x*.
    if solver == "sde":
        out = ddpm_sampler(denoiser, noisy / math.sqrt(1.0 + sig[0] ** 2), key=k_solve, cond=cond, sigmas=sig)
    else:
        out = heun_sampler(denoiser, noisy / float(sig[0]), sig, cond=cond)
    return (out + 1.0) / 2.0


def purified_classifier(denoiser, logits_fn: Callable[[jax.Array], jax.Array], t_star: float, num_steps: int, *,
                        solver: str = "sde", cond=None, remat: bool = True) -> KeyedLogitsFn:
    """DiffPure's defended classifier: ``f(x, key) = logits_fn(diffpure(denoiser, x, t_star, key, ...))``.

    logits_fn: x (B, H, W, C) in [0, 1] -> (B, K). Returns f(x (B, H, W, C), key) -> logits (B, K), stochastic in
    key; wrap with :func:`eot_logits_fn` for the attacks' ``logits_fn(x)`` form.
    """
    def classify(x, key):
        return logits_fn(diffpure(denoiser, x, t_star, key, num_steps=num_steps, solver=solver, cond=cond,
                                  remat=remat))
    return classify


def eot_logits_fn(classifier: KeyedLogitsFn, key, n_eot: int) -> Callable[[jax.Array], jax.Array]:
    """Expectation over transformation: ``logits_fn(x) = mean_j classifier(x, fold_in(key, j))``, j < n_eot.

    classifier: f(x, key) -> (B, K), e.g. :func:`purified_classifier`. key: one key or (B,) per-sample keys,
    fixed inside the returned function, so it is a deterministic function of x that the attacks in
    :mod:`jaxdiff.robust` accept (``pgd.pgd(eot_logits_fn(f, key, 20), x, y, eps, ...)``).
    The n_eot draws run in sequence (``lax.map``) to keep memory at one draw's. The gradient of the mean logits
    is the mean of the draws' logit gradients; for a loss on top, this is EOT on the averaged logits, whereas
    the reference's AutoAttack-rand averages the loss gradients (the two agree to first order).
    Returns logits_fn(x (B, ...)) -> (B, K).
    """
    if int(n_eot) < 1:
        raise ValueError(f"eot_logits_fn: n_eot must be >= 1, got {n_eot}")

    def logits_fn(x):
        draws = jax.lax.map(lambda j: classifier(x, _fold_in(key, j)), jnp.arange(int(n_eot)))
        return jnp.mean(draws, axis=0)
    return logits_fn
