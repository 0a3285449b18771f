"""Autoguidance (Karras et al. 2024, "Guiding a diffusion model with a bad version of itself"; NVlabs/edm2
``generate_images.py``): guide the main denoiser with a worse version of itself instead of an unconditional one,

    D = D_guide + w (D_main - D_guide),

at every network call (both evaluations of a Heun step) and every noise level, the condition passed to both. The
guide is the same task and conditioning, smaller and/or trained for less (the paper: one size smaller and about
1/16 of the training). With an unconditional guide network this is CFG with a separate unconditional model (EDM2's
'guid' presets). w = 1 is the main denoiser alone and, as in the reference, does not evaluate the guide.
"""
from __future__ import annotations

from typing import Optional

from jaxdiff.denoiser import Denoiser
from jaxdiff.transforms.base import Transform
from jaxdiff.transforms.guided import GuidanceInterval, guided_transform


def autoguidance(guide: Denoiser, weight: float, *, interval: Optional[GuidanceInterval] = None) -> Transform:
    """D_guide + w (D_main - D_guide) with D_main the denoiser the transform is applied to.

    guide: D_guide(x (B, ...), sigma (B,), cond) -> (B, ...), a plain denoiser with its weights bound; it receives
        the same cond as the main one (wrap it to drop the labels when the guide is unconditional).
    weight: w (1: the main denoiser alone, the guide not evaluated; 2.1 and 2.05 are EDM2's img512-S / XXL presets).
    interval: guide only inside it (see :mod:`jaxdiff.transforms.guided`); the paper found that adding one hurt.
    """
    w = float(weight)
    if w == 1.0:
        return lambda denoiser: denoiser

    def guided(call, x, sigma, cond, stack):
        d_main = call(x, sigma, cond)
        d_guide = guide(x, sigma, cond)
        return d_guide + w * (d_main - d_guide), d_main

    return guided_transform(guided, interval)
