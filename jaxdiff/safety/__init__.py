"""Safety transforms: unguidance with CDTC (and negative classifier guidance), safe classifier guidance, the
training-free safe denoiser (exact beta*, the paper's equation, the official code's practical form), and Safe
Latent Diffusion; plus the harm densities unguidance steers by.

Every method is a transform (denoiser -> denoiser, see :mod:`jaxdiff.guidance`), so it runs unchanged with
every solver and composes with ``cfg`` through ``chain``.
"""
from jaxdiff.safety.densities import classifier_density, concept_density, concept_scores, mixture_density
from jaxdiff.safety.safe_guidance import safe_classifier_guidance, safe_log_prob
from jaxdiff.safety.safe_denoiser import (REFERENCE_SETTINGS, PracticalSettings, calibrate_threshold,
                                         exact_safe_denoiser, paper_safe_denoiser, practical_safe_denoiser, sub_mixture)
from jaxdiff.safety.sld import PRESETS, SLDConfig, SLDState, sld
from jaxdiff.safety.unguidance import negative_classifier_guidance, unguidance

__all__ = [
    "PRESETS", "PracticalSettings", "REFERENCE_SETTINGS", "SLDConfig", "SLDState", "calibrate_threshold",
    "classifier_density", "concept_density", "concept_scores", "exact_safe_denoiser", "mixture_density",
    "negative_classifier_guidance", "paper_safe_denoiser", "practical_safe_denoiser", "safe_classifier_guidance",
    "safe_log_prob", "sld", "sub_mixture", "unguidance",
]
