"""DDIM (Song, Meng & Ermon 2021) and ancestral DDPM (Ho et al. 2020) in EDM's unscaled variables.

Derivation. In VP-scaled variables x_s = a x with a = 1/sqrt(1 + sigma^2) (a^2 = abar), DDIM's step from
sigma to sigma' is

    x_s' = a' x0_hat + sqrt(1 - a'^2 - c_s^2) eps_hat + c_s z,
    c_s  = eta sqrt((1 - a'^2) / (1 - a^2)) sqrt(1 - a^2 / a'^2),

with eps_hat = (x - x0_hat) / sigma (the same in both variables). Dividing by a' and using
(1 - a'^2)/a'^2 = sigma'^2 gives, with c = c_s / a',

    x' = x0_hat + sqrt(sigma'^2 - c^2) eps_hat + c z,   c = eta sigma' sqrt(sigma^2 - sigma'^2) / sigma.

eta = 0 is x' = x0_hat + sigma'/sigma (x - x0_hat), i.e. one Euler step of dx/dsigma = (x - x0_hat)/sigma.
eta = 1 gives c_s^2 = (1 - abar')/(1 - abar) beta with beta = 1 - abar/abar', DDPM's posterior variance
beta-tilde, and the mean sigma'^2/sigma eps_hat + x0_hat is DDPM's (x_t - beta/sqrt(1 - abar) eps)/sqrt(alpha)
divided by a': ancestral DDPM *is* DDIM with eta = 1, so both run through :func:`_ddim_like` below.

Start: DDPM's prior is x_T ~ N(0, I) in scaled units, i.e. x = latents * sqrt(1 + sigma_0^2) unscaled.
We start there (not at latents * sigma_0, EDM's choice) so these samplers reproduce DDPM/DDIM exactly; the
two differ by a factor 1 + O(1/sigma_0^2) (2e-5 relative for the DDPM grid's sigma_0 = 157).
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxdiff.denoiser import as_stateful, eps_from_x0
from jaxdiff.schedules import ddpm_sigmas
from jaxdiff.solvers._scan import INTERNAL_DTYPE, check_key, check_sigmas, denoise, scan_steps, step_noise, to_steps


def _ddim_coefs(sig: np.ndarray, eta: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-step (mean coefficient of eps_hat, noise std) of the unscaled DDIM update; (N,) each."""
    s, s_next = sig[:-1], sig[1:]
    c = eta * s_next * np.sqrt(s ** 2 - s_next ** 2) / s
    return np.sqrt(np.maximum(s_next ** 2 - c ** 2, 0.0)), c


def _ddim_like(denoiser, latents, sig, mean_coef, noise_std, key, cond, who):
    """x' = x0_hat + mean_coef_i * eps_hat + noise_std_i * z over the grid, as one scan."""
    stochastic = bool(np.any(noise_std > 0))
    x = jnp.asarray(latents).astype(INTERNAL_DTYPE)
    key = check_key(key, x.shape[0], stochastic, who)
    sd = as_stateful(denoiser)
    x = x * float(np.sqrt(1.0 + sig[0] ** 2))  # DDPM's scaled prior N(0, I) in unscaled units (module docstring)
    state = sd.init(x)
    xs = to_steps(sigma=sig[:-1], mean_coef=mean_coef, noise_std=noise_std)

    def step(carry, s):
        x, state = carry
        x0, state = denoise(sd, x, s["sigma"], cond, state)
        x = x0 + s["mean_coef"] * eps_from_x0(x, x0, s["sigma"])
        if stochastic:
            x = x + s["noise_std"] * step_noise(key, s["i"], x)
        return x, state

    x, _ = scan_steps(step, (x, state), xs)
    return x.astype(jnp.asarray(latents).dtype)


def ddim_sampler(denoiser, latents, *, key=None, cond=None, sigmas=None, num_steps: int = 50, eta: float = 0.0):
    """DDIM (Song, Meng & Ermon 2021, eq. 12) in EDM's unscaled variables.

    x' = x0_hat + sqrt(sigma'^2 - c^2) eps_hat + c z, c = eta sigma' sqrt(sigma^2 - sigma'^2)/sigma
    (derivation in the module docstring). eta = 0: deterministic DDIM, equal to Euler on the PF-ODE;
    eta = 1: ancestral DDPM with the posterior variance beta-tilde.

    latents: (B, ...) N(0, I); start x = latents * sqrt(1 + sigma_0^2) (DDPM's scaled N(0, I) prior).
    sigmas:  (N+1,) decreasing grid ending in 0; default ``schedules.ddpm_sigmas(num_steps)`` (num_steps evenly
             spaced timesteps of the linear-beta DDPM, T = 1000).
    key:     required when eta > 0 (None, one key or (B,) per-sample keys).
    Returns x0 samples (B, ...); N NFE; the last step (sigma' = 0) returns x0_hat.
    """
    sig = ddpm_sigmas(num_steps) if sigmas is None else check_sigmas(sigmas, "ddim_sampler")
    if eta < 0:
        raise ValueError(f"ddim_sampler: eta must be >= 0, got {eta}")
    mean_coef, noise_std = _ddim_coefs(sig, float(eta))
    return _ddim_like(denoiser, latents, sig, mean_coef, noise_std, key, cond, "ddim_sampler")


def ddpm_sampler(denoiser, latents, *, key=None, cond=None, sigmas=None, num_steps: int = 1000,
                 variance: str = "beta_tilde"):
    """Ancestral DDPM (Ho et al. 2020, Algorithm 2) in EDM's unscaled variables.

    Scaled form: x_{t-1} = (x_t - beta_t / sqrt(1 - abar_t) eps_hat) / sqrt(alpha_t) + sigma_t z, with
    alpha_t = abar_t / abar_{t-1} between consecutive grid points (so strided grids are DDPM on the
    sub-sequence) and sigma_t^2 = beta-tilde = (1 - abar_{t-1})/(1 - abar_t) beta_t (``variance='beta_tilde'``,
    identical to DDIM with eta = 1) or beta_t (``variance='beta'``). As in DDPM no noise is added on the last
    step, which therefore returns x0_hat.

    latents: (B, ...) N(0, I); start x = latents * sqrt(1 + sigma_0^2) (x_T = latents in scaled units).
    sigmas:  (N+1,) grid ending in 0; default ``schedules.ddpm_sigmas(num_steps)``; num_steps = 1000 visits
             every DDPM timestep.
    key:     required (None raises).
    Returns x0 samples (B, ...); N NFE.
    """
    sig = ddpm_sigmas(num_steps) if sigmas is None else check_sigmas(sigmas, "ddpm_sampler")
    mean_coef, noise_std = _ddim_coefs(sig, 1.0)
    if variance == "beta":
        s, s_next = sig[:-1], sig[1:]
        # beta_t = 1 - abar_t/abar_{t-1}, as a std in unscaled units (divide by a' = 1/sqrt(1 + sigma'^2)).
        noise_std = np.sqrt((s ** 2 - s_next ** 2) / (1 + s ** 2) * (1 + s_next ** 2))
        noise_std = np.where(s_next > 0, noise_std, 0.0)  # DDPM: z = 0 at t = 1
    elif variance != "beta_tilde":
        raise ValueError(f"ddpm_sampler: variance must be 'beta_tilde' or 'beta', got {variance!r}")
    if key is None:
        raise ValueError("ddpm_sampler: ancestral sampling draws noise, so it needs key=jax.random.key(seed) "
                         "or a (B,) array of per-sample keys; got key=None")
    return _ddim_like(denoiser, latents, sig, mean_coef, noise_std, key, cond, "ddpm_sampler")
