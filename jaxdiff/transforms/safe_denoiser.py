"""Training-free safe denoiser (Kim, Kim, Yusuf, Ermon, Park) in three forms, each named for what it is.

Split the data distribution into safe and unsafe parts, p_data = Z_s p_s + Z_u p_u (Z_s + Z_u = 1). Then the
posterior mean of the safe part follows from the data and unsafe posterior means alone:

    E_safe[x0 | x_t] = E_data[x0 | x_t] + beta*(x_t) (E_data[x0 | x_t] - E_unsafe[x0 | x_t]),
    beta*(x_t) = Z_u p_u,t(x_t) / (Z_s p_s,t(x_t))

(because E_data = (Z_s p_s,t E_safe + Z_u p_u,t E_unsafe) / p_data,t).

- :func:`exact_safe_denoiser` (exact beta*): for a Gaussian mixture whose components are labelled safe/unsafe,
  every term is exact; the result is the exact denoiser of the renormalised safe sub-mixture.
- :func:`paper_safe_denoiser` (the paper's equation): E + beta (E - E_u) for any denoiser, E_u a kernel mean
  of unsafe reference samples z_i on x0_hat, beta a constant inside a window of noise levels.
- :func:`practical_safe_denoiser` (what the official code, MingyuKim87/Safe_Denoiser, runs): not the equation.
  Per denoiser call inside a window of early levels, and only where the *unnormalised* kernel mass of the
  reference set on x0_hat passes a threshold, x0' = x0_hat - s * E_u (E_u itself, not E - E_u, scaled by s), the
  latent is re-noised from x0' with fresh noise, x_r = x0' + sigma n, and the solver's step is taken from x_r
  with the OLD noise prediction eps_theta(x_t). As a transform this is the x0 that makes the DDIM/DDPM step on
  the given grid land where the code's step lands (:func:`jaxdiff.transforms.trajectory.shift_x0`). The official
  settings are in :data:`REFERENCE_SETTINGS`.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import toy
from jaxdiff.denoiser import expand_sigma, per_sample_sigma
from jaxdiff.transforms.base import Transform, stateful, stateless
from jaxdiff.transforms.densities import unsafe_mask
from jaxdiff.transforms.trajectory import RTOL, next_level, shift_x0


def sub_mixture(gm: toy.GaussianMixture, components: Sequence[int]) -> toy.GaussianMixture:
    """The mixture restricted to ``components`` (indices into K), weights renormalised, labels kept."""
    idx = jnp.asarray(list(components), jnp.int32)
    return toy.mixture(gm.means[idx], gm.stds[idx], gm.weights[idx], gm.labels[idx], gm.num_classes)


def exact_beta(gm: toy.GaussianMixture, unsafe_components: Sequence[int], x: jax.Array, sigma, cond=None):
    """beta*(x_t) = Z_u p_u,t / (Z_s p_s,t) = P(unsafe | x_t) / P(safe | x_t), (B,).

    Computed from log posterior masses so neither mass underflows before the division.
    """
    mask = unsafe_mask(gm, unsafe_components)
    logpost = toy.posterior_logits(gm, x, sigma, cond)
    log_u = jax.nn.logsumexp(jnp.where(mask > 0, logpost, -jnp.inf), axis=-1)
    log_s = jax.nn.logsumexp(jnp.where(mask > 0, -jnp.inf, logpost), axis=-1)
    return jnp.exp(log_u - log_s)


def exact_safe_denoiser(gm: toy.GaussianMixture, unsafe_components: Sequence[int]):
    """Exact beta*: D_safe(x, sigma, cond) = E_data + beta* (E_data - E_unsafe), every term exact for the mixture.

    E_data is the whole mixture's denoiser, E_unsafe the unsafe sub-mixture's (under the same cond).
    Where the unsafe part has no mass under cond (beta* = 0) the unsafe term is dropped. Deep inside an
    unsafe mode at small sigma, beta* is huge and E_data - E_unsafe tiny: the product loses float32
    precision there, which the safe sampler's trajectories do not visit.
    Shapes: x (B, *event), sigma () or (B,), cond (B, num_classes) or None -> (B, *event).
    """
    mask = unsafe_mask(gm, unsafe_components)
    unsafe = sub_mixture(gm, [k for k in range(mask.shape[0]) if mask[k] > 0])

    def denoise(x, sigma, cond=None):
        e_data = toy.denoise(gm, x, sigma, cond)
        beta = exact_beta(gm, unsafe_components, x, sigma, cond)
        diff = jnp.where(expand_sigma(beta > 0, x), e_data - toy.denoise(unsafe, x, sigma, cond), 0.0)
        return e_data + expand_sigma(beta, x) * diff

    return denoise


def kernel_unsafe_mean(x0: jax.Array, refs: jax.Array, bandwidth: float) -> jax.Array:
    """E_unsafe ~= sum_i w_i z_i / sum_i w_i, w_i = exp(-||x0 - z_i|| / (2 s^2)), (B, ...).

    x0: (B, ...) the denoiser's estimate; refs: (M, ...) unsafe reference samples; bandwidth: s.
    The distance is unsquared, as in the reference implementation (a Laplace-like kernel, not Gaussian).
    """
    d = jnp.linalg.norm(x0.reshape(x0.shape[0], 1, -1) - refs.reshape(1, refs.shape[0], -1), axis=-1)
    w = jax.nn.softmax(-d / (2 * bandwidth ** 2), axis=-1)  # softmax = the normalised weights, stably
    return (w @ refs.reshape(refs.shape[0], -1)).reshape(x0.shape)


def paper_safe_denoiser(unsafe_refs, beta: float = 0.33, bandwidth: float = 1.0, sigma_lo: float = 1.0,
                        sigma_hi: float = float("inf")) -> Transform:
    """The paper's equation E + beta (E - E_u): E_u from reference samples, a constant beta inside a window.

    unsafe_refs: (M, ...) samples of the unsafe content (same event shape as x).
    beta: the constant standing in for beta*(x_t), applied where sigma_lo <= sigma <= sigma_hi, 0 outside (the
        official code's 0.33 is not this beta but the scale s of E_u in :func:`practical_safe_denoiser`).
        Keep sigma_lo well above 0: at small
        sigma, where D(x) ~ x, the term beta (x0_hat - E_unsafe) makes the ODE expand away from E_unsafe
        like (sigma_lo / sigma)^beta and the samples leave the data.
    bandwidth: s of :func:`kernel_unsafe_mean`.
    Shapes: x (B, ...), sigma () or (B,), cond the inner denoiser's; one inner call per evaluation.
    """
    refs = jnp.asarray(unsafe_refs, jnp.float32)

    def combine(call, x, sigma, cond):
        x0 = call(x, sigma, cond)
        sig = expand_sigma(sigma, x0)
        scale = jnp.where((sig >= sigma_lo) & (sig <= sigma_hi), beta, 0.0)
        return x0 + scale * (x0 - kernel_unsafe_mean(x0, refs, bandwidth))

    return stateless(combine)


# ------------------------------------------------------------------------------------------- the practical form

class PracticalSettings(NamedTuple):
    """One task's settings in the official code (MingyuKim87/Safe_Denoiser, configs/<task>/safe_denoiser.yaml and
    the pipeline its README runs for that task; SD-v1.4 latents, diffusers' DDPMScheduler, 50 steps).

    scale: s of x0' = x0_hat - s E_u; bandwidth: the kernel's s (its ``sigma``); window_steps: the first levels of
    the 50-step grid where it applies; gated: whether the kernel-mass threshold is used; margin: subtracted from
    the calibrated threshold (quantile 0 of the noised references' masses at the last level); threshold: a
    fixed threshold instead of the calibration (None: calibrate).
    """

    scale: float
    bandwidth: float
    window_steps: int
    gated: bool
    margin: float = 0.0
    threshold: Optional[float] = None


REFERENCE_SETTINGS = {
    # configs/nudity/safe_denoiser.yaml + erase_id safree_neg_prompt_rep_threshold_time: t in [780, 1000] = 11 steps.
    "nudity": PracticalSettings(0.33, 3.15, 11, True, margin=1.6),
    # configs/copro/safe_denoiser.yaml (threshold lines commented out) + safree_neg_prompt_rep_time (no gate,
    # t in [800, 1000] = 10 steps).
    "copro": PracticalSettings(0.03, 3.55, 10, False),
    # configs/ann_graham/safe_denoiser.yaml + std_rep (steps i = 0..11): threshold 1e-9, i.e. always on.
    "artist": PracticalSettings(0.69, 13.15, 12, True, threshold=1e-9),
}


def practical_unsafe_mean(x0: jax.Array, refs: jax.Array, bandwidth: float,
                          epsilon: float = 1e-8) -> tuple[jax.Array, jax.Array]:
    """The official code's kernel estimate and its mass: (E_u (B, ...), mass (B,)).

    mass = sum_i exp(-||x0 - z_i|| / (2 s^2)) + epsilon (unnormalised, unsquared distance);
    E_u = sum_i exp(-||x0 - z_i|| / (2 s^2)) z_i / mass. The epsilon in the denominator makes E_u shrink to 0
    where every weight underflows (far from all references), unlike the normalised :func:`kernel_unsafe_mean`.
    Computed through logsumexp, so no weight underflows before the sum. x0: (B, ...); refs: (M, ...).
    """
    d = jnp.linalg.norm(x0.reshape(x0.shape[0], 1, -1) - refs.reshape(1, refs.shape[0], -1), axis=-1)
    logits = -d / (2 * bandwidth ** 2)
    raw = jnp.exp(jax.nn.logsumexp(logits, axis=-1))  # sum_i w_i, (B,)
    mean = (jax.nn.softmax(logits, axis=-1) @ refs.reshape(refs.shape[0], -1)).reshape(x0.shape)
    mass = raw + epsilon
    return mean * expand_sigma(raw / mass, x0), mass


def calibrate_threshold(unsafe_refs, bandwidth: float, sigma: float, key: jax.Array, quantile: float = 0.0,
                        margin: float = 0.0, epsilon: float = 1e-8) -> float:
    """The official code's gate threshold: the ``quantile`` of the kernel masses of the noised references, minus
    ``margin``.

    Each reference is noised as the scheduler's add_noise does, a z_i + sqrt(1 - a^2) n_i with
    a = 1 / sqrt(1 + sigma^2) (VP-scaled, as the code compares it), and its :func:`practical_unsafe_mean` mass
    against all references (itself included) is taken; the code does this at every level and keeps the last,
    least noisy one, so pass the grid's smallest positive sigma. quantile 0 (the code's default) is the minimum.
    unsafe_refs: (M, ...); key: one PRNG key. Returns a Python float.
    """
    refs = jnp.asarray(unsafe_refs, jnp.float32)
    a = 1.0 / np.sqrt(1.0 + float(sigma) ** 2)
    noised = a * refs + np.sqrt(1.0 - a * a) * jax.random.normal(key, refs.shape, refs.dtype)
    _, mass = practical_unsafe_mean(noised, refs, bandwidth, epsilon)
    return float(jnp.quantile(mass, quantile)) - float(margin)


class PracticalState(NamedTuple):
    """seed_hash: (B,) uint32 hash of each sample's starting point (the solver's initial x), which keys its draws."""

    seed_hash: jax.Array


def _state_hash(x: jax.Array) -> jax.Array:
    """(B,) uint32 hash of each sample's float32 bits."""
    flat = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32).reshape(x.shape[0], -1)
    odd = 2 * jnp.arange(flat.shape[1], dtype=jnp.uint32) + 1
    return jnp.sum(flat * odd, axis=1, dtype=jnp.uint32)  # wraps mod 2^32


def _fresh_noise(key: jax.Array, seed_hash: jax.Array, sigma: jax.Array, shape) -> jax.Array:
    """N(0, I) of ``shape`` (B, ...): sample b's draw at level sigma_b keyed by (key, seed_hash_b, sigma_b), so a
    function of its starting latent (its seed) and level alone, whatever batch it is in."""
    level = jax.lax.bitcast_convert_type(sigma.astype(jnp.float32), jnp.uint32)

    def draw(hash_b, level_b):
        k = jax.random.fold_in(jax.random.fold_in(key, hash_b), level_b)
        return jax.random.normal(k, tuple(shape[1:]), jnp.float32)

    return jax.vmap(draw)(seed_hash, level)


def practical_safe_denoiser(unsafe_refs, scale: float = 0.33, bandwidth: float = 3.15,
                            threshold: float = float("-inf"), *, grid, window_steps: int = 11, ddim_eta: float = 1.0,
                            key: Optional[jax.Array] = None, epsilon: float = 1e-8) -> Transform:
    """The official code's safe denoiser (module docstring) as a transform, exact for DDIM/DDPM on ``grid``.

    unsafe_refs: (M, ...) reference samples of the unsafe content. scale: s of x0' = x0_hat - s E_u.
    bandwidth: the kernel's s (:func:`practical_unsafe_mean`). threshold: a sample is corrected only where its
        kernel mass exceeds it (:func:`calibrate_threshold`; -inf = no gate, the CoPro setting).
    grid: (N+1,) the sampler's sigma grid; window_steps: corrected only at its first levels, sigma >=
        grid[window_steps - 1] (the code: the first 10-12 of 50 DDPM steps). ddim_eta: the sampler's eta (the
        code uses DDPM: 1).
    key: PRNG key of the fresh re-noising draws. Each sample's draw at each level is keyed by the key, a hash of
        its starting point (the solver's initial x, kept as transform state) and the level, so a sample depends on
        its seed alone, whatever the batch. None re-noises with the model's own eps instead: a deterministic
        variant (and a stateless transform) that is a plain shift of x' by -s E_u.
    With ddim_sampler / ddpm_sampler on ``grid`` a corrected step is exactly the code's: x_r = x0' + sigma n, then
    the step from x_r with the old eps, x' = x_r + (m - sigma) eps_theta(x_t) + c z (m, c of
    :mod:`jaxdiff.transforms.trajectory`); the returned x0 is x0_hat + (x_r - x) / (1 - m / sigma). Under EDM's Euler
    step (DDIM eta = 0) with ddim_eta = 0 it is exact as well; under Heun the predictor lands there and the
    corrector averages it with the plain second evaluation (outside the window) or a second re-noising.
    Shapes: x (B, ...), sigma () or (B,), cond the inner denoiser's -> (B, ...); one inner call per evaluation.
    """
    refs = jnp.asarray(unsafe_refs, jnp.float32)
    levels = np.asarray(grid, np.float64)
    if not 1 <= int(window_steps) <= len(levels) - 1:
        raise ValueError(f"window_steps must be in [1, {len(levels) - 1}] (the grid's steps), got {window_steps}")
    sigma_lo = float(levels[int(window_steps) - 1]) * (1.0 - RTOL)

    def correct(call, x, sigma, cond, seed_hash):
        x0 = call(x, sigma, cond)
        sig = per_sample_sigma(sigma, x0)
        e_u, mass = practical_unsafe_mean(x0, refs, bandwidth, epsilon)
        on = (sig >= sigma_lo) & (mass > threshold)
        x0_new = x0 - scale * e_u
        if seed_hash is None:
            x_r = x0_new + (x - x0)  # re-noised with the model's own eps
        else:
            x_r = x0_new + expand_sigma(sig, x0) * _fresh_noise(key, seed_hash, sig, x0.shape).astype(x0.dtype)
        out = shift_x0(x0, x_r - x, sig, next_level(sig, levels), ddim_eta)
        return jnp.where(expand_sigma(on, x0), out, x0)

    if key is None:
        return stateless(lambda call, x, sigma, cond: correct(call, x, sigma, cond, None))
    return stateful(lambda x: PracticalState(_state_hash(x)),
                    lambda call, x, sigma, cond, state: (correct(call, x, sigma, cond, state.seed_hash), state))
