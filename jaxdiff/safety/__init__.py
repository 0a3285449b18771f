"""Safety transforms: unguidance with CDTC (and negative classifier guidance), safe classifier guidance, the
training-free safe denoiser, and Safe Latent Diffusion; plus the harm densities unguidance steers by.

Every method is a transform (denoiser -> denoiser, see :mod:`jaxdiff.guidance`), so it runs unchanged with
every solver and composes with ``cfg`` through ``chain``.
"""
from jaxdiff.safety.densities import classifier_density, concept_density, concept_scores, mixture_density
from jaxdiff.safety.safe_guidance import safe_classifier_guidance, safe_log_prob
from jaxdiff.safety.safe_denoiser import exact_safe_denoiser, reference_safe_denoiser, sub_mixture
from jaxdiff.safety.sld import PRESETS, SLDConfig, SLDState, sld
from jaxdiff.safety.unguidance import negative_classifier_guidance, unguidance

__all__ = [
    "PRESETS", "SLDConfig", "SLDState", "classifier_density", "concept_density", "concept_scores",
    "exact_safe_denoiser", "mixture_density", "negative_classifier_guidance", "reference_safe_denoiser", "safe_classifier_guidance",
    "safe_log_prob", "sld", "sub_mixture", "unguidance",
]
