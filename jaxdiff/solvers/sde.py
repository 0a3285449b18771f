"""Score-SDE samplers (Song et al. 2021; reference yang-song/score_sde ``sampling.py``): Euler-Maruyama on the
reverse SDE, the probability-flow ODE, and predictor-corrector with the Langevin corrector.

Each runs in the SDE's native coordinates:

- VP (beta(t) = beta_min + t (beta_max - beta_min), Song's 0.1 / 20): the scaled variable x_s = s(t) x with
  s = 1/sqrt(1 + sigma(t)^2) = sqrt(abar(t)), sigma(t) = :func:`jaxdiff.schedules.vp_sigma`;
  f(x, t) = -beta(t)/2 x, g(t)^2 = beta(t); prior x_s(1) ~ N(0, I), so x_s = latents.
- VE (Song's geometric sigma(t) = sigma_min (sigma_max/sigma_min)^t, 0.01 / 50): the unscaled x;
  f = 0, g(t)^2 = d sigma^2/dt = 2 sigma(t)^2 ln(sigma_max/sigma_min); prior x = latents * sigma_max.

The denoiser always sees the unscaled x = x_s / s(t) at sigma(t), and the score of the scaled variable is
score_unscaled / s (p_s(x_s) = p(x_s/s) / s^d).

Time grid (as score_sde): num_steps evaluation times t_i = linspace(1, eps_t, num_steps); step i moves
t_i -> t_{i+1}. The last step, at t = eps_t, is the noise removal: it returns Tweedie's x0_hat = D(x, sigma(eps_t))
instead of a noisy step. This is score_sde's ``denoise=True`` (for VE it is exactly the reverse-diffusion step
to sigma = 0; for VP it is the exact version of that step) and uses the last evaluation, so no extra NFE.
eps_t defaults to score_sde's sampling_eps: 1e-3 (VP), 1e-5 (VE).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.denoiser import as_stateful, score_from_x0
from jaxdiff.schedules import song_ve_sigma, vp_beta, vp_scale, vp_sigma
from jaxdiff.solvers._scan import (INTERNAL_DTYPE, check_key, denoise, per_sample_norm, scan_steps, step_noise,
                                   to_steps)
from jaxdiff.solvers.langevin import langevin_update

PREDICTORS = ("euler_maruyama", "reverse_diffusion")
SNR_NORMS = ("batch", "expected")


def _sde_grid(sde: str, num_steps: int, eps_t, beta_min: float, beta_max: float, sigma_min: float,
              sigma_max: float, who: str):
    """Host float64 per-step coefficients (N,) of the chosen SDE and the prior's scale of the latents."""
    if int(num_steps) < 1:
        raise ValueError(f"{who}: num_steps must be >= 1, got {num_steps}")
    if sde == "vp":
        eps_t = 1e-3 if eps_t is None else eps_t
        beta_d = beta_max - beta_min

        def coefs(t):
            sigma = vp_sigma(t, beta_d, beta_min)
            return dict(sigma=sigma, scale=vp_scale(sigma), f=-0.5 * vp_beta(t, beta_d, beta_min),
                        g2=vp_beta(t, beta_d, beta_min))
        init_scale = 1.0
    elif sde == "ve":
        eps_t = 1e-5 if eps_t is None else eps_t
        log_ratio = math.log(sigma_max / sigma_min)

        def coefs(t):
            sigma = song_ve_sigma(t, sigma_min, sigma_max)
            return dict(sigma=sigma, scale=np.ones_like(t), f=np.zeros_like(t), g2=2 * sigma ** 2 * log_ratio)
        init_scale = sigma_max
    else:
        raise ValueError(f"{who}: sde must be 'vp' or 've', got {sde!r}")
    if not 0 < eps_t < 1:
        raise ValueError(f"{who}: eps_t must be in (0, 1), got {eps_t}")
    t = np.linspace(1.0, eps_t, int(num_steps))
    t_next = np.append(t[1:], eps_t)          # the last step is the final denoise; its t_next is unused
    cur, nxt = coefs(t), coefs(t_next)
    grid = dict(cur, dt=t_next - t, last=np.arange(t.shape[0]) == t.shape[0] - 1,
                **{k + "_n": v for k, v in nxt.items()})
    if sde == "vp":
        # Discrete transition t_{i+1} -> t_i of the forward chain: alpha_i = abar(t_i)/abar(t_{i+1}).
        alpha = np.where(grid["last"], 1.0, cur["scale"] ** 2 / nxt["scale"] ** 2)
        grid.update(rd_f=np.sqrt(alpha) - 1.0, rd_g2=1.0 - alpha, lang_alpha=alpha)
    else:
        grid.update(rd_f=np.zeros_like(t), rd_g2=cur["sigma"] ** 2 - nxt["sigma"] ** 2, lang_alpha=np.ones_like(t))
    return grid, init_scale


def _native_score(sd, x, sigma, scale, cond, state):
    """Score of the native variable and x0_hat (unscaled), through the denoiser helpers."""
    xu = x / scale
    x0, state = denoise(sd, xu, sigma, cond, state)
    return score_from_x0(xu, x0, sigma) / scale, x0, state


def _sde_sampler(denoiser, latents, key, cond, grid, init_scale, predictor, n_corrector, snr, who,
                 snr_norm="batch"):
    """Reverse-SDE predictor (+ n_corrector Langevin steps before it) over the grid, as one scan."""
    if snr_norm not in SNR_NORMS:
        raise ValueError(f"{who}: snr_norm must be one of {SNR_NORMS}, got {snr_norm!r}")
    if predictor not in PREDICTORS:
        raise ValueError(f"{who}: predictor must be one of {PREDICTORS}, got {predictor!r}")
    if n_corrector < 0:
        raise ValueError(f"{who}: n_steps (corrector steps) must be >= 0, got {n_corrector}")
    x = jnp.asarray(latents).astype(INTERNAL_DTYPE)
    key = check_key(key, x.shape[0], True, who)
    sd = as_stateful(denoiser)
    x = x * float(init_scale)
    state = sd.init(x / float(grid["scale"][0]))
    draws = n_corrector + 1                  # noise draws per step: correctors first, then the predictor

    def step(carry, s):
        x, state = carry

        def corrector(j, c):
            # Song's Langevin corrector: step = 2 alpha (snr ||z|| / ||score||)^2.
            x, st = c
            score, _, st = _native_score(sd, x, s["sigma"], s["scale"], cond, st)
            z = step_noise(key, s["i"] * draws + j, x)
            if snr_norm == "batch":   # score_sde's code: both norms averaged over the batch
                ratio2 = (snr * jnp.mean(per_sample_norm(z)) / jnp.maximum(jnp.mean(per_sample_norm(score)), 1e-20)) ** 2
            else:   # 'expected': ||z||^2 / ||score||^2 of pure noise at this level = the native noise variance
                ratio2 = snr ** 2 * (s["sigma"] * s["scale"]) ** 2
            return langevin_update(x, score, 2.0 * s["lang_alpha"] * ratio2, z), st

        if n_corrector:
            x, state = jax.lax.fori_loop(0, n_corrector, corrector, (x, state))
        score, x0, state = _native_score(sd, x, s["sigma"], s["scale"], cond, state)
        if predictor == "euler_maruyama":
            mean = x + (s["f"] * x - s["g2"] * score) * s["dt"]
            std = jnp.sqrt(s["g2"] * -s["dt"])
        else:  # reverse diffusion (score_sde): x - f_i + G_i^2 score with the discretised forward chain
            mean = x - s["rd_f"] * x + s["rd_g2"] * score
            std = jnp.sqrt(s["rd_g2"])
        x_new = mean + std * step_noise(key, s["i"] * draws + n_corrector, x)
        return jnp.where(s["last"], x0, x_new), state

    x, _ = scan_steps(step, (x, state), to_steps(**grid))
    return x.astype(jnp.asarray(latents).dtype)


def euler_maruyama_sampler(denoiser, latents, *, key=None, cond=None, sde: str = "vp", num_steps: int = 1000,
                           beta_min: float = 0.1, beta_max: float = 20.0, sigma_min: float = 0.01,
                           sigma_max: float = 50.0, eps_t=None):
    """Euler-Maruyama on the reverse SDE dx = [f - g^2 score] dt + g dW (Song et al. 2021, eq. 6).

    x_{i+1} = x_i + [f(x_i, t_i) - g(t_i)^2 score] dt + g(t_i) sqrt(|dt|) z, dt = t_{i+1} - t_i < 0, in the
    SDE's native coordinates (module docstring); the last step returns x0_hat at t = eps_t.
    latents (B, ...) N(0, I) -> x0 samples (B, ...); key required; num_steps NFE.
    """
    grid, init_scale = _sde_grid(sde, num_steps, eps_t, beta_min, beta_max, sigma_min, sigma_max,
                                 "euler_maruyama_sampler")
    return _sde_sampler(denoiser, latents, key, cond, grid, init_scale, "euler_maruyama", 0, 0.0,
                        "euler_maruyama_sampler")


def pc_sampler(denoiser, latents, *, key=None, cond=None, sde: str = "vp", num_steps: int = 1000,
               snr: float = 0.16, n_steps: int = 1, predictor: str = "reverse_diffusion", snr_norm: str = "batch",
               beta_min: float = 0.1, beta_max: float = 20.0, sigma_min: float = 0.01, sigma_max: float = 50.0,
               eps_t=None):
    """Predictor-corrector sampling (Song et al. 2021, Algorithm 1) with the Langevin corrector.

    At each t_i: ``n_steps`` Langevin corrector steps x <- x + e score + sqrt(2 e) z with
    e = 2 alpha_i (snr ||z|| / ||score||)^2 (alpha_i = 1 for VE, the discrete 1 - beta_i for VP; norms per
    sample), then one predictor step: 'reverse_diffusion' (x - f_i + G_i^2 score + G_i z with the forward
    chain's discretisation: VE G_i^2 = sigma_i^2 - sigma_{i+1}^2, f_i = 0; VP f_i = (sqrt(alpha_i) - 1) x,
    G_i^2 = 1 - alpha_i, alpha_i = abar(t_i)/abar(t_{i+1})) or 'euler_maruyama'. The last predictor returns
    x0_hat at t = eps_t. Draw number i (n_steps + 1) + j is corrector j of step i; + n_steps is the predictor.

    snr_norm: how the corrector's step size is set.
        'batch' (default): score_sde's code, ||z|| and ||score|| averaged over the batch: the reference
            algorithm, but the step then depends on the whole batch, so a sample is not a function of its
            own key alone.
        'expected': the same ratio with the norms replaced by their value for pure noise at this level,
            ||z||^2/||score||^2 = (s(t) sigma(t))^2: a fixed step per level, so each sample depends on its own
            key only (use it for sharded, seed-reproducible sampling). It is smaller than 'batch' near the
            data, where the corrector then does less.
        (Per-sample norms, the literal reading of the paper, make the step x-dependent and bias the
        stationary law: +13% std on a 16-D Gaussian at snr 0.16, divergent in 2-D; not offered.)
    latents (B, ...) N(0, I) -> x0 samples (B, ...); key required; num_steps (n_steps + 1) NFE.
    """
    grid, init_scale = _sde_grid(sde, num_steps, eps_t, beta_min, beta_max, sigma_min, sigma_max, "pc_sampler")
    return _sde_sampler(denoiser, latents, key, cond, grid, init_scale, predictor, int(n_steps), float(snr),
                        "pc_sampler", snr_norm)


def probability_flow_sampler(denoiser, latents, *, key=None, cond=None, sde: str = "vp", num_steps: int = 100,
                             beta_min: float = 0.1, beta_max: float = 20.0, sigma_min: float = 0.01,
                             sigma_max: float = 50.0, eps_t=None):
    """Probability-flow ODE dx = [f - g^2/2 score] dt (Song et al. 2021, eq. 13), fixed-step Heun.

    Heun (explicit trapezoid, 2nd order) on the uniform t grid from 1 to eps_t, in native coordinates; the last
    step returns x0_hat at eps_t (score_sde's ODE sampler also ends with this denoising step; it uses adaptive
    RK45 where we use fixed steps so the run is one scan). Deterministic: key is unused and may be None.
    latents (B, ...) N(0, I) -> x0 samples (B, ...); 2 num_steps - 1 NFE.
    """
    who = "probability_flow_sampler"
    grid, init_scale = _sde_grid(sde, num_steps, eps_t, beta_min, beta_max, sigma_min, sigma_max, who)
    x = jnp.asarray(latents).astype(INTERNAL_DTYPE)
    check_key(key, x.shape[0], False, who)
    sd = as_stateful(denoiser)
    x = x * float(init_scale)
    state = sd.init(x / float(grid["scale"][0]))

    def drift(x, s, suffix, state):
        score, x0, state = _native_score(sd, x, s["sigma" + suffix], s["scale" + suffix], cond, state)
        return s["f" + suffix] * x - 0.5 * s["g2" + suffix] * score, x0, state

    def step(carry, s):
        x, state = carry
        v, x0, state = drift(x, s, "", state)

        def heun(operand):
            x, st = operand
            v_next, _, st = drift(x + v * s["dt"], s, "_n", st)
            return x + 0.5 * (v + v_next) * s["dt"], st

        # The last step is the denoise: no evaluation at t_next there.
        return jax.lax.cond(s["last"], lambda operand: (x0, operand[1]), heun, (x, state))

    x, _ = scan_steps(step, (x, state), to_steps(**grid))
    return x.astype(jnp.asarray(latents).dtype)
