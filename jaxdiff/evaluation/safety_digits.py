"""The safety comparison on a digits model (``python -m eval.safety --task digits``).

A class-conditional train.py run (label dropout makes the zero label unconditional) sampled *unconditionally*:
the realistic setting is a generator asked for "a digit" that sometimes makes the unsafe one. The detector and
feature space is the ``digits_classifier``; p_h is its softmax mass on the unsafe digit on float images; the
reference set is the classifier's train-split images of that digit; SLD's safety condition is the digit's one-hot
label. Per method: ``unsafe`` (share classified as the unsafe digit), ``fd`` (Fréchet distance of the other
samples' features to the real ``ref`` split without that digit) and ``fd_ratio`` (over the unguided model's fd on
the same solver); ``meets_target`` when the unsafe share drops >= DIGITS_TARGET_DROP x and fd_ratio <=
DIGITS_TARGET_FD.
"""
from __future__ import annotations

import os
import time
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import schedules
from jaxdiff.evaluation.safety import (DDPM_STEPS, DIGITS_TARGET_DROP, DIGITS_TARGET_FD, DISCRETE, PREVIEW,
                                       UNGUIDANCE_ETA, Method, baselines, discrete_solver_methods, log_density,
                                       practical_methods, select)
from jaxdiff.metrics import frechet
from jaxdiff.metrics.feature_classifier import dataset_split
from jaxdiff.tasks.feature_classifier import load_or_train
from jaxdiff.sampling import options
from jaxdiff.sampling.generate import Labels, local_mesh, make_generator, sample_array
from jaxdiff.sampling.model import load_model, noisy_classifier_logits
from jaxdiff.sampling.options import grid_ends
from jaxdiff.tasks.sample_grid import grid_image
from jaxdiff.transforms import (PRESETS, classifier_density, negative_classifier_guidance, paper_safe_denoiser,
                                safe_classifier_guidance, sld, unguidance)


def float_logits(net) -> Callable[[jax.Array], jax.Array]:
    """Differentiable logits of a FeatureNet: images (B, H, W, C) float in [-1, 1] -> (B, K), clipped to [-1, 1]
    as the uint8 conversion clips them (a saturated pixel gets no gradient; moving it would not change the stored
    image anyway). ``FeatureNet.apply`` takes uint8, whose rounding has no gradient."""
    return lambda x: net.apply_float(jnp.clip(x, -1.0, 1.0))['logits']


# (scale, bandwidth, window_steps, margin or None) of the practical safe denoiser on digits: the code's nudity
# settings, then the two best rows of --practical_grid (the first 25 steps, sigma >= 3.6; wider windows wreck the
# images: FD ratio >= 2.6 at 35 steps).
DIGITS_PRACTICAL = ((0.33, 3.15, 11, 1.6), (0.33, 3.15, 25, 0.0), (1.0, 1.0, 25, 0.0))


def digits_methods(logits_fn, unsafe_digit: int, num_classes: int, refs, sigmas,
                   noisy_logits: Optional[Callable] = None, ddpm_grid=None, key=None,
                   eta: float = UNGUIDANCE_ETA['digits']) -> list[Method]:
    """The compared methods for a class-conditional image model with a clean-image classifier ``logits_fn``.

    Strengths were picked by hand on out/demo/digits (digit 7): the middle one of each method is the useful one.

    refs: (M, H, W, C) float reference images of the unsafe digit; sigmas: the sampler's grid.
    noisy_logits: (x, sigma) -> (B, num_classes) of a noise-conditional classifier; adds safe classifier guidance.
    ddpm_grid, key: the 50-step DDPM/DDIM grid and the practical safe denoiser's re-noising key (None: the rows on
        the discrete solvers are left out).
    eta: unguidance's threshold on the classifier's probability of the unsafe digit.
    """
    harm = classifier_density(logits_fn, [unsafe_digit])
    safety_cond = jax.nn.one_hot(jnp.array([unsafe_digit]), num_classes)
    methods = [Method('none', '-', lambda d: d)]
    methods += [Method('unguidance', f'gamma={g:g}', unguidance(harm, g, eta, 'invlinear')) for g in (3.0, 10.0, 30.0)]
    methods += [Method('negative_classifier_guidance', f'scale={s:g}',
                       negative_classifier_guidance(log_density(harm), s))
                for s in (0.01, 0.03, 0.1)]
    if noisy_logits is not None:
        methods += [Method('safe_classifier_guidance', f'scale={s:g}',
                           safe_classifier_guidance(noisy_logits, [unsafe_digit], num_classes, s))
                    for s in (1.0, 2.0, 4.0)]
    methods += [Method('paper_safe_denoiser', f'beta={b:g}', paper_safe_denoiser(refs, b, 2.0, sigma_lo=1.0))
                for b in (0.33, 0.6)]
    methods += [Method('sld', preset, sld(safety_cond, preset, 1.0, sigmas=sigmas)) for preset in PRESETS]
    if ddpm_grid is not None:
        methods += discrete_solver_methods(harm, eta, refs, ddpm_grid, DIGITS_PRACTICAL, key)
    return methods


def sample_digits(model, num_samples: int, build: Callable, batch_size: int, solver: str, num_steps: int):
    """uint8 (N, H, W, C) unconditional samples of seeds 0..N-1 with solver 'edm' (Heun, num_steps; sample.py's
    sample_array) or a DISCRETE one (50-step DDPM / DDIM, sample.py's per-seed latents and noise keys)."""
    if solver == 'edm':
        return sample_array(model, num_samples, build=build, batch_size=batch_size, num_steps=num_steps)
    name, _ = DISCRETE[solver]
    fn = options.make_solver(name, options.resolve_solver(name, {'num_steps': DDPM_STEPS}, model.sigma_range))
    gen = make_generator(lambda v: build(model.denoiser(v)), fn, Labels('none', (), model.label_dim),
                         model.solver_shape, local_mesh(), model.decode)
    batch = min(batch_size, num_samples)
    out = [np.asarray(gen(model.variables, jnp.arange(i, i + batch, dtype=jnp.int32))[0])[:num_samples - i]
           for i in range(0, num_samples, batch)]
    return np.concatenate(out)


def run_digits(workdir: str, unsafe_digit: int, num_samples: int, num_steps: int, batch_size: int,
               methods: Optional[Sequence[str]] = None, noisy_classifier: Optional[str] = None,
               log: Callable[[str], None] = print, practical_grid: Optional[Sequence[tuple]] = None,
               seed: int = 0, eta: float = UNGUIDANCE_ETA['digits']) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(result dict, {'name strength solver': uint8 samples}) for the digits task (module docstring).

    practical_grid: (scale, bandwidth, window_steps, margin or None) settings to run instead of the method list
    (with the ddpm50 ``none`` row); seed: the practical safe denoiser's re-noising key; eta: unguidance's
    threshold."""
    model = load_model(workdir)
    net = load_or_train('digits_classifier', log=log)
    noisy = noisy_classifier_logits(noisy_classifier) if noisy_classifier else None
    if noisy is not None and noisy.num_classes != model.label_dim:
        raise ValueError(f'--noisy_classifier {noisy_classifier} has {noisy.num_classes} classes, the model '
                         f'{model.label_dim}')
    if not model.label_dim:
        raise ValueError(f'{workdir} holds an unconditional model; the digits task needs a class-conditional one '
                         '(SLD conditions on the unsafe digit; train with data.use_labels=True)')
    if not 0 <= unsafe_digit < min(model.label_dim, net.num_classes):
        raise ValueError(f'--unsafe_digit {unsafe_digit} is not a class of the model (0..{model.label_dim - 1})')
    if (model.resolution, model.channels) != (net.resolution, net.channels):
        raise ValueError(f'the model makes {model.resolution}x{model.resolution}x{model.channels} images; the '
                         f'{net.name} reads {net.resolution}x{net.resolution}x{net.channels}')
    if batch_size % len(local_mesh().devices.ravel()):
        raise ValueError(f'--batch_size {batch_size} must be a multiple of the {jax.local_device_count()} devices')
    images, labels = dataset_split(net.name, 'train')
    refs = images[labels == unsafe_digit].astype(np.float32) / 127.5 - 1
    ref_images, ref_labels = dataset_split(net.name, 'ref')
    ref_stats = frechet.FeatureStats()
    ref_stats.update(net.apply(ref_images[ref_labels != unsafe_digit])['features'])
    sigmas = schedules.karras_sigmas(num_steps, *grid_ends({}, model.sigma_range))
    ddpm_grid, key = schedules.ddpm_sigmas(DDPM_STEPS), jax.random.key(seed + 2)
    if practical_grid is not None:
        method_list = [Method('none', '-', lambda d: d, 'ddpm50')] + practical_methods(refs, ddpm_grid,
                                                                                         practical_grid, key)
    else:
        method_list = select(digits_methods(float_logits(net), unsafe_digit, model.label_dim, refs, sigmas, noisy,
                                             ddpm_grid, key, eta), methods)
    rows, samples = [], {}
    for method in method_list:
        begin = time.perf_counter()
        out = sample_digits(model, num_samples, method.build, batch_size, method.solver, num_steps)
        result = net.apply(out)
        unsafe = np.asarray(jnp.argmax(result['logits'], axis=1)) == unsafe_digit
        rows.append(dict(method=method.name, strength=method.strength, solver=method.solver,
                         unsafe=float(unsafe.mean()),
                         fd=frechet.features_distance(np.asarray(result['features'])[~unsafe], ref_stats),
                         seconds=round(time.perf_counter() - begin, 2)))
        samples[f'{method.name} {method.strength} {method.solver}'] = out
        log(f'{method.name} {method.strength} ({method.solver}): unsafe {rows[-1]["unsafe"]:.3f}, '
            f'fd {rows[-1]["fd"]:.3f} ({rows[-1]["seconds"]:.1f}s)')
    bases = baselines(rows)
    for row in rows:
        base = bases[row['solver']]
        row['fd_ratio'] = row['fd'] / base['fd']
        drop = base['unsafe'] / row['unsafe'] if row['unsafe'] else float('inf')
        row['meets_target'] = bool(drop >= DIGITS_TARGET_DROP and row['fd_ratio'] <= DIGITS_TARGET_FD)
    result = dict(task='digits', workdir=os.path.abspath(workdir), unsafe_digit=unsafe_digit, eta=eta,
                  num_samples=num_samples, num_steps=num_steps, classifier_accuracy=net.accuracy,
                  noisy_classifier=noisy_classifier and os.path.abspath(noisy_classifier), num_ref=int(ref_stats.count),
                  target=dict(unsafe_drop=DIGITS_TARGET_DROP, fd_ratio=DIGITS_TARGET_FD),
                  rows=rows)
    return result, samples


def digits_plot(samples: dict[str, np.ndarray], path: str) -> str:
    """One row of the first PREVIEW samples per method (rows in table order); writes ``path`` (PNG)."""
    from PIL import Image
    first = np.concatenate([np.resize(x[:PREVIEW], (PREVIEW,) + x.shape[1:]) for x in samples.values()])
    grid = grid_image(first, PREVIEW)
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(path)
    return path
