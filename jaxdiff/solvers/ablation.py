"""EDM's generalised ablation sampler (Karras et al. 2022, Algorithm 1 with Table 1's choices; NVlabs/edm
``generate.py: ablation_sampler``): every deterministic/stochastic sampler of the paper's Section 3 in one.

Time t, noise sigma(t) and scaling s(t) are chosen separately. The scaled sample is x = s(t) * (x0 + sigma(t) n),
whose probability-flow ODE is

    dx/dt = (sigma'(t)/sigma(t) + s'(t)/s(t)) x - sigma'(t) s(t)/sigma(t) * D(x / s(t), sigma(t)).

- discretization (the sigma_i): 'vp' (t uniform from 1 to epsilon_s through the VP sigma), 've' (geometric),
  'iddpm' (evenly by index through iDDPM's u_j inside [sigma_min, sigma_max]), 'edm' (Karras, rho);
  each is rounded with the denoiser's sigma grid if it declares one (``net.round_sigma``), then t_i = sigma^-1.
- schedule sigma(t): 'vp' (beta_d, beta_min refitted so sigma(epsilon_s) = sigma_min, sigma(1) = sigma_max),
  've' (sqrt t), 'linear' (t).  scaling s(t): 'vp' (1/sqrt(1 + sigma^2)) or 'none' (1).
- ode_solver: 'euler' or 'heun' (2nd order through t' = t_hat + alpha h, weights 1 - 1/(2 alpha), 1/(2 alpha);
  never on the last step). Churn: gamma_i = min(S_churn/N, sqrt2 - 1) where S_min <= sigma(t_i) <= S_max,
  t_hat = sigma^-1(round(sigma(t_i)(1 + gamma_i))), x_hat = s(t_hat)/s(t_i) x_i
  + sqrt(max(sigma(t_hat)^2 - sigma(t_i)^2, 0)) s(t_hat) S_noise eps.

The reference names the ODE method ``solver``; here it is ``ode_solver``, since sample.py's ``--solver`` picks
the sampler. :data:`PRESETS` holds Table 1's four columns (VP, VE, iDDPM + DDIM, EDM).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import schedules
from jaxdiff.denoiser import as_stateful, sigma_grid
from jaxdiff.solvers._scan import INTERNAL_DTYPE, check_key, denoise, scan_steps, step_noise
from jaxdiff.solvers.edm import round_positive_to_grid

ODE_SOLVERS = ('euler', 'heun')                 # ode_solver: 1st order, or 2nd order through t' (alpha)
DISCRETIZATIONS = ('vp', 've', 'iddpm', 'edm')   # discretization: how the sigma_i are spaced
SCHEDULES = ('vp', 've', 'linear')               # schedule: sigma(t)
SCALINGS = ('vp', 'none')                        # scaling: s(t)

# EDM Table 1's samplers as ablation_sampler keywords ("original sampler" of each baseline, and EDM's own).
PRESETS = {
    'vp': dict(ode_solver='euler', discretization='vp', schedule='vp', scaling='vp'),
    've': dict(ode_solver='euler', discretization='ve', schedule='ve', scaling='none'),
    'iddpm': dict(ode_solver='euler', discretization='iddpm', schedule='linear', scaling='none'),
    'edm': dict(ode_solver='heun', discretization='edm', schedule='linear', scaling='none'),
}


def default_sigma_range(discretization: str, epsilon_s: float = 1e-3) -> tuple[float, float]:
    """(sigma_min, sigma_max) the reference uses when none is given, by discretization:
    vp (sigma_VP(epsilon_s), sigma_VP(1)) with beta_d = 19.9, beta_min = 0.1; ve (0.02, 100);
    iddpm (0.002, 81); edm (0.002, 80)."""
    _check_choice('discretization', discretization, DISCRETIZATIONS)
    if discretization == 'vp':
        return float(schedules.vp_sigma(float(epsilon_s), 19.9, 0.1)), float(schedules.vp_sigma(1.0, 19.9, 0.1))
    return {'ve': (0.02, 100.0), 'iddpm': (0.002, 81.0), 'edm': (0.002, 80.0)}[discretization]


class AblationPlan(NamedTuple):
    """Everything :func:`ablation_sampler` computes on the host, ready for :func:`run_plan`.

    start:  () float64, sigma(t_0) s(t_0): the first x is latents * start.
    steps:  {name: (N,) array}, per step i: ratio = s(t_hat)/s(t_i), noise_std, h = t_{i+1} - t_hat,
            alpha_h = alpha h, w_prime = 1/(2 alpha), and at t_hat / t_prime: inv_s (1/s), sig (sigma),
            a (sigma'/sigma + s'/s), b (sigma' s/sigma) as ``*_hat`` / ``*_prime``; correct (bool, Heun here).
    heun:   whether any step takes the 2nd-order correction (static: Euler plans never trace it).
    stochastic: whether any step injects noise (static: a key is then required).
    """

    start: np.ndarray
    steps: dict
    heun: bool
    stochastic: bool


def ablation_plan(*, num_steps: int = 18, sigma_min: Optional[float] = None, sigma_max: Optional[float] = None,
                  rho: float = 7.0, ode_solver: str = 'heun', discretization: str = 'edm', schedule: str = 'linear',
                  scaling: str = 'none', epsilon_s: float = 1e-3, C_1: float = 0.001, C_2: float = 0.008,
                  M: int = 1000, alpha: float = 1.0, S_churn: float = 0.0, S_min: float = 0.0,
                  S_max: float = float('inf'), S_noise: float = 1.0, sigma_grid=None) -> AblationPlan:
    """The host half of :func:`ablation_sampler` (same keywords; see it and the module docstring).

    sigma_grid: (K,) the denoiser's discrete sigmas or None; it clips sigma_min / sigma_max to its positive
    range and rounds the sigma grid and each sigma_hat onto it. Returns an :class:`AblationPlan` (float64).
    """
    who = 'ablation_sampler'
    _check_choice('ode_solver', ode_solver, ODE_SOLVERS)
    _check_choice('discretization', discretization, DISCRETIZATIONS)
    _check_choice('schedule', schedule, SCHEDULES)
    _check_choice('scaling', scaling, SCALINGS)
    n = int(num_steps)
    if n < 1:
        raise ValueError(f'{who}: num_steps must be >= 1, got {num_steps}')
    if not alpha > 0:
        raise ValueError(f'{who}: alpha must be > 0 (1 = Heun), got {alpha}')
    lo, hi = default_sigma_range(discretization, epsilon_s)
    sigma_min = lo if sigma_min is None else float(sigma_min)
    sigma_max = hi if sigma_max is None else float(sigma_max)
    if sigma_grid is not None:   # the reference's max(sigma_min, net.sigma_min), min(sigma_max, net.sigma_max)
        g_lo, g_hi = schedules.grid_sigma_range(sigma_grid)
        sigma_min, sigma_max = max(sigma_min, g_lo), min(sigma_max, g_hi)
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f'{who}: need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}')
    beta_d, beta_min = schedules.vp_betas_from_range(sigma_min, sigma_max, epsilon_s)

    # Noise levels of the discretization, (N,) float64.
    if discretization == 'vp':
        sigma_steps = schedules.vp_sigmas(n, epsilon_s, beta_d, beta_min)[:-1]
    elif discretization == 've':
        sigma_steps = schedules.ve_sigmas(n, sigma_min, sigma_max)[:-1]
    elif discretization == 'iddpm':
        # float64 u with float32 alpha-bar ratios, as the reference computes it (schedules.iddpm_u).
        sigma_steps = schedules.iddpm_sigmas(n, sigma_min, sigma_max, M, C_1, C_2, alpha_bar_dtype=np.float32)[:-1]
    else:
        sigma_steps = schedules.karras_sigmas(n, sigma_min, sigma_max, rho)[:-1]
    sig_fn, dsig_fn, inv_fn = _schedule(schedule, beta_d, beta_min)
    rnd = (lambda s: s) if sigma_grid is None else (lambda s: round_positive_to_grid(s, sigma_grid, who))
    t_steps = np.append(inv_fn(rnd(sigma_steps)), 0.0)   # t_N = 0

    with np.errstate(divide='ignore', invalid='ignore'):
        t_cur, t_next = t_steps[:-1], t_steps[1:]
        sig_cur = sig_fn(t_cur)
        gamma = np.where((S_min <= sig_cur) & (sig_cur <= S_max), min(S_churn / n, math.sqrt(2) - 1), 0.0)
        t_hat = inv_fn(rnd(sig_cur + gamma * sig_cur))
        sig_hat = sig_fn(t_hat)
        noise_std = np.sqrt(np.maximum(sig_hat ** 2 - sig_cur ** 2, 0.0)) * _scale(scaling, sig_hat) * S_noise
        # Where gamma = 0 the reference's noise term is a float64 round-trip residue (t_hat ~ t_cur): exactly 0 here.
        noise_std = np.where(gamma > 0, noise_std, 0.0)
        h = t_next - t_hat
        t_prime = t_hat + alpha * h
        hat = _drift_coeffs(t_hat, sig_fn, dsig_fn, scaling)
        prime = _drift_coeffs(t_prime, sig_fn, dsig_fn, scaling)
    correct = np.full(n, ode_solver == 'heun') & (np.arange(n) < n - 1)   # never on the last step
    if not (np.all(np.isfinite(np.stack(hat))) and np.all(np.isfinite(np.stack(prime))[:, correct])):
        raise ValueError(f'{who}: non-finite sigma(t) on this grid ({discretization} / {schedule} / {scaling}, '
                         f'alpha={alpha}); check sigma_min / sigma_max / epsilon_s')
    prime = tuple(np.where(correct, c, 1.0) for c in prime)   # unused entries: finite placeholders
    sig0 = sig_fn(t_steps[:1])
    steps = dict(ratio=_scale(scaling, sig_hat) / _scale(scaling, sig_cur), noise_std=noise_std, h=h,
                 alpha_h=alpha * h, w_prime=np.full(n, 1.0 / (2.0 * alpha)), correct=correct)
    for name, hat_c, prime_c in zip(('inv_s', 'sig', 'a', 'b'), hat, prime):
        steps[name + '_hat'], steps[name + '_prime'] = hat_c, prime_c
    return AblationPlan(start=np.float64(sig0[0] * _scale(scaling, sig0)[0]), steps=steps,
                        heun=bool(correct.any()), stochastic=bool(np.any(noise_std > 0)))


def run_plan(denoiser, latents, plan: AblationPlan, *, key=None, cond=None):
    """The traced half of :func:`ablation_sampler`: one ``lax.scan`` over ``plan.steps``.

    plan.start and plan.steps may be arrays or tracers (a jitted caller can pass them as arguments, so plans of
    one length share one compilation); plan.heun / plan.stochastic are static. latents (B, ...) -> (B, ...).
    """
    x = jnp.asarray(latents).astype(INTERNAL_DTYPE)
    key = check_key(key, x.shape[0], plan.stochastic, 'ablation_sampler')
    steps = {k: jnp.asarray(v) if k == 'correct' else jnp.asarray(v, INTERNAL_DTYPE) for k, v in plan.steps.items()}
    sd = as_stateful(denoiser)
    x = x * jnp.asarray(plan.start, INTERNAL_DTYPE)
    state = sd.init(x)

    def drift(x, st, at, state):
        x0, state = denoise(sd, x * st['inv_s_' + at], st['sig_' + at], cond, state)
        return st['a_' + at] * x - st['b_' + at] * x0, state

    def step(carry, st):
        x, state = carry
        x_hat = st['ratio'] * x
        if plan.stochastic:
            x_hat = x_hat + st['noise_std'] * step_noise(key, st['i'], x)
        d_cur, state = drift(x_hat, st, 'hat', state)
        x_euler = x_hat + st['h'] * d_cur
        if not plan.heun:
            return x_euler, state

        def heun(operand):
            d_prime, st_out = drift(x_hat + st['alpha_h'] * d_cur, st, 'prime', operand[1])
            w = st['w_prime']
            return x_hat + st['h'] * ((1.0 - w) * d_cur + w * d_prime), st_out

        # lax.cond on a host-precomputed flag: the last step is Euler (the reference's i == num_steps - 1).
        return jax.lax.cond(st['correct'], heun, lambda operand: operand, (x_euler, state))

    x, _ = scan_steps(step, (x, state), steps)
    return x.astype(jnp.asarray(latents).dtype)


def ablation_sampler(denoiser, latents, *, key=None, cond=None, num_steps: int = 18,
                     sigma_min: Optional[float] = None, sigma_max: Optional[float] = None, rho: float = 7.0,
                     ode_solver: str = 'heun', discretization: str = 'edm', schedule: str = 'linear',
                     scaling: str = 'none', epsilon_s: float = 1e-3, C_1: float = 0.001, C_2: float = 0.008,
                     M: int = 1000, alpha: float = 1.0, S_churn: float = 0.0, S_min: float = 0.0,
                     S_max: float = float('inf'), S_noise: float = 1.0):
    """EDM's ablation sampler (see the module docstring for the formulas).

    denoiser: D(x, sigma, cond) -> x0_hat or a StatefulDenoiser; a GridDenoiser (iDDPM) has its grid and
              sigma_hat rounded onto its sigma grid and sigma_min / sigma_max clipped to the grid's range.
    latents:  (B, ...) N(0, I); the start is latents * sigma(t_0) * s(t_0).
    key:      None, one PRNG key or (B,) per-sample keys; required when churn injects noise.
    num_steps: N (int); sigma_min / sigma_max: None = :func:`default_sigma_range` of the discretization.
    rho: EDM grid exponent; epsilon_s: last t of the VP grid (and of the VP refit); C_1, C_2, M: iDDPM grid.
    ode_solver / discretization / schedule / scaling: see the module docstring and :data:`PRESETS`.
    alpha: Heun's intermediate point t' = t_hat + alpha (t_next - t_hat), alpha > 0 (1 = Heun).
    S_churn, S_min, S_max, S_noise: EDM's churn, S_min / S_max compared with sigma(t_i).
    Returns x0 samples (B, ...) in latents.dtype. NFE: 2N - 1 (heun) or N (euler).
    """
    plan = ablation_plan(num_steps=num_steps, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho,
                         ode_solver=ode_solver, discretization=discretization, schedule=schedule, scaling=scaling,
                         epsilon_s=epsilon_s, C_1=C_1, C_2=C_2, M=M, alpha=alpha, S_churn=S_churn, S_min=S_min,
                         S_max=S_max, S_noise=S_noise, sigma_grid=sigma_grid(denoiser))
    return run_plan(denoiser, latents, plan, key=key, cond=cond)


def _check_choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f'ablation_sampler: {name} must be one of {", ".join(allowed)}; got {value!r}')


def _schedule(schedule: str, beta_d: float, beta_min: float):
    """(sigma(t), sigma'(t), sigma^-1) as host float64 functions of (N,) arrays."""
    if schedule == 'vp':
        return (lambda t: schedules.vp_sigma(t, beta_d, beta_min),
                lambda t: schedules.vp_sigma_deriv(t, beta_d, beta_min),
                lambda s: schedules.vp_sigma_inv(s, beta_d, beta_min))
    if schedule == 've':
        return schedules.ve_sigma, schedules.ve_sigma_deriv, schedules.ve_sigma_inv
    return (lambda t: np.asarray(t, np.float64), lambda t: np.ones_like(np.asarray(t, np.float64)),
            lambda s: np.asarray(s, np.float64))


def _scale(scaling: str, sigma: np.ndarray) -> np.ndarray:
    """s(t) from sigma(t): 1/sqrt(1 + sigma^2) (vp) or 1 (none)."""
    return schedules.vp_scale(sigma) if scaling == 'vp' else np.ones_like(sigma)


def _drift_coeffs(t, sig_fn, dsig_fn, scaling):
    """(1/s, sigma, a, b) at times t (N,) with dx/dt = a x - b D(x/s, sigma): a = sigma'/sigma + s'/s,
    b = sigma' s / sigma (host float64, so the large VP terms cancel before the cast to float32)."""
    sig, dsig = sig_fn(t), dsig_fn(t)
    s = _scale(scaling, sig)
    ds = schedules.vp_scale_deriv(sig, dsig) if scaling == 'vp' else np.zeros_like(sig)
    return 1.0 / s, sig, dsig / sig + ds / s, dsig * s / sig
