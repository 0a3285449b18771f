"""The transforms ``sample.py --guidance NAME:key=value,...`` reaches, by name.

Each entry builds a transform from its ``key=value`` arguments and a :class:`Context`: what the sampler knows
(the model's class count, the solver's grid and its DDIM eta) and how to load what a transform needs from disk (a
noise-conditional classifier from its train.py run, reference images from an ``.npz``). The loaders are passed in
by the sampling layer, so this package stays below the run loaders (DESIGN.md's layers). Classes are given as
class indices and become one-hot conditions of the model's ``label_dim``.

A classifier-based harm density (unguidance, negative classifier guidance) reads the noise-conditional classifier
at its lowest noise level, the solver's sigma_min, as a clean-image classifier of x0_hat.
"""
from __future__ import annotations

import difflib
import re
from typing import Any, Callable, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.transforms.attribute_switching import attribute_switch
from jaxdiff.transforms.autoguidance import autoguidance
from jaxdiff.transforms.base import Transform
from jaxdiff.transforms.cfg import cfg
from jaxdiff.transforms.classifier import LogitsFn, class_log_prob, classifier_guidance
from jaxdiff.transforms.densities import classifier_density
from jaxdiff.transforms.guided import GuidanceInterval, parse_interval
from jaxdiff.transforms.safe_denoiser import calibrate_threshold, practical_safe_denoiser
from jaxdiff.transforms.safe_guidance import safe_classifier_guidance
from jaxdiff.transforms.sld import SLDConfig, sld
from jaxdiff.transforms.unguidance import TINY, negative_classifier_guidance, unguidance


class Context(NamedTuple):
    """What a registered transform may use besides its own arguments."""
    label_dim: int                              # the model's classes (0: unconditional)
    sigma_min: float                            # the solver's grid ends: weight schedules measure progress on them
    sigma_max: float
    plan: Callable[[], Any]                     # () -> the solver's jaxdiff.solvers.plan.EvaluationPlan (its
                                                #   .grid(): the sigma grid (N+1,), decreasing, ending in 0)
    ddim_eta: float                             # the solver's DDIM eta (ddpm 1, ddim its eta, Euler / Heun 0)
    load_classifier: Callable[[str], LogitsFn]  # run dir -> logits_fn(x, sigma) (B, K), with .num_classes
    load_images: Callable[[str], np.ndarray]    # .npz path -> (M, H, W, C) float images in [-1, 1]
    load_guide: Callable[[str, Any], Callable]  # (run dir, step or None) -> the guide's denoiser D(x, sigma, cond)


class Entry(NamedTuple):
    """A registered transform: ``build(kwargs, context) -> Transform``, a one-line usage naming every key it takes
    (``key=``), and ``extra_keys`` it takes beyond those (e.g. SLD's config fields)."""
    build: Callable[[dict, Context], Transform]
    usage: str
    extra_keys: tuple[str, ...] = ()

    def keys(self) -> list[str]:
        """Every key the transform takes."""
        return list(dict.fromkeys(re.findall(r'(\w+)=', self.usage) + list(self.extra_keys)))


Classes = Union[int, Sequence[int]]


def _classes(value: Classes, name: str, count: int) -> list[int]:
    classes = [value] if isinstance(value, int) else list(value)
    if not classes or not all(isinstance(c, int) and 0 <= c < count for c in classes):
        raise ValueError(f'{name}={value!r} must be a class index or a tuple of them in 0..{count - 1}')
    return classes


def _one_hot(value: int, name: str, ctx: Context) -> jax.Array:
    """(1, label_dim) one-hot row of class ``value`` (broadcast over the batch by the transforms)."""
    if not ctx.label_dim:
        raise ValueError(f'{name} needs a class-conditional model; this one is unconditional')
    if not isinstance(value, int):
        raise ValueError(f'{name}={value!r} must be one class index in 0..{ctx.label_dim - 1}')
    return jax.nn.one_hot(jnp.array(_classes(value, name, ctx.label_dim)), ctx.label_dim)


def _classifier(ctx: Context, run: str) -> LogitsFn:
    if not isinstance(run, str):
        raise ValueError(f'run={run!r} must be the path of a noise-conditional classifier train.py run')
    return ctx.load_classifier(run)


def _clean_density(ctx: Context, run: str, unsafe: Classes) -> Callable:
    """p_h(x0) (B,): the classifier's probability of the unsafe classes at the solver's sigma_min."""
    logits = _classifier(ctx, run)
    return classifier_density(lambda x0: logits(x0, ctx.sigma_min), _classes(unsafe, 'unsafe', logits.num_classes))


def _interval(kw: dict, ctx: Context) -> Optional[GuidanceInterval]:
    """interval=LO:HI -> the interval decided per solver step (the reference code's form), or None."""
    text = kw.pop('interval', None)
    return None if text is None else GuidanceInterval(*parse_interval(text), ctx.plan().step_sigmas)


def _cfg(kw: dict, ctx: Context) -> Transform:
    if not ctx.label_dim:
        raise ValueError('cfg needs a class-conditional model; this one is unconditional')
    if 'weight' not in kw:
        raise ValueError('cfg needs weight=W (1 = the conditional model)')
    kw = dict(kw)
    negative = kw.pop('negative', None)
    negative = None if negative is None else _one_hot(negative, 'cfg negative', ctx)
    return cfg(float(kw.pop('weight')), negative=negative, sigma_min=ctx.sigma_min, sigma_max=ctx.sigma_max,
               interval=_interval(kw, ctx), **kw)


def _autoguidance(kw: dict, ctx: Context) -> Transform:
    kw = dict(kw)
    if 'guide' not in kw or 'weight' not in kw:
        raise ValueError('autoguidance needs guide=RUN_DIR (the guide model) and weight=W (1 = the main model)')
    guide = ctx.load_guide(str(kw.pop('guide')), kw.pop('step', None))
    return autoguidance(guide, float(kw.pop('weight')), interval=_interval(kw, ctx), **kw)


def _classifier_guidance(kw: dict, ctx: Context) -> Transform:
    kw = dict(kw)
    logits = _classifier(ctx, kw.pop('run', None))
    if logits.num_classes != ctx.label_dim:
        raise ValueError(f'classifier run has {logits.num_classes} classes, the model {ctx.label_dim}: classifier '
                         'guidance reads the target class from the model\'s label')
    return classifier_guidance(class_log_prob(logits, logits.num_classes), kw.pop('scale', 1.0), **kw)


def _safe_classifier(kw: dict, ctx: Context) -> Transform:
    kw = dict(kw)
    logits = _classifier(ctx, kw.pop('run', None))
    unsafe = _classes(kw.pop('unsafe', None), 'unsafe', logits.num_classes)
    return safe_classifier_guidance(logits, unsafe, logits.num_classes, **kw)


def _unguidance(kw: dict, ctx: Context) -> Transform:
    kw = dict(kw)
    harm = _clean_density(ctx, kw.pop('run', None), kw.pop('unsafe', None))
    if kw.pop('seed_update', False):
        kw.setdefault('ddim_eta', ctx.ddim_eta)
        kw['grid'] = ctx.plan().grid()
    return unguidance(harm, sigma_min=ctx.sigma_min, sigma_max=ctx.sigma_max, **kw)


def _negative_classifier(kw: dict, ctx: Context) -> Transform:
    kw = dict(kw)
    harm = _clean_density(ctx, kw.pop('run', None), kw.pop('unsafe', None))
    return negative_classifier_guidance(lambda x0: jnp.log(jnp.maximum(harm(x0), TINY)), **kw)


def _sld(kw: dict, ctx: Context) -> Transform:
    kw = dict(kw)
    concept = _one_hot(kw.pop('concept', None), 'sld concept', ctx)
    return sld(concept, sigmas=ctx.plan().grid(), **kw)


def _safe_denoiser(kw: dict, ctx: Context) -> Transform:
    kw = dict(kw)
    refs = kw.pop('refs', None)
    if not isinstance(refs, str):
        raise ValueError('safe_denoiser needs refs=FILE.npz: reference images of the unsafe content')
    refs = ctx.load_images(refs)
    margin, seed = kw.pop('margin', None), kw.pop('seed', 0)
    bandwidth = float(kw.pop('bandwidth', 3.15))
    grid = ctx.plan().grid()
    threshold = float('-inf') if margin is None else calibrate_threshold(
        refs, bandwidth, float(grid[grid > 0][-1]), jax.random.key(seed + 1), margin=float(margin))
    kw.setdefault('ddim_eta', ctx.ddim_eta)
    return practical_safe_denoiser(refs, bandwidth=bandwidth, threshold=threshold, grid=grid,
                                   key=jax.random.key(seed), **kw)


def _attribute_switch(kw: dict, ctx: Context) -> Transform:
    kw = dict(kw)
    if 'tau' not in kw:
        raise ValueError('attribute_switch needs tau=SIGMA (the switch level, e.g. from eval.fairness)')
    s0, s1 = _one_hot(kw.pop('from', None), 'from', ctx), _one_hot(kw.pop('to', None), 'to', ctx)
    return attribute_switch(s0, s1, float(kw.pop('tau')), **kw)


REGISTRY: dict[str, Entry] = {
    'cfg': Entry(_cfg, 'classifier-free guidance: weight=W [schedule=NAME c= a= negative=CLASS negative_weight= '
                       'negative_mode=subtract|replace interval=LO:HI batched=True]'),
    'autoguidance': Entry(_autoguidance, 'autoguidance by a worse model: guide=RUN_DIR weight=W [step=K (the guide\'s '
                                         'checkpoint) interval=LO:HI]'),
    'classifier': Entry(_classifier_guidance, 'classifier guidance toward the model\'s label: run=DIR (noisy '
                                              'classifier) [scale=1]'),
    'safe_classifier': Entry(_safe_classifier, 'safe classifier guidance (Bayes\' rule on P(safe | x_t)): run=DIR '
                                               'unsafe=CLASS|(C,..) [scale=1]'),
    'unguidance': Entry(_unguidance, 'unguidance (CDTC): run=DIR unsafe=CLASS|(C,..) [gamma=75 eta=0.23 '
                                     'gamma_schedule=NAME seed_update=False ddim_eta=]'),
    'negative_classifier': Entry(_negative_classifier, 'negative classifier guidance: run=DIR unsafe=CLASS|(C,..) '
                                                       'scale=S'),
    'sld': Entry(_sld, 'Safe Latent Diffusion: concept=CLASS [preset=MEDIUM guidance_scale=7.5 SLDConfig fields]',
                 SLDConfig._fields),
    'safe_denoiser': Entry(_safe_denoiser, 'the official code\'s practical safe denoiser: refs=FILE.npz [scale=0.33 '
                                           'bandwidth=3.15 window_steps=11 margin=M (gate) seed=0 ddim_eta=]'),
    'attribute_switch': Entry(_attribute_switch, 'attribute switching: from=CLASS to=CLASS tau=SIGMA'),
}


def check_spec(name: str, kwargs: dict[str, Any]) -> None:
    """ValueError (one line) for an unknown transform name or a key it does not take ('did you mean')."""
    if name not in REGISTRY:
        raise ValueError(f'unknown transform {name!r}: use one of {", ".join(REGISTRY)}')
    keys = REGISTRY[name].keys()
    for key in kwargs:
        if key not in keys:
            near = difflib.get_close_matches(key, keys, n=1)
            hint = f' (did you mean {near[0]!r}?)' if near else ''
            raise ValueError(f'transform {name}: unknown key {key!r}{hint}; it takes {", ".join(keys)}')


def build(name: str, kwargs: dict[str, Any], ctx: Context) -> Transform:
    """REGISTRY[name]'s transform from ``kwargs``; ValueError naming the problem for an unknown name or argument."""
    check_spec(name, kwargs)
    try:
        return REGISTRY[name].build(kwargs, ctx)
    except (TypeError, ValueError) as e:  # TypeError: an argument the transform does not take
        raise ValueError(f'transform {name}: {e} (usage: {name}:{REGISTRY[name].usage.split(": ", 1)[-1]})') from e


def usage() -> str:
    """One line per registered transform, for --helpfull."""
    return '\n'.join(f'  {name}: {entry.usage}' for name, entry in REGISTRY.items())
