"""Every transform in one package: a transform maps a denoiser to a denoiser (DESIGN.md, "the one idea").

- :mod:`~jaxdiff.transforms.base`        ``Transform``, ``chain``, ``stateless``, ``stateful`` (optax-style state);
- :mod:`~jaxdiff.transforms.trajectory`  where a call is on the trajectory, from sigma alone: ``progress``,
  ``next_level`` of a grid, ``shift_x0`` (make a DDIM-family step land elsewhere);
- :mod:`~jaxdiff.transforms.cfg`         classifier-free guidance, negative conditions, weight schedules;
- :mod:`~jaxdiff.transforms.autoguidance` guidance by a worse model; :mod:`~jaxdiff.transforms.guided` what it and
  CFG share: the guidance interval and one call on stacked conditions;
- :mod:`~jaxdiff.transforms.classifier`  classifier guidance (Bayes' rule on the noisy marginals);
- safety: :mod:`~jaxdiff.transforms.densities` (harm densities), :mod:`~jaxdiff.transforms.unguidance` (and
  negative classifier guidance), :mod:`~jaxdiff.transforms.safe_guidance`, :mod:`~jaxdiff.transforms.safe_denoiser`
  (exact beta*, the paper's equation, the official code's practical form), :mod:`~jaxdiff.transforms.sld`;
- fairness: :mod:`~jaxdiff.transforms.attribute_switching` (attribute switching, tau search, BER);
- :mod:`~jaxdiff.transforms.registry`    the names ``sample.py --guidance NAME:key=value`` reaches.

Each runs unchanged with every solver and composes through ``chain``.
"""
from jaxdiff.transforms.autoguidance import autoguidance
from jaxdiff.transforms.base import Call, Transform, chain, stateful, stateless
from jaxdiff.transforms.cfg import WEIGHT_SCHEDULES, cfg, guidance_weight
from jaxdiff.transforms.classifier import class_log_prob, classifier_guidance
from jaxdiff.transforms.densities import classifier_density, concept_density, concept_scores, mixture_density
from jaxdiff.transforms.guided import GuidanceInterval
from jaxdiff.transforms.safe_denoiser import (REFERENCE_SETTINGS, PracticalSettings, calibrate_threshold,
                                              exact_safe_denoiser, paper_safe_denoiser, practical_safe_denoiser,
                                              sub_mixture)
from jaxdiff.transforms.safe_guidance import safe_classifier_guidance, safe_log_prob
from jaxdiff.transforms.sld import PRESETS, SLDConfig, SLDState, sld
from jaxdiff.transforms.trajectory import next_level, progress, shift_x0
from jaxdiff.transforms.unguidance import negative_classifier_guidance, unguidance

__all__ = [
    "Call", "GuidanceInterval", "PRESETS", "PracticalSettings", "REFERENCE_SETTINGS", "SLDConfig", "SLDState",
    "Transform", "WEIGHT_SCHEDULES", "autoguidance", "calibrate_threshold", "cfg", "chain", "class_log_prob",
    "classifier_density", "classifier_guidance", "concept_density", "concept_scores", "exact_safe_denoiser",
    "guidance_weight", "mixture_density", "negative_classifier_guidance", "next_level", "paper_safe_denoiser",
    "practical_safe_denoiser", "progress", "safe_classifier_guidance", "safe_log_prob", "shift_x0", "sld", "stateful",
    "stateless", "sub_mixture", "unguidance",
]
