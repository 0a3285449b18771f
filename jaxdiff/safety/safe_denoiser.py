"""Training-free safe denoiser (Kim, Kim, Yusuf, Ermon, Park).

Split the data distribution into safe and unsafe parts, p_data = Z_s p_s + Z_u p_u (Z_s + Z_u = 1). Then the
posterior mean of the safe part follows from the data and unsafe posterior means alone:

    E_safe[x0 | x_t] = E_data[x0 | x_t] + beta*(x_t) (E_data[x0 | x_t] - E_unsafe[x0 | x_t]),
    beta*(x_t) = Z_u p_u,t(x_t) / (Z_s p_s,t(x_t))

(because E_data = (Z_s p_s,t E_safe + Z_u p_u,t E_unsafe) / p_data,t). Two forms:

- :func:`exact_safe_denoiser`: for a Gaussian mixture whose components are labelled safe/unsafe, every
  term is exact; the result is the exact denoiser of the renormalised safe sub-mixture.
- :func:`reference_safe_denoiser`: a transform for any denoiser, E_unsafe estimated from a reference set of
  unsafe samples z_i by kernel weights on x0_hat, beta a constant applied inside a window of noise levels.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from jaxdiff import toy
from jaxdiff.denoiser import expand_sigma
from jaxdiff.guidance import Transform, stateless
from jaxdiff.safety.densities import unsafe_mask


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
    """D_safe(x, sigma, cond) = E_data + beta* (E_data - E_unsafe), every term exact for the mixture.

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


def reference_safe_denoiser(unsafe_refs, beta: float = 0.33, bandwidth: float = 1.0, sigma_lo: float = 1.0,
                            sigma_hi: float = float("inf")) -> Transform:
    """Safe denoiser transform with E_unsafe from reference samples and a constant beta inside a window.

    unsafe_refs: (M, ...) samples of the unsafe content (same event shape as x).
    beta: constant scale (0.33 in the reference code), applied where sigma_lo <= sigma <= sigma_hi, 0 outside
        (the reference applies it over a window of early, noisy steps). Keep sigma_lo well above 0: at small
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
