"""Solvers and denoiser transforms by name, with their options, as sample.py selects them from flags.

Every sampler of :mod:`jaxdiff.solvers` is listed in ``SOLVERS``; its keyword options (num_steps, S_churn, eta,
sde, snr, ...) are discovered from its signature, so a new solver keyword becomes a sample.py flag without
further code. An option the chosen solver does not take is an error, not silently ignored. Options left unset
take the solver's defaults, except sigma_min / sigma_max, which are clipped to the range the model's
preconditioning supports (as EDM's generate.py does); a solver whose default range is None (``ablation``: it
depends on the discretization) gets it from ``_SIGMA_DEFAULTS`` before the clipping.

Transforms are written ``name:key=value,key=value`` (values as Python literals), e.g. ``cfg:weight=2,
schedule=linear``; a bare number ``2`` means ``cfg:weight=2``. Several transforms compose left to right with
:func:`jaxdiff.guidance.chain` (the first is applied to the model first).
"""
from __future__ import annotations

import ast
import inspect
import math
from typing import Any, Callable, Mapping, Sequence

import jax.numpy as jnp

from jaxdiff import guidance, solvers
from jaxdiff.solvers import ablation

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


def resolve_solver(name: str, options: Mapping[str, Any], sigma_range: tuple[float, float]) -> dict[str, Any]:
    """The full keyword set for solver ``name``: ``options`` (the ones the user set) over its defaults.

    sigma_range: the model's (sigma_min, sigma_max); unset sigma_min / sigma_max defaults are clipped into it.
    Raises ValueError for an option the solver does not take.
    """
    defaults = solver_defaults(name)
    unused = sorted(set(options) - set(defaults))
    if unused:
        raise ValueError(f'solver {name!r} takes no option {", ".join(unused)} (it takes: '
                         f'{", ".join(sorted(defaults))})')
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
    return resolved


def make_solver(name: str, resolved: Mapping[str, Any]) -> Callable:
    """sampler(denoiser, latents (B,...), keys (B,) per-sample, cond) -> samples (B,...) with ``resolved`` options."""
    fn = _solver(name)
    kwargs = dict(resolved)
    return lambda denoiser, latents, key, cond: fn(denoiser, latents, key=key, cond=cond, **kwargs)


def parse_transform(spec: str) -> tuple[str, dict[str, Any]]:
    """'cfg:weight=2,schedule=linear' -> ('cfg', {'weight': 2, 'schedule': 'linear'}); '2' -> ('cfg', {'weight': 2})."""
    spec = spec.strip()
    value = parse_value(spec)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return 'cfg', {'weight': float(value)}
    name, _, rest = spec.partition(':')
    kwargs = {}
    for item in filter(None, (part.strip() for part in rest.split(','))):
        key, eq, text = item.partition('=')
        if not eq:
            raise ValueError(f'transform {spec!r}: expected key=value, got {item!r}')
        kwargs[key.strip()] = parse_value(text.strip())
    return name.strip(), kwargs


def _cfg(kwargs: dict, label_dim: int, sigma_min: float, sigma_max: float) -> guidance.Transform:
    """Classifier-free guidance; ``negative`` is a class index (one-hot, broadcast over the batch)."""
    if not label_dim:
        raise ValueError('cfg needs a class-conditional model; this one is unconditional')
    if 'weight' not in kwargs:
        raise ValueError('cfg needs weight=W (1 = the conditional model)')
    kwargs = dict(kwargs)
    negative = kwargs.pop('negative', None)
    if negative is not None:
        if not isinstance(negative, int) or not 0 <= negative < label_dim:
            raise ValueError(f'cfg negative={negative!r} must be a class index in 0..{label_dim - 1}')
        negative = jnp.eye(label_dim, dtype=jnp.float32)[negative][None]
    return guidance.cfg(float(kwargs.pop('weight')), negative=negative, sigma_min=sigma_min, sigma_max=sigma_max,
                        **kwargs)


TRANSFORMS: dict[str, Callable[..., guidance.Transform]] = {'cfg': _cfg}


def make_transform(specs: Sequence[str], label_dim: int, sigma_min: float,
                   sigma_max: float) -> tuple[guidance.Transform | None, list[dict]]:
    """(the chained transform or None, [{'name', **kwargs}] for the manifest) from transform specs.

    sigma_min / sigma_max: the solver's grid ends (weight schedules measure progress on them).
    """
    built, described = [], []
    for spec in specs:
        name, kwargs = parse_transform(spec)
        if name not in TRANSFORMS:
            raise ValueError(f'unknown transform {name!r} in {spec!r}: use one of {", ".join(TRANSFORMS)}')
        try:
            built.append(TRANSFORMS[name](kwargs, label_dim, sigma_min, sigma_max))
        except TypeError as e:
            raise ValueError(f'transform {spec!r}: {e}') from e
        described.append({'name': name, **kwargs})
    if not built:
        return None, []
    return guidance.chain(*built), described


def grid_ends(resolved: Mapping[str, Any], sigma_range: tuple[float, float]) -> tuple[float, float]:
    """(sigma_min, sigma_max) a transform's schedule should use: the solver's, else the model's (finite) range."""
    lo = resolved.get('sigma_min', sigma_range[0])
    hi = resolved.get('sigma_max', sigma_range[1])
    return float(lo), float(hi if math.isfinite(hi) else 80.0)
