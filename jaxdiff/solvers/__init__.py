"""Samplers: every one is ``name(denoiser, latents, *, key=None, cond=None, <grid params>) -> x0 (B, ...)``.

- ``denoiser``: D(x, sigma, cond) -> x0_hat or a :class:`jaxdiff.denoiser.StatefulDenoiser`; its state is
  initialised once from the first noisy x and threaded through every evaluation inside one ``lax.scan``.
- ``latents``: (B, ...) N(0, I) noise; each sampler scales it to its own start (documented per sampler).
- ``key``: None (deterministic settings only), one PRNG key, or (B,) per-sample keys; step i draws
  ``normal(fold_in(key, i))`` (per sample: ``fold_in(key_b, i)``), so a sample depends on its key alone.
- Grids are built on the host in float64; the scan runs in float32; output dtype = latents.dtype.

Modules: ``edm`` (EDM Heun/Euler with churn), ``ablation`` (EDM's ablation sampler: Table 1's VP / VE / iDDPM /
EDM solver, discretization, sigma(t) and s(t), with alpha), ``discrete`` (DDIM, DDPM), ``sde`` (Euler-Maruyama,
probability-flow ODE, predictor-corrector), ``langevin`` (NCSN annealed Langevin), ``dpm`` (DPM-Solver++(2M)).
"""
from jaxdiff.solvers.ablation import ablation_sampler
from jaxdiff.solvers.discrete import ddim_sampler, ddpm_sampler
from jaxdiff.solvers.dpm import dpm_solver_pp_2m_sampler
from jaxdiff.solvers.edm import edm_sampler, euler_sampler, heun_sampler
from jaxdiff.solvers.langevin import annealed_langevin_sampler
from jaxdiff.solvers.sde import euler_maruyama_sampler, pc_sampler, probability_flow_sampler

__all__ = [
    "ablation_sampler",
    "annealed_langevin_sampler",
    "ddim_sampler",
    "ddpm_sampler",
    "dpm_solver_pp_2m_sampler",
    "edm_sampler",
    "euler_maruyama_sampler",
    "euler_sampler",
    "heun_sampler",
    "pc_sampler",
    "probability_flow_sampler",
]
