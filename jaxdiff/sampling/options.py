"""Solvers and denoiser transforms by name, with their options, as sample.py selects them from flags.

Every sampler of :mod:`jaxdiff.solvers` is listed in ``SOLVERS``; its keyword options (num_steps, S_churn, eta,
sde, snr, ...) are discovered from its signature, so a new solver keyword becomes a sample.py flag without
further code. An option the chosen solver does not take is an error, not silently ignored. Options left unset
take the solver's defaults, except sigma_min / sigma_max, which are clipped to the range the model's
preconditioning supports (as EDM's generate.py does); a solver whose default range is None (``ablation``: it
depends on the discretization) gets it from ``_SIGMA_DEFAULTS`` before the clipping.

Transforms are written ``name:key=value,key=value`` (values as Python literals), e.g. ``cfg:weight=2,
schedule=linear``, any name of :data:`jaxdiff.transforms.registry.REGISTRY`; a bare number ``2`` means
``cfg:weight=2``. Several transforms compose left to right with
:func:`jaxdiff.transforms.chain` (the first is applied to the model first).
"""
from __future__ import annotations

import ast
import functools
import inspect
import math
import os
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

from jaxdiff import config_ranges as ranges
from jaxdiff.cli import UsageError
from jaxdiff import solvers, transforms
from jaxdiff.data.sources import load_npz
from jaxdiff.sampling.model import load_model, noisy_classifier_logits
from jaxdiff.solvers import ablation
from jaxdiff.solvers.plan import evaluation_plan
from jaxdiff.transforms import registry

SOLVERS: dict[str, Callable] = {
    'edm': solvers.edm_sampler,
    'euler': solvers.euler_sampler,
    'dpm++2m': solvers.dpm_solver_pp_2m_sampler,
    'ddim': solvers.ddim_sampler,
    'ddpm': solvers.ddpm_sampler,
    'euler_maruyama': solvers.euler_maruyama_sampler,
    'pc': solvers.pc_sampler,
    'pf_ode': solvers.probability_flow_sampler,
    'langevin': solvers.annealed_langevin_sampler,
    'ablation': solvers.ablation_sampler,
}
# Solvers whose sigma_min / sigma_max default to None, resolved from their other options: name -> fn(options) ->
# (sigma_min, sigma_max) (the ablation sampler's defaults depend on its discretization, as in the reference).
_SIGMA_DEFAULTS: dict[str, Callable[[Mapping[str, Any]], tuple[float, float]]] = {
    'ablation': lambda o: ablation.default_sigma_range(o['discretization'], o['epsilon_s']),
}
# Arguments sample.py supplies itself (sigmas: grids come from the options, not from a flag).
_SUPPLIED = ('denoiser', 'latents', 'key', 'cond', 'sigmas')


def solver_defaults(name: str) -> dict[str, Any]:
    """{option: default} of solver ``name`` (its keyword arguments other than the ones sample.py supplies)."""
    return {p.name: p.default for p in inspect.signature(_solver(name)).parameters.values()
            if p.name not in _SUPPLIED and p.default is not inspect.Parameter.empty}


def all_options() -> dict[str, dict[str, Any]]:
    """{option: {solver: default}} over every solver: the flags sample.py defines."""
    out: dict[str, dict[str, Any]] = {}
    for name in SOLVERS:
        for option, default in solver_defaults(name).items():
            out.setdefault(option, {})[name] = default
    return out


def parse_value(text: str) -> Any:
    """A flag value as a Python literal (number, bool, None, tuple) or, failing that, the string itself."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _solver(name: str) -> Callable:
    if name not in SOLVERS:
        raise ValueError(f'unknown solver {name!r}: use one of {", ".join(SOLVERS)}')
    return SOLVERS[name]


# The numeric solver options' valid values (checked before anything is written or sampled); None = unset.
OPTION_RANGES: dict[str, ranges.Rule] = {
    **{k: ranges.COUNT for k in ('num_steps', 'n_steps', 'n_steps_each', 'num_levels', 'M')},
    **{k: ranges.optional(ranges.POSITIVE) for k in ('sigma_min', 'sigma_max', 'rho', 'S_noise', 'snr', 'step_lr',
                                                     'alpha', 'beta_min', 'beta_max', 'C_1', 'C_2', 'epsilon_s',
                                                     'eps_t')},
    **{k: ranges.optional(ranges.NON_NEGATIVE) for k in ('S_churn', 'S_min', 'S_max', 'eta')},
}


def _check_taken(name: str, options: Mapping[str, Any]) -> None:
    """ValueError (one line) for an option solver ``name`` does not take."""
    defaults = solver_defaults(name)
    unused = sorted(set(options) - set(defaults))
    if unused:
        raise UsageError(f'solver {name!r} takes no option {", ".join(unused)} (it takes: '
                         f'{", ".join(sorted(defaults))})')


def check_ranges(name: str, resolved: Mapping[str, Any]) -> None:
    """ValueError (one line naming the option, its value and the valid range) for a value no sampler can use."""
    for key, value in resolved.items():
        rule = OPTION_RANGES.get(key)
        if rule is not None and not rule.ok(value):
            raise UsageError(f'--{key}={value} is out of range for solver {name!r}: it must be {rule.text}')
    lo, hi = resolved.get('sigma_min'), resolved.get('sigma_max')
    if lo is not None and hi is not None and not lo < hi:
        raise UsageError(f'--sigma_min={lo} must be below --sigma_max={hi} (solver {name!r})')


def resolve_solver(name: str, options: Mapping[str, Any], sigma_range: tuple[float, float]) -> dict[str, Any]:
    """The full keyword set for solver ``name``: ``options`` (the ones the user set) over its defaults.

    sigma_range: the model's (sigma_min, sigma_max); unset sigma_min / sigma_max defaults are clipped into it.
    Raises ValueError for an option the solver does not take or a value out of its range (:data:`OPTION_RANGES`).
    """
    defaults = solver_defaults(name)
    _check_taken(name, options)
    resolved = dict(defaults)
    if name in _SIGMA_DEFAULTS:
        span = dict(zip(('sigma_min', 'sigma_max'), _SIGMA_DEFAULTS[name]({**defaults, **options})))
        resolved.update({k: v for k, v in span.items() if resolved.get(k) is None})
    lo, hi = sigma_range
    if 'sigma_min' in resolved and 'sigma_min' not in options:
        resolved['sigma_min'] = max(resolved['sigma_min'], lo)
    if 'sigma_max' in resolved and 'sigma_max' not in options:
        resolved['sigma_max'] = min(resolved['sigma_max'], hi)
    resolved.update(options)
    check_ranges(name, resolved)
    return resolved


def make_solver(name: str, resolved: Mapping[str, Any]) -> Callable:
    """sampler(denoiser, latents (B,...), keys (B,) per-sample, cond) -> samples (B,...) with ``resolved`` options."""
    fn = _solver(name)
    kwargs = dict(resolved)
    return lambda denoiser, latents, key, cond: fn(denoiser, latents, key=key, cond=cond, **kwargs)


def _top_level_split(text: str) -> list[str]:
    """``text`` split at the commas outside brackets and quotes: 'a=(1,2),b="x,y"' -> ['a=(1,2)', 'b="x,y"']."""
    parts, depth, quote, start = [], 0, None, 0
    for i, ch in enumerate(text):
        if quote:
            quote = None if ch == quote else quote
        elif ch in '\'"':
            quote = ch
        elif ch in '([{':
            depth += 1
        elif ch in ')]}':
            depth -= 1
        elif ch == ',' and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    return parts + [text[start:]]


def parse_transform(spec: str) -> tuple[str, dict[str, Any]]:
    """'cfg:weight=2,schedule=linear' -> ('cfg', {'weight': 2, 'schedule': 'linear'}); '2' -> ('cfg', {'weight': 2})."""
    spec = spec.strip()
    value = parse_value(spec)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return 'cfg', {'weight': float(value)}
    name, _, rest = spec.partition(':')
    kwargs = {}
    for item in filter(None, (part.strip() for part in _top_level_split(rest))):
        key, eq, text = item.partition('=')
        if not eq:
            raise ValueError(f'transform {spec!r}: expected key=value, got {item!r}')
        kwargs[key.strip()] = parse_value(text.strip())
    return name.strip(), kwargs


def check_flags(solver: str, options: Mapping[str, Any], specs: Sequence[str]) -> None:
    """What can be checked of sample.py's sampling flags before a model is loaded (command-line errors): the solver
    name, the options it takes and their ranges, each ``--guidance`` spec's syntax, transform name and keys.
    ValueError (one line) otherwise; :func:`resolve_solver` and :func:`make_transform` check the rest."""
    _check_taken(solver, options)
    check_ranges(solver, options)
    for spec in specs:
        try:
            registry.check_spec(*parse_transform(spec))
        except ValueError as e:
            raise ValueError(f'--guidance {spec!r}: {e}') from e


def make_transform(specs: Sequence[str], label_dim: int, solver: str, resolved: Mapping[str, Any],
                   sigma_range: tuple[float, float], image_shape: Optional[tuple[int, ...]] = None
                   ) -> tuple[transforms.Transform | None, list[dict]]:
    """(the chained transform or None, [{'name', **kwargs}] for the manifest) from transform specs.

    Names and arguments: :data:`jaxdiff.transforms.registry.REGISTRY`. solver, resolved: the solver and its full
    options (:func:`resolve_solver`), whose evaluation plan and DDIM eta the transforms that follow the trajectory
    use; sigma_range: the model's; image_shape: the model's (H, W, C), which a guide model must share. Raises
    :class:`jaxdiff.cli.UsageError` naming the spec for an unknown name or argument, or one the model cannot take.
    """
    plan = functools.cache(lambda: evaluation_plan(make_solver(solver, resolved)))
    ctx = registry.Context(label_dim, *grid_ends(resolved, sigma_range), plan=plan,
                           ddim_eta=DDIM_ETA.get(solver, lambda o: 0.0)(resolved),
                           load_classifier=noisy_classifier_logits, load_images=reference_images,
                           load_guide=functools.partial(guide_denoiser, label_dim=label_dim, image_shape=image_shape))
    built, described = [], []
    for spec in specs:
        name, kwargs = parse_transform(spec)
        try:
            built.append(registry.build(name, kwargs, ctx))
        except ValueError as e:
            raise UsageError(f'--guidance {spec!r}: {e}') from e
        described.append({'name': name, **kwargs})
    if not built:
        return None, []
    return transforms.chain(*built), described


def guide_denoiser(path: str, step: Optional[int], *, label_dim: int,
                   image_shape: Optional[tuple[int, ...]] = None) -> Callable:
    """The denoiser D(x, sigma, cond) of a guide model (a train.py run or converted checkpoint; its EMA weights at
    ``step``, None = the newest), for a main model with ``label_dim`` classes making ``image_shape`` images. An
    unconditional guide is given no labels; a conditional one must have the main model's classes."""
    guide = load_model(path, step=None if step is None else int(step))
    shape = (guide.resolution, guide.resolution, guide.channels)
    if image_shape is not None and tuple(image_shape) != shape:
        raise ValueError(f'guide {path} makes {"x".join(map(str, shape))} images, the model '
                         f'{"x".join(map(str, image_shape))}: a guide is a worse model of the same data')
    if guide.label_dim and guide.label_dim != label_dim:
        raise ValueError(f'guide {path} has {guide.label_dim} classes, the model {label_dim}: give a guide trained '
                         'with the same labels, or an unconditional one')
    denoiser = guide.denoiser(guide.variables)
    return denoiser if guide.label_dim else (lambda x, sigma, cond=None: denoiser(x, sigma, None))


# The DDIM eta each solver's step has (DDPM is DDIM at eta 1; Euler and Heun's predictor at eta 0): the exact seed
# update of unguidance and the practical safe denoiser assume it.
DDIM_ETA: dict[str, Callable[[Mapping[str, Any]], float]] = {'ddim': lambda o: float(o['eta']),
                                                             'ddpm': lambda o: 1.0}


def solver_grid(sampler: Callable) -> np.ndarray:
    """The sigma grid (N+1,) a sampler (:func:`make_solver`'s) evaluates, decreasing, ending in 0."""
    return evaluation_plan(sampler).grid()


def reference_images(path: str) -> np.ndarray:
    """(M, H, W, C) float32 images in [-1, 1] from an .npz with ``images`` uint8 (the safe denoiser's references)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f'reference images {path!r} not found: save them with np.savez(path, images=uint8 '
                                'array (M, H, W, C))')
    images, _ = load_npz(path)
    return images.astype(np.float32) / 127.5 - 1.0


def grid_ends(resolved: Mapping[str, Any], sigma_range: tuple[float, float]) -> tuple[float, float]:
    """(sigma_min, sigma_max) a transform's schedule should use: the solver's, else the model's (finite) range."""
    lo = resolved.get('sigma_min', sigma_range[0])
    hi = resolved.get('sigma_max', sigma_range[1])
    return float(lo), float(hi if math.isfinite(hi) else 80.0)
