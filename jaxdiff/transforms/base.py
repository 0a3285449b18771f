"""Transforms: a transform maps a denoiser to a denoiser.

``transform(denoiser) -> denoiser``. Plain denoisers stay plain under stateless transforms; a stateful
transform (built with :func:`stateful`) returns a :class:`~jaxdiff.denoiser.StatefulDenoiser` whose state
is ``(own_state, inner_state)`` and which every solver carries through its scan. :func:`chain` composes
transforms, the first one innermost: ``chain(a, b)(D) == b(a(D))``.
"""
from __future__ import annotations

from typing import Any, Callable

import jax

from jaxdiff.denoiser import AnyDenoiser, Denoiser, StatefulDenoiser, sigma_grid, with_sigma_grid

Transform = Callable[[AnyDenoiser], AnyDenoiser]
Call = Callable[[jax.Array, jax.Array, Any], jax.Array]


def chain(*transforms: Transform) -> Transform:
    """Compose transforms, first innermost; ``chain()`` is the identity."""

    def apply(denoiser: AnyDenoiser) -> AnyDenoiser:
        for t in transforms:
            denoiser = t(denoiser)
        return denoiser

    return apply


def transformed(denoiser: Denoiser) -> Denoiser:
    """``denoiser`` marked as a transform's output (:func:`is_transformed`)."""
    denoiser.jaxdiff_transformed = True
    return denoiser


def is_transformed(denoiser: AnyDenoiser) -> bool:
    """Whether a denoiser came out of a transform rather than being a model. Its batch rows may carry meaning (a
    condition it replaces while keeping None unconditional, per-sample arrays it closes over), so guidance does not
    stack several conditions into one call through it; a model treats zero labels as None, row by row."""
    return isinstance(denoiser, StatefulDenoiser) or getattr(denoiser, 'jaxdiff_transformed', False)


def stateless(combine: Callable[[Call, jax.Array, jax.Array, Any], jax.Array]) -> Transform:
    """Build a transform from ``combine(call, x, sigma, cond) -> x0_hat``, where ``call(x, sigma, cond)``
    evaluates the inner denoiser (as often as the method needs). Inner state, if any, is threaded
    through the calls in order."""

    def transform(inner: AnyDenoiser) -> AnyDenoiser:
        if not isinstance(inner, StatefulDenoiser):
            # A discrete-level denoiser's grid stays declared, so the EDM samplers still round onto it.
            return transformed(with_sigma_grid(lambda x, sigma, cond=None: combine(inner, x, sigma, cond),
                                               sigma_grid(inner)))

        def apply(x, sigma, cond, state):
            call, final = threaded(inner, state)
            return combine(call, x, sigma, cond), final()

        return StatefulDenoiser(inner.init, apply)

    return transform


def stateful(init: Callable[[jax.Array], Any],
             update: Callable[[Call, jax.Array, jax.Array, Any, Any], tuple[jax.Array, Any]]) -> Transform:
    """Build a stateful transform, optax-style.

    init(x (B, ...)) -> state (a NamedTuple of arrays);
    update(call, x, sigma, cond, state) -> (x0_hat, new_state), called once per evaluation of the
    transformed denoiser, ``call`` evaluating the inner denoiser.
    The resulting denoiser's state is ``(state, inner_state)``.
    """

    def transform(inner: AnyDenoiser) -> StatefulDenoiser:
        inner_sd = inner if isinstance(inner, StatefulDenoiser) else None

        def init_all(x):
            return init(x), (inner_sd.init(x) if inner_sd else ())

        def apply(x, sigma, cond, state):
            own, inner_state = state
            if inner_sd is None:
                out, own = update(inner, x, sigma, cond, own)
                return out, (own, inner_state)
            call, final = threaded(inner_sd, inner_state)
            out, own = update(call, x, sigma, cond, own)
            return out, (own, final())

        return StatefulDenoiser(init_all, apply)

    return transform


def threaded(inner: StatefulDenoiser, state):
    """A plain call for a stateful denoiser that threads its state through successive calls (during
    tracing, in program order) and a getter for the final state."""
    box = [state]

    def call(x, sigma, cond=None):
        out, box[0] = inner.apply(x, sigma, cond, box[0])
        return out

    return call, lambda: box[0]
