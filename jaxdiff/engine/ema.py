"""EDM's exponential moving average of the params, with half-life in images and its ramp-up.

halflife = halflife_img, capped at cur_nimg * rampup_ratio when rampup_ratio is set; beta = 0.5 ** (batch_size /
halflife); after the optimizer step, ema <- params + beta * (ema - params), with cur_nimg = step * batch_size
counted before the step (so step 0 copies the params when the ramp-up is on).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def ema_beta(config, step) -> jnp.ndarray:
    """EMA decay for the update at ``step`` (int or int32 array ()); float32 () in [0, 1)."""
    halflife = jnp.float32(config.ema.halflife_img)
    if config.ema.rampup_ratio:
        halflife = jnp.minimum(halflife, jnp.asarray(step, jnp.float32) * config.batch_size
                               * config.ema.rampup_ratio)
    return 0.5 ** (config.batch_size / jnp.maximum(halflife, 1e-8))


def decay_per_step(halflife_img: float, batch_size: int) -> float:
    """The per-update decay 0.5 ** (batch_size / halflife_img) of a constant half-life (0 = no EMA: decay 0, the
    EMA is the last iterate)."""
    return 0.5 ** (batch_size / halflife_img) if halflife_img else 0.0


def ema_update(ema, params, beta):
    """params + beta * (ema - params), leafwise over two pytrees of the same structure (torch's lerp)."""
    return jax.tree.map(lambda e, p: p + beta.astype(p.dtype) * (e - p), ema, params)
