"""DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Algorithm 2), data-prediction form.

With lambda = -log sigma and h_i = lambda_{i+1} - lambda_i, one multistep update is

    x_{i+1} = (sigma_{i+1}/sigma_i) x_i - expm1(-h_i) D_i',
    D_i'    = (1 + 1/(2 r_i)) D_i - 1/(2 r_i) D_{i-1},   r_i = h_{i-1} / h_i,

first-order (D_i' = D_i) on the first step and on a step to sigma = 0, where it returns x0_hat exactly
(k-diffusion's ``sample_dpmpp_2m``). Note -expm1(-h_i) = 1 - sigma_{i+1}/sigma_i.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxdiff.denoiser import as_stateful
from jaxdiff.schedules import karras_sigmas
from jaxdiff.solvers._scan import INTERNAL_DTYPE, check_key, check_sigmas, denoise, scan_steps, to_steps


def dpm_solver_pp_2m_sampler(denoiser, latents, *, key=None, cond=None, sigmas=None, num_steps: int = 20,
                             sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0):
    """DPM-Solver++(2M) (Lu et al. 2022), deterministic, N NFE.

    latents: (B, ...) N(0, I); start x = latents * sigma_0.
    sigmas:  (N+1,) decreasing grid; default ``karras_sigmas(num_steps, sigma_min, sigma_max, rho)``.
    key:     unused (deterministic); accepted for a uniform signature.
    Returns x0 samples (B, ...).
    """
    sig = karras_sigmas(num_steps, sigma_min, sigma_max, rho) if sigmas is None else check_sigmas(
        sigmas, "dpm_solver_pp_2m_sampler")
    x = jnp.asarray(latents).astype(INTERNAL_DTYPE)
    check_key(key, x.shape[0], False, "dpm_solver_pp_2m_sampler")
    s, s_next = sig[:-1], sig[1:]
    ratio = s_next / s
    # w_i = 1/(2 r_i) on 2nd-order steps (i >= 1 and sigma_{i+1} > 0), else 0 (first order). Computed
    # where defined only: h is infinite on a step to sigma = 0.
    second = (np.arange(s.shape[0]) >= 1) & (s_next > 0)
    h = np.log(s[second]) - np.log(s_next[second])                 # lambda_{i+1} - lambda_i
    h_last = np.log(sig[:-2][second[1:]]) - np.log(s[second])      # lambda_i - lambda_{i-1}
    w = np.zeros_like(s)
    w[second] = h / (2.0 * h_last)

    sd = as_stateful(denoiser)
    x = x * float(sig[0])
    state = sd.init(x)
    xs = to_steps(sigma=s, ratio=ratio, w=w)

    def step(carry, st):
        x, state, x0_prev = carry
        x0, state = denoise(sd, x, st["sigma"], cond, state)
        x0_d = (1.0 + st["w"]) * x0 - st["w"] * x0_prev
        x = st["ratio"] * x + (1.0 - st["ratio"]) * x0_d
        return x, state, x0

    x, _, _ = scan_steps(step, (x, state, jnp.zeros_like(x)), xs)
    return x.astype(jnp.asarray(latents).dtype)
