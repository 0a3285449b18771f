"""Safe sampling by unguidance (seed 002) and, for comparison, negative classifier guidance.

Unguidance with conditional diffusion trajectory correction (CDTC): at every denoiser call, predict
x0_hat = D(x, sigma, cond); for the samples whose harm density reaches the threshold, p_h(x0_hat) >= eta,
take one gradient-descent step on log p_h *in x0 space* (MPGD-style: no backward pass through the network),
g = gamma(sigma) * grad_{x0} log p_h(x0_hat); the other samples' x0_hat pass through untouched.

The seed's update is a DDIM step with the corrected x0 but the ORIGINAL noise prediction (scaled variables):

    x_{t-1} = sqrt(abar_{t-1}) (x0_hat - g) + sqrt(1 - abar_{t-1} - s_t^2) eps_theta(x_t) + s_t z,

i.e. in EDM's unscaled variables x' = (x0_hat - g) + m eps_hat + c z: x' moves by exactly -g. Handing the
solver x0_hat - g instead moves it only by (1 - m/sigma) g, because the solver re-derives eps from the
corrected x0 (9-18% of g per step on the 50-step DDIM grid, 18-34% with DDPM, all of it on the last step), so
gamma would not mean the seed's gamma. Two modes:

- ``grid`` given (the sampler's sigma grid; ``ddim_eta`` its DDIM eta, 1 for ancestral DDPM): the transform
  returns x0_hat - g / (1 - m/sigma) (:func:`jaxdiff.transforms.trajectory.shift_x0`, sigma' from
  :func:`jaxdiff.transforms.trajectory.next_level`), which makes the DDIM/DDPM step on that grid *exactly* the seed's
  update. EDM's Euler step is DDIM eta = 0, so ``euler_sampler`` on the same grid with ddim_eta = 0 is exact too.
  Under Heun the first evaluation's Euler predictor lands exactly on the seed's x' and the trapezoid averages it
  with a second corrected evaluation at sigma' (next level sigma''): the step moves by
  g_1/2 + g_2 (sigma - sigma') / (2 (sigma' - sigma'')), about the seed's g times (1 + sigma/sigma')/2 on a
  geometric grid. Stochastic and multistep solvers get a correction of the same order, not the seed's update.
- ``grid=None``: the plain denoiser transform x0_hat - g, the same correction for every solver; with DDIM it is
  the seed's update up to the factor (1 - m/sigma) above.

Negative classifier guidance steers x_t instead: the score gets the extra term
s = -scale * grad_{x_t} log p_h(D(x_t)), the gradient going through the denoiser. Since
D = x + sigma^2 * score (Tweedie), a term s added to the score moves D by sigma^2 * s, so

    D_ncg(x) = D(x) - scale * sigma^2 * grad_x log p_h(D(x)).
"""
from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp

from jaxdiff.denoiser import StatefulDenoiser, expand_sigma
from jaxdiff.transforms.base import Transform, stateless
from jaxdiff.transforms.cfg import guidance_weight
from jaxdiff.transforms.trajectory import next_level, shift_x0

# log p_h is taken of max(p_h, TINY): a sample whose density underflows to 0 gets a zero gradient, not NaN.
TINY = 1e-30


def harm_step(harm_density: Callable[[jax.Array], jax.Array], x0: jax.Array) -> tuple[jax.Array, jax.Array]:
    """p_h(x0) (B,) and grad_{x0} log p_h(x0) (B, ...) in one pass.

    The batch sum of log p_h is differentiated: per-sample densities make that each sample's own gradient.
    """
    def total_log(z):
        p = harm_density(z)
        return jnp.sum(jnp.log(jnp.maximum(p, TINY))), p

    grad, p = jax.grad(total_log, has_aux=True)(x0)
    return p, grad


def unguidance(harm_density: Callable[[jax.Array], jax.Array], gamma: float = 75.0, eta: float = 0.23,
               gamma_schedule: Optional[str] = None, gate: Optional[Callable[[jax.Array], jax.Array]] = None, *,
               grid=None, ddim_eta: float = 0.0, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
               **schedule_kwargs) -> Transform:
    """Unguidance with CDTC as a transform (seed defaults gamma = 75, eta = 0.23 are for CLIP cosine densities).

    harm_density: x0 (B, ...) -> (B,) in [0, 1] (see :mod:`jaxdiff.transforms.densities`); its log's gradient is
        the correction direction.
    gamma: step size; gamma_schedule: None (constant) or a key of guidance.WEIGHT_SCHEDULES, evaluated on the
        Karras progress of sigma over (sigma_min, sigma_max, rho) exactly like CFG's weight schedules.
    eta: threshold; a sample is corrected where gate(x0_hat) >= eta, else its x0_hat is returned bit for bit.
    gate: x0 (B, ...) -> (B,) score compared to eta; None uses harm_density itself. For the seed's
        multi-concept rule pass the 'max' concept density here (see densities' module docstring).
    grid: (N+1,) the sampler's sigma grid: the seed's exact DDIM update on that grid (module docstring); None:
        the plain x0 correction. ddim_eta: the sampler's DDIM eta (ddim_sampler's eta; 1 for ddpm_sampler,
        either variance; 0 for euler_sampler).
    Shapes: x (B, ...), sigma () or (B,), cond the inner denoiser's; one inner call per evaluation.
    """
    sched = dict(schedule=gamma_schedule or "constant", sigma_min=sigma_min, sigma_max=sigma_max, rho=rho,
                 **schedule_kwargs)
    guidance_weight(gamma, 1.0, **sched)  # fail fast on a bad schedule name or argument

    def combine(call, x, sigma, cond):
        x0 = call(x, sigma, cond)
        p, grad = harm_step(harm_density, x0)
        score = p if gate is None else gate(x0)
        on = expand_sigma(score >= eta, x0)  # (B,) -> (B, 1, ..., 1)
        step = expand_sigma(guidance_weight(gamma, sigma, **sched), x0)
        if grid is None:
            corrected = x0 - step * grad
        else:
            corrected = shift_x0(x0, -step * grad, sigma, next_level(sigma, grid), ddim_eta)
        return jnp.where(on, corrected, x0)

    return stateless(combine)


def negative_classifier_guidance(log_p_h: Callable[[jax.Array], jax.Array], scale: float) -> Transform:
    """D(x) - scale * sigma^2 * grad_x log p_h(D(x, sigma, cond)): guidance away from harm on x_t.

    log_p_h: x0 (B, ...) -> (B,) log harm density (e.g. ``lambda z: jnp.log(density(z))``).
    scale: weight of the negative score term (see the module docstring for the sign and D-space scale).
    The inner denoiser must be stateless: its gradient with respect to x is taken, and state threaded
    through a differentiated call would escape the differentiation. Put stateful transforms (SLD) after
    this one in a chain.
    Shapes: x (B, ...), sigma () or (B,) -> (B, ...).
    """
    def transform(inner):
        if isinstance(inner, StatefulDenoiser):
            raise TypeError("negative_classifier_guidance needs a stateless inner denoiser (it differentiates "
                            "through it); put stateful transforms such as sld after it in chain(...)")

        def combine(call, x, sigma, cond):
            def total_log(z):
                x0 = call(z, sigma, cond)
                return jnp.sum(log_p_h(x0)), x0

            grad, x0 = jax.grad(total_log, has_aux=True)(x)
            return x0 - scale * expand_sigma(sigma, x) ** 2 * grad

        return stateless(combine)(inner)

    return transform
