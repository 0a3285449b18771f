"""Noise-level (sigma) grids and the sigma(t) parametrisations of EDM, VP, VE and iDDPM.

Everything here works in EDM's unscaled convention: a noisy sample is ``x = x0 + sigma * n`` with
``n ~ N(0, I)``. The VP process's scaled variable is ``s(t) * x`` with ``s(t) = 1 / sqrt(1 + sigma(t)^2)``.
Grids are returned in decreasing order with a final 0 appended (``num_steps + 1`` entries), the layout
every solver in :mod:`jaxdiff.solvers` consumes.
"""
from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

# Constants of the EDM reference (Karras et al. 2022, Table 1 and the reference code).
SIGMA_DATA = 0.5
VP_BETA_D = 19.9
VP_BETA_MIN = 0.1
VP_EPSILON_T = 1e-5
VP_M = 1000
VE_SIGMA_MIN = 0.02
VE_SIGMA_MAX = 100.0
IDDPM_C1 = 0.001
IDDPM_C2 = 0.008
IDDPM_M = 1000
DDPM_T = 1000           # ADM / DiT: discrete timesteps of the 'linear' beta schedule


def append_zero(sigmas: np.ndarray) -> np.ndarray:
    """(N,) -> (N+1,): the grid with sigma_N = 0 appended (the last step lands on the data)."""
    return np.concatenate([np.asarray(sigmas, np.float64), np.zeros(1)])


def karras_sigmas(num_steps: int = 18, sigma_min: float = 0.002, sigma_max: float = 80.0,
                  rho: float = 7.0) -> np.ndarray:
    """EDM's grid, (num_steps + 1,) float64, decreasing, last entry 0.

    sigma_i = (sigma_max^(1/rho) + i/(N-1) * (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, i < N.
    """
    _check_steps(num_steps)
    i = np.arange(num_steps, dtype=np.float64)
    inv = 1.0 / rho
    ramp = i / max(num_steps - 1, 1)
    sig = (sigma_max ** inv + ramp * (sigma_min ** inv - sigma_max ** inv)) ** rho
    return append_zero(sig)


def vp_sigma(t, beta_d: float = VP_BETA_D, beta_min: float = VP_BETA_MIN):
    """VP sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1); t in [epsilon_t, 1], any shape."""
    xp = _xp(t)
    return xp.sqrt(xp.expm1(0.5 * beta_d * t ** 2 + beta_min * t))


def vp_sigma_inv(sigma, beta_d: float = VP_BETA_D, beta_min: float = VP_BETA_MIN):
    """Inverse of :func:`vp_sigma`: t(sigma) = (sqrt(beta_min^2 + 2 beta_d ln(1+sigma^2)) - beta_min) / beta_d."""
    xp = _xp(sigma)
    return (xp.sqrt(beta_min ** 2 + 2 * beta_d * xp.log1p(sigma ** 2)) - beta_min) / beta_d


def vp_sigma_deriv(t, beta_d: float = VP_BETA_D, beta_min: float = VP_BETA_MIN):
    """d sigma / dt of the VP schedule: (beta_min + beta_d t)/2 * (sigma + 1/sigma)."""
    s = vp_sigma(t, beta_d, beta_min)
    return 0.5 * (beta_min + beta_d * t) * (s + 1 / s)


def vp_beta(t, beta_d: float = VP_BETA_D, beta_min: float = VP_BETA_MIN):
    """Instantaneous VP rate beta(t) = beta_min + beta_d t (Song's beta_min=0.1, beta_max=20 gives beta_d=19.9)."""
    return beta_min + beta_d * t


def vp_scale(sigma):
    """VP scaling s = 1/sqrt(1 + sigma^2): the scaled sample is s * x (EDM's unscaled x)."""
    xp = _xp(sigma)
    return 1.0 / xp.sqrt(1.0 + sigma ** 2)


def vp_sigmas(num_steps: int = 18, epsilon_s: float = 1e-3, beta_d: float = VP_BETA_D,
              beta_min: float = VP_BETA_MIN) -> np.ndarray:
    """Song et al.'s VP grid: t uniform from 1 down to epsilon_s, sigma = vp_sigma(t); (num_steps+1,)."""
    _check_steps(num_steps)
    t = 1.0 + np.arange(num_steps) / max(num_steps - 1, 1) * (epsilon_s - 1.0)
    return append_zero(vp_sigma(t, beta_d, beta_min))


def ddpm_alpha_bar(T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    """DDPM's discrete abar_t = prod_{s<=t} (1 - beta_s), t = 1..T, betas linear in [beta_start, beta_end]; (T,)."""
    return np.cumprod(1.0 - np.linspace(beta_start, beta_end, T, dtype=np.float64))


def ddpm_sigmas(num_steps: int = 50, T: int = 1000, beta_start: float = 1e-4,
                beta_end: float = 0.02) -> np.ndarray:
    """DDPM/DDIM grid: ``num_steps`` evenly spaced timesteps of the linear-beta DDPM, as EDM sigmas
    sigma_t = sqrt((1 - abar_t) / abar_t), from t = T down to t = 1; (num_steps+1,)."""
    _check_steps(num_steps)
    abar = ddpm_alpha_bar(T, beta_start, beta_end)
    t = np.round(np.linspace(T - 1, 0, num_steps)).astype(np.int64)
    return append_zero(np.sqrt((1.0 - abar[t]) / abar[t]))


def ve_sigma(t):
    """EDM's VE parametrisation sigma(t) = sqrt(t) (t is the variance)."""
    xp = _xp(t)
    return xp.sqrt(t)


def ve_sigma_inv(sigma):
    """Inverse of :func:`ve_sigma`: t = sigma^2."""
    return sigma ** 2


def song_ve_sigma(t, sigma_min: float = VE_SIGMA_MIN, sigma_max: float = VE_SIGMA_MAX):
    """Song et al.'s geometric VE schedule sigma(t) = sigma_min (sigma_max / sigma_min)^t, t in [0, 1], any shape."""
    return sigma_min * (sigma_max / sigma_min) ** t


def ve_sigmas(num_steps: int = 18, sigma_min: float = VE_SIGMA_MIN,
              sigma_max: float = VE_SIGMA_MAX) -> np.ndarray:
    """Song et al.'s VE grid: geometric from sigma_max to sigma_min; (num_steps+1,)."""
    _check_steps(num_steps)
    ramp = np.arange(num_steps) / max(num_steps - 1, 1)
    return append_zero(song_ve_sigma(1.0 - ramp, sigma_min, sigma_max))


def iddpm_alpha_bar(j, M: int = IDDPM_M, C_2: float = IDDPM_C2):
    """Improved-DDPM cosine alpha-bar at discrete index j in [0, M]: sin^2(pi/2 * j / M / (C_2 + 1))."""
    return np.sin(0.5 * np.pi * np.asarray(j, np.float64) / M / (C_2 + 1)) ** 2


def iddpm_u(M: int = IDDPM_M, C_1: float = IDDPM_C1, C_2: float = IDDPM_C2, dtype=np.float64,
            alpha_bar_dtype=None) -> np.ndarray:
    """The M+1 discrete sigmas of iDDPM, u_M = 0 < u_{M-1} < ... < u_0, as a float64 (M+1,) array.

    u_{j-1} = sqrt((u_j^2 + 1) / max(abar(j-1)/abar(j), C_1) - 1), as in the EDM reference.
    dtype: the recursion's arithmetic; alpha_bar_dtype: that of abar and its ratios (default: dtype). The
    reference evaluates this in three precisions, which differ by up to ~5e-4 relative at the smallest u:
    float64 / float64 (the default, exact); float32 / float32 is iDDPMPrecond's ``u`` buffer (the grid its
    round_sigma and c_noise use); float64 / float32 is generate.py's ablation_sampler 'iddpm' discretization
    (its j is an int64 tensor, so abar is float32 while u is float64).
    """
    f, fa = np.dtype(dtype).type, np.dtype(alpha_bar_dtype or dtype).type
    if fa == np.float64:
        abar = lambda j: iddpm_alpha_bar(j, M, C_2)
    else:   # float32 as torch evaluates 0.5 * pi * j / M / (C_2 + 1), its sin and square
        abar = lambda j: fa(math.sin(fa(fa(fa(0.5 * np.pi) * fa(j)) / fa(M)) / fa(C_2 + 1))) ** 2
    u = np.zeros(M + 1, f)
    one = f(1)
    for j in range(M, 0, -1):
        ratio = max(fa(abar(j - 1) / abar(j)), fa(C_1))
        u[j - 1] = np.sqrt((u[j] ** 2 + one) / f(ratio) - one)
    return u.astype(np.float64)


def iddpm_sigmas(num_steps: int = 18, sigma_min: float = 0.002, sigma_max: float = 81.0,
                 M: int = IDDPM_M, C_1: float = IDDPM_C1, C_2: float = IDDPM_C2, dtype=np.float64,
                 alpha_bar_dtype=None) -> np.ndarray:
    """iDDPM grid: num_steps entries of the discrete u grid inside [sigma_min, sigma_max], evenly by index.

    dtype / alpha_bar_dtype: the precision of u (see :func:`iddpm_u`); (num_steps+1,) float64, last entry 0.
    """
    _check_steps(num_steps)
    u = iddpm_u(M, C_1, C_2, dtype, alpha_bar_dtype)
    kept = u[(u >= sigma_min) & (u <= sigma_max)]
    idx = np.round((len(kept) - 1) / max(num_steps - 1, 1) * np.arange(num_steps)).astype(np.int64)
    return append_zero(kept[idx])


def ddpm_linear_sigmas(num_timesteps: int = DDPM_T) -> np.ndarray:
    """The noise levels of ADM's (and DiT's) 'linear' discrete schedule, (T,) float64, t = 0 (least noise) .. T-1.

    betas = linspace(1e-4 s, 0.02 s, T) in float64 with s = 1000 / T (``get_named_beta_schedule('linear', T)``),
    abar_t = prod_{i<=t} (1 - beta_i) and sigma_t = sqrt((1 - abar_t) / abar_t), so x_t / sqrt(abar_t) = x_0 +
    sigma_t eps: for T = 1000, sigma_0 = 0.0100 and sigma_999 = 157.4.
    """
    scale = 1000 / num_timesteps
    betas = np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)
    abar = np.cumprod(1 - betas)
    return np.sqrt((1 - abar) / abar)


def round_sigma_to_grid(sigma, grid, return_index: bool = False):
    """Nearest entry of a discrete sigma grid (iDDPM's round_sigma); sigma any shape, grid (K,).

    Returns the rounded sigmas (same shape) or, with return_index, their int32 indices into grid.
    """
    grid = jnp.asarray(grid, jnp.float32)
    sigma = jnp.asarray(sigma, jnp.float32)
    idx = jnp.argmin(jnp.abs(sigma[..., None] - grid), axis=-1).astype(jnp.int32)
    return idx if return_index else grid[idx]


def round_sigma_host(sigma, grid, return_index: bool = False) -> np.ndarray:
    """Host (numpy) twin of :func:`round_sigma_to_grid`, for grids built before a solver's scan.

    As the EDM reference's ``iDDPMPrecond.round_sigma``: the nearest entry of the float32 grid by float32
    distance (first index on ties, the same index :func:`round_sigma_to_grid` picks inside c_noise), returned
    as float64. sigma any shape, grid (K,); returns the rounded sigmas (same shape) or int64 indices.
    """
    grid32 = np.asarray(grid, np.float64).astype(np.float32)
    s32 = np.asarray(sigma, np.float64).astype(np.float32)
    idx = np.argmin(np.abs(s32[..., None] - grid32), axis=-1)
    return idx if return_index else grid32[idx].astype(np.float64)


def grid_sigma_range(grid) -> tuple[float, float]:
    """(smallest positive, largest) entry of a discrete sigma grid (K,): the range a grid denoiser supports
    (iDDPM: (u_{M-1}, u_0), the reference's ``net.sigma_min`` / ``net.sigma_max``)."""
    g = np.asarray(grid, np.float64).astype(np.float32).astype(np.float64)
    return float(g[g > 0].min()), float(g.max())


def ve_sigma_deriv(t):
    """d sigma / dt of EDM's VE parametrisation sigma(t) = sqrt(t): 0.5 / sqrt(t)."""
    xp = _xp(t)
    return 0.5 / xp.sqrt(t)


def vp_scale_deriv(sigma, sigma_deriv):
    """d s / dt of the VP scaling s(t) = 1/sqrt(1 + sigma(t)^2): -sigma sigma' s^3 (any shapes that broadcast)."""
    return -sigma * sigma_deriv * vp_scale(sigma) ** 3


def vp_betas_from_range(sigma_min: float, sigma_max: float, epsilon_s: float = 1e-3) -> tuple[float, float]:
    """(beta_d, beta_min) of the VP schedule with sigma(epsilon_s) = sigma_min and sigma(1) = sigma_max
    (EDM's ablation sampler refits them to the clipped noise range):
    beta_d = 2 (ln(sigma_min^2+1)/epsilon_s - ln(sigma_max^2+1)) / (epsilon_s - 1),
    beta_min = ln(sigma_max^2+1) - beta_d/2."""
    beta_d = 2 * (math.log(sigma_min ** 2 + 1) / epsilon_s - math.log(sigma_max ** 2 + 1)) / (epsilon_s - 1)
    return beta_d, math.log(sigma_max ** 2 + 1) - 0.5 * beta_d


def _xp(a):
    """numpy for host-side grids (float64), jax.numpy for traced values."""
    return np if isinstance(a, (np.ndarray, np.generic, float, int)) else jnp


def _check_steps(num_steps: int) -> None:
    if int(num_steps) < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
