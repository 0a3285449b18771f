"""jaxdiff: EDM-style diffusion models in JAX/Flax, with guidance, safety, watermarking and robustness.

The one idea: everything that generates goes through ``denoiser(x, sigma, cond) -> x0_hat``
(see :mod:`jaxdiff.denoiser`). Modules:

- :mod:`jaxdiff.schedules`  sigma grids and sigma(t) parametrisations (EDM, VP, VE, iDDPM, DDPM);
- :mod:`jaxdiff.precond`    EDM / VP / VE / iDDPM preconditioning: network -> denoiser;
- :mod:`jaxdiff.losses`     EDM / VP / VE training losses;
- :mod:`jaxdiff.solvers`    samplers as ``lax.scan`` over a precomputed grid;
- :mod:`jaxdiff.transforms` every transform denoiser -> denoiser (CFG, classifier guidance, safety, fairness),
  ``chain`` and the registry sample.py reads;
- :mod:`jaxdiff.toy`        Gaussian mixtures with exact denoisers (the test oracle);
- :mod:`jaxdiff.nets`       SongUNet (DDPM++/NCSN++), DhariwalUNet (ADM), EDM checkpoint conversion.
"""

__version__ = "0.1.0"
