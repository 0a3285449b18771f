"""Is an image generated? Detection by reconstruction with a diffusion model (``python -m eval.provenance``).

DIRE (Wang et al. 2023): invert the image deterministically to noise level sigma_max with the probability-flow
ODE (DDIM inversion; here Euler on EDM's ODE over the Karras grid, 20 steps by default as the paper's DDIM-20),
reconstruct it back along the same grid, and take DIRE = |x - x_rec| per pixel (on [0, 1] pixels). Images the
model generated lie on its ODE's paths and come back almost unchanged; real images come back further off. The
score of an image is minus its mean DIRE (higher reads as "generated"). The paper trains a ResNet-50 on the DIRE
maps; the mean is the training-free version of the same signal.

Loss (the seed's statistic): the image's denoising loss at chosen sigmas, averaged over noise draws
(:mod:`jaxdiff.metrics.denoising_loss`), in epsilon space and averaged over the levels; minus it is the score.

Each fake set is compared with the real images: ROC, AUC, TPR at 1% FPR, accuracy at the best threshold
(:mod:`jaxdiff.metrics.roc`; positives = generated). An AUC below 0.5 means the statistic points the other way.
"""
from __future__ import annotations

import json
import os
import time
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.metrics.denoising_loss import denoising_losses, eps_space, model_batches
from jaxdiff.metrics.roc import roc_summary
from jaxdiff.solvers.ode_path import inversion_grid, ode_path

DIRE_STEPS = 20           # DIRE: DDIM-20 inversion and reconstruction
LOSS_SIGMAS = (0.1, 0.3, 1.0)
STATISTICS = ('dire', 'loss')


def reconstruct(denoiser: Callable, x: jax.Array, grid: np.ndarray, *, cond=None, order: int = 1) -> jax.Array:
    """x (B, ...) taken as the ODE state at grid[0] -> inverted to grid[-1] and brought back to grid[0] (B, ...).
    grid: increasing positive levels (:func:`jaxdiff.solvers.ode_path.inversion_grid`)."""
    noise = ode_path(denoiser, x, grid, cond=cond, order=order)
    return ode_path(denoiser, noise, grid[::-1], cond=cond, order=order)


def dire_maps(denoiser: Callable, images: np.ndarray, labels: Optional[np.ndarray], label_dim: int, *,
              num_steps: int = DIRE_STEPS, sigma_min: float = 0.002, sigma_max: float = 80.0, order: int = 1,
              batch_size: int = 250, log: Optional[Callable[[str], None]] = None) -> np.ndarray:
    """float32 (N, H, W, C): |x - x_rec| on [0, 1] pixels for uint8 ``images`` (N, H, W, C) (labels (N,) int for a
    class-conditional model, else None). NFE per image: 2 * num_steps * order."""
    grid = inversion_grid(num_steps, sigma_min, sigma_max)

    @jax.jit
    def batch_dire(x, cond):
        return jnp.abs(reconstruct(denoiser, x, grid, cond=cond, order=order) - x) / 2

    out = []
    for lo, n, x, cond in model_batches(images, labels, label_dim, batch_size):
        out.append(np.asarray(batch_dire(x, cond))[:n])
        if log:
            log(f'DIRE: {lo + n:,} / {len(images):,} images')
    return np.concatenate(out) if out else np.zeros((0,) + images.shape[1:], np.float32)


def round_trip_error(denoiser: Callable, x: jax.Array, steps: Sequence[int], *, sigma_min: float = 0.002,
                     sigma_max: float = 80.0, order: int = 1, cond=None) -> list[dict]:
    """How exactly inversion + reconstruction returns x (B, ...) for each step count: [{'steps', 'rms', 'max'}]
    (root-mean-square and largest absolute error over all entries). On an exact denoiser the error is the ODE
    solver's alone and shrinks with steps (first order for Euler)."""
    rows = []
    for n in steps:
        rec = jax.jit(lambda v: reconstruct(denoiser, v, inversion_grid(n, sigma_min, sigma_max), cond=cond,
                                            order=order))(x)
        err = np.asarray(rec - x, np.float64)
        rows.append(dict(steps=int(n), rms=float(np.sqrt(np.mean(err ** 2))), max=float(np.max(np.abs(err)))))
    return rows


def statistic_scores(model, images: np.ndarray, labels: Optional[np.ndarray], statistic: str, *,
                     num_steps: int, sigma_max: float, sigmas: Sequence[float], draws: int, order: int, seed: int,
                     log: Callable[[str], None]) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """(scores (N,) higher = 'generated', DIRE maps (N, H, W, C) or None) of ``images`` under ``model`` (a
    :class:`jaxdiff.sampling.model.Model`)."""
    denoiser = model.denoiser(model.variables)
    if statistic == 'dire':
        maps = dire_maps(denoiser, images, labels, model.label_dim, num_steps=num_steps,
                         sigma_min=model.sigma_range[0], sigma_max=sigma_max, order=order, log=log)
        return -maps.reshape(len(maps), -1).mean(axis=1), maps
    if statistic == 'loss':
        losses = denoising_losses(denoiser, images, labels, model.label_dim, sigmas, draws=draws, seed=seed, log=log)
        return -eps_space(losses, sigmas).mean(axis=1), None
    raise ValueError(f'unknown statistic {statistic!r}: use one of {", ".join(STATISTICS)}')


def detect(model, real: dict, fakes: dict[str, dict], *, statistics: Sequence[str] = STATISTICS,
           num_steps: int = DIRE_STEPS, sigma_max: Optional[float] = None, sigmas: Sequence[float] = LOSS_SIGMAS,
           draws: int = 4, order: int = 1, seed: int = 0, log: Callable[[str], None] = print) -> dict:
    """Detection of each fake set against the real images, per statistic.

    real / fakes[name]: {'images' uint8 (N, H, W, C), 'labels' (N,) or None}. Returns {'rows': [{'statistic',
    'fake', 'auc', 'tpr_at_fpr', 'accuracy', 'threshold', ...}], 'scores': {statistic: {'real': (N,), name: (M,)}},
    'maps': {statistic 'dire': {'real': first maps, name: first maps}}, 'settings': {...}}."""
    sigma_max = float(sigma_max or model.sigma_range[1])
    shape = (model.resolution, model.resolution, model.channels)
    for name, s in [('real', real)] + list(fakes.items()):
        if s['images'].shape[1:] != shape:
            raise ValueError(f'{name} images are {"x".join(map(str, s["images"].shape[1:]))} but the model makes '
                             f'{"x".join(map(str, shape))}')
    if model.latent_shape is not None:
        raise ValueError('the model is a latent diffusion model: reconstruction-based detection in pixel space does '
                         'not apply to it')
    rows, scores, maps = [], {}, {}
    for statistic in statistics:
        begin = time.time()
        scores[statistic], maps[statistic] = {}, {}
        for name, s in [('real', real)] + list(fakes.items()):
            labels = s.get('labels') if model.label_dim else None
            if model.label_dim and (labels is None or np.any(np.asarray(labels) < 0)):
                raise ValueError(f'{name}: the model is class-conditional and these images carry no labels')
            log(f'{statistic}: scoring {len(s["images"]):,} {name} images')
            score, m = statistic_scores(model, s['images'], labels, statistic, num_steps=num_steps,
                                        sigma_max=sigma_max, sigmas=sigmas, draws=draws, order=order, seed=seed,
                                        log=log)
            scores[statistic][name] = score
            if m is not None:
                maps[statistic][name] = m[:16]
        for name in fakes:
            summary = roc_summary(scores[statistic][name], scores[statistic]['real'])
            rows.append(dict(statistic=statistic, fake=name, **summary,
                             seconds=round(time.time() - begin, 1)))
    settings = dict(num_steps=num_steps, sigma_min=float(model.sigma_range[0]), sigma_max=sigma_max, order=order,
                    loss_sigmas=[float(s) for s in sigmas], draws=draws, seed=seed,
                    model=model.description)
    return dict(rows=rows, scores=scores, maps={k: v for k, v in maps.items() if v}, settings=settings)


def write_detection(result: dict, out_dir: str) -> dict:
    """provenance.json (rows + settings), provenance_scores.npz, provenance_roc.png and, for DIRE,
    dire_maps.png (rows: real, then each fake set; 16 maps each, brightened x4) in ``out_dir``; returns the JSON
    object."""
    from jaxdiff.evaluation.plots import roc_png
    os.makedirs(out_dir, exist_ok=True)
    flat = {f'{stat}/{name}': v for stat, sets in result['scores'].items() for name, v in sets.items()}
    np.savez(os.path.join(out_dir, 'provenance_scores.npz'), **flat)
    curves = [(f'{stat}: {name}', sets[name], sets['real'])
              for stat, sets in result['scores'].items() for name in sets if name != 'real']
    roc_png(curves, os.path.join(out_dir, 'provenance_roc.png'), 'generated (positive) vs real')
    if 'dire' in result['maps']:
        from PIL import Image
        from jaxdiff.tasks.sample_grid import grid_image
        sets = result['maps']['dire']
        width = max(len(v) for v in sets.values())
        tiles = np.concatenate([np.pad(v, [(0, width - len(v))] + [(0, 0)] * 3) for v in sets.values()])
        grid = grid_image(np.clip(tiles * 4 * 255, 0, 255).astype(np.uint8), width)
        Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(os.path.join(out_dir, 'dire_maps.png'))
    record = dict(rows=result['rows'], settings=result['settings'])
    with open(os.path.join(out_dir, 'provenance.json'), 'w') as f:
        json.dump(record, f, indent=1)
    return record
