"""Fair sampling by attribute switching (Choi et al., "Fair Sampling in Diffusion Models through Switching
Mechanism", AAAI 2024) and the balanced error rate that measures it.

A model conditioned on a binary sensitive attribute s is sampled with s = s0 while the noise level is high
and with s = s1 once it is low. Coarse features are laid down by the s0 phase, the rest by the s1 phase;
at the right transition point the sample carries as much of one attribute as of the other, so its
attribute can no longer be predicted from the attribute it was started with.

The transition point is stated as a noise level ``tau_sigma`` (not a step index), so the same transform
works with every solver and grid; :func:`switch_sigma` converts a step index of a grid into one.

:func:`tau_search` scores each candidate transition by the paper's criterion D(tau) (:func:`switch_curve`).
:func:`attribute_mixture` builds 2-D test beds with exact denoisers (:func:`mirror_mixture` is the symmetric one).

Fairness (the paper's Definition 1): a data set (X, S) is epsilon-fair if every classifier f has
BER(f(X), S) >= epsilon, with BER = (P(f = 0 | S = 1) + P(f = 1 | S = 0)) / 2; 0.5 is perfectly fair.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import toy
from jaxdiff.denoiser import as_stateful, eps_from_x0, per_sample_sigma
from jaxdiff.transforms.base import Transform, stateless


def switch_sigma(sigmas, index) -> jax.Array:
    """The tau_sigma that makes steps ``index, index + 1, ...`` of a grid use s1 and earlier ones s0.

    sigmas: (N+1,) decreasing grid; index: int in [0, N] (traced or not).
    Returns () float32: +inf for index 0 (s1 throughout), else the geometric mean of sigmas[index - 1] and
    sigmas[index]. A value strictly between two grid points (rather than sigmas[index] itself) keeps the
    assignment unambiguous under float32 rounding; Heun's second evaluation of step index - 1 (at
    sigmas[index]) then also uses s1, consistently with its step's end point. EDM churn evaluates at a
    raised sigma_hat > sigma_i, which can cross the threshold; pick the threshold with that in mind.
    """
    sig = jnp.asarray(sigmas, jnp.float32)
    ext = jnp.concatenate([jnp.full((1,), jnp.inf, jnp.float32), sig])
    index = jnp.asarray(index, jnp.int32)
    return jnp.sqrt(ext[index] * ext[index + 1])


def _select(first: jax.Array, a, b):
    """Per-sample choice between two condition pytrees: a where ``first`` (() or (B,) bool), else b.

    Leaves without a batch axis (or with a leading axis of 1) are broadcast, so one condition can serve
    the whole batch.
    """

    def pick(u, v):
        u, v = jnp.asarray(u), jnp.asarray(v)
        trailing = max(u.ndim, v.ndim, 1) - 1
        mask = first.reshape(first.shape + (1,) * trailing) if first.ndim else first
        return jnp.where(mask, u, v)

    return jax.tree.map(pick, a, b)


def attribute_switch(s0: Any, s1: Any, tau_sigma) -> Transform:
    """Attribute switching: condition on s0 while sigma > tau_sigma, on s1 once sigma <= tau_sigma.

    s0, s1: conditions with the inner denoiser's cond structure (e.g. (B, num_classes) one-hot rows, or
        (1, num_classes) rows broadcast to the batch). They *replace* the cond the transformed denoiser is
        called with, so they must carry everything else the model is conditioned on (content class,
        prompt) too; per-sample rows let each sample have its own pair.
    tau_sigma: the transition noise level, () (a Python float or traced scalar); see :func:`switch_sigma`.
    A call with cond None passes None through unchanged: CFG's unconditional branch stays unconditional,
    so ``chain(attribute_switch(...), cfg(w))`` (switch inside CFG) and ``chain(cfg(w),
    attribute_switch(...))`` (switch outside) give the same guided denoiser for any non-None cond.
    Shapes: x (B, ...), sigma () or (B,) (compared per sample); one inner evaluation per call.
    """

    def combine(call, x, sigma, cond):
        if cond is None:
            return call(x, sigma, None)
        # jnp.where rather than lax.cond: the choice is per sample and the inner model runs once either way.
        return call(x, sigma, _select(jnp.asarray(sigma) > tau_sigma, s0, s1))

    return stateless(combine)


def ddpm_betas(sigmas, sigma_data: float = 1.0, beta_max: float | None = None) -> np.ndarray:
    """DDPM's beta of each step of an EDM grid, (N,) float64 from sigmas (N+1,).

    With data scaled to unit variance (x / sigma_data), the VP process has alpha_bar = sigma_data^2 /
    (sigma_data^2 + sigma^2), and a DDPM step from alpha_bar_t to alpha_bar_{t-1} has beta_t =
    1 - alpha_bar_t / alpha_bar_{t-1}. Step i goes from sigma_i to sigma_{i+1}, so
    beta_i = (sigma_i^2 - sigma_{i+1}^2) / (sigma_data^2 + sigma_i^2). sigma_data = 1 is the DDPM embedding
    the library's DDIM/DDPM samplers use (x_vp = x / sqrt(1 + sigma^2)). beta_max (e.g. 0.999, DDPM's
    cosine-schedule guard) caps every beta; None leaves them as they are.
    """
    sig = np.asarray(sigmas, np.float64)
    beta = (sig[:-1] ** 2 - sig[1:] ** 2) / (sigma_data ** 2 + sig[:-1] ** 2)
    return beta if beta_max is None else np.minimum(beta, beta_max)


class TauSearch(NamedTuple):
    """Result of :func:`tau_search`.

    index: () int32 minimiser of the curve, in [0, N] (steps index.. use s1).
    sigma: () float32 the matching tau_sigma (:func:`switch_sigma`), to hand to :func:`attribute_switch`.
    curve: (N+1,) float32 D(tau) for every tau.
    """

    index: jax.Array
    sigma: jax.Array
    curve: jax.Array


# The criteria of :func:`switch_curve`: 'batch' is the reference's (norm across the batch), 'sample' the per-sample one.
NORMS = ('batch', 'sample')


def tau_search(denoiser, latents, sigmas, s0, s1, *, sigma_data: float = 1.0, beta_max: float | None = 0.999,
               norm: str = 'batch') -> TauSearch:
    """The paper's transition-point criterion D(tau), evaluated on an EDM sigma grid.

    Two deterministic chains start from the same x_T = latents * sigmas[0]: chain k runs Euler steps of
    the PF-ODE (deterministic DDIM) with condition s_k throughout. Per step i (sigma_i -> sigma_{i+1})

        d_i = beta_i * (eps(x_i^0, s0) - eps(x_i^1, s1)),          eps = (x - D(x, sigma_i, s)) / sigma_i,

    with beta_i from :func:`ddpm_betas` (capped at beta_max), and D(tau) = :func:`switch_curve` of the d_i
    for every split tau in [0, N] (steps i < tau are the high-noise s0 phase). Returns the argmin as a step
    index and as tau_sigma.

    The reference (the authors' "Tau searching" notebook) runs a 1000-step deterministic DDIM on the cosine
    schedule with betas min(1 - alpha_bar(t+1) / alpha_bar(t), 0.999), stores beta_t * (eps(x_t^0, 0) -
    eps(x_t^1, 1)) with eps the network's own prediction, and scores each tau of range(0, 1000, 10) by
    mean_pixels || sum_{t < tau} d_t - sum_{t >= tau} d_t ||, the norm taken across the batch (256) for
    each pixel: ``norm='batch'`` here (the notebook plots the curve and leaves the pick to the eye; this
    takes the argmin). This maps DDPM's timestep t to the grid step with the same
    alpha_bar ratio (eps is the same quantity in DDPM's scaled and EDM's unscaled variables), and the
    sum over t < tau (low noise) to the sum over i >= tau; the norm is symmetric in the two sums, so the
    curves agree. Every split of the sampler's grid is scored (the reference's step-10 grid is a
    subsample of its 1000 steps). Differences kept on purpose: the chains use the sampler's unclipped
    denoiser (the reference clamps its DDIM chains' x0 prediction to the image range [-1, 1]), and the
    conditions may differ per sample (the reference runs s0 = 0, s1 = 1 for the whole batch; swapping
    a sample's pair negates its d_i exactly, which neither norm sees).

    ``norm='sample'`` is this library's earlier criterion (|| . || over each sample's elements, then the
    mean over the batch). It stays as an option because it measured better on three of the five 2-D tasks
    of ``eval.fairness`` (switched rate at the minimiser, prior 0.75, fair 0.5: mirror 0.392 against the
    reference criterion's 0.638, mixture_spread 0.595 against 0.650, and on mixture_weak, where rate 0.5
    is out of reach, BER 0.340 against 0.288 for the fair 0.5), though worse on the other two
    (mixture_ring 0.432 against 0.462, mixture_close 0.332 against 0.532) and on average; 10 search
    batches of 256 per task rank them the same way. On the digits 3-vs-8 model both pick the same step.
    Neither lands on the fair point in general: the minimiser is a first guess, which a measured rate
    settles. The paper's Theorem 2 weighs the *score* difference by g^2 = beta, i.e.
    beta_t / sqrt(1 - alpha_bar_t) times the eps difference; the algorithm (and this) drops
    1 / sqrt(1 - alpha_bar_t).

    denoiser: plain or stateful (each chain carries its own state); latents (B, ...) N(0, I);
    sigmas (N+1,) decreasing grid (the last level is never evaluated, so it may be 0);
    s0, s1: conditions as in :func:`attribute_switch`; norm: one of :data:`NORMS`.
    Cost: 2N denoiser evaluations.
    """
    if norm not in NORMS:
        raise ValueError(f"tau_search: norm must be one of {NORMS}, got {norm!r}")
    sig = np.asarray(sigmas, np.float64)
    if sig.ndim != 1 or sig.shape[0] < 2 or np.any(np.diff(sig) >= 0):
        raise ValueError(f"tau_search: sigmas must be a decreasing 1-D grid with >= 2 entries, got {sig}")
    sd = as_stateful(denoiser)
    x = jnp.asarray(latents, jnp.float32) * float(sig[0])
    xs = dict(sigma=jnp.asarray(sig[:-1], jnp.float32), h=jnp.asarray(np.diff(sig), jnp.float32),
              beta=jnp.asarray(ddpm_betas(sig, sigma_data, beta_max), jnp.float32))

    def step(carry, s):
        (x0, st0), (x1, st1) = carry
        sigma = per_sample_sigma(s["sigma"], x)
        d0, st0 = sd.apply(x0, sigma, s0, st0)
        d1, st1 = sd.apply(x1, sigma, s1, st1)
        e0, e1 = eps_from_x0(x0, d0, sigma), eps_from_x0(x1, d1, sigma)
        return ((x0 + s["h"] * e0, st0), (x1 + s["h"] * e1, st1)), s["beta"] * (e0 - e1)

    _, d = jax.lax.scan(step, ((x, sd.init(x)), (x, sd.init(x))), xs)
    curve = switch_curve(d, norm)
    index = jnp.argmin(curve).astype(jnp.int32)
    return TauSearch(index, switch_sigma(sig, index), curve)


def switch_curve(increments, norm: str = 'batch') -> jax.Array:
    """D(tau) for every split tau = 0..N of per-step increments d (N, B, ...) (step 0 = highest noise): (N+1,).

    With S_tau = sum_{i < tau} d_i - sum_{i >= tau} d_i (B, ...) (= 2 P_tau - P_N for the prefix sums
    P_tau = sum_{i < tau} d_i):
      norm='batch':  D(tau) = mean over elements e of sqrt(sum_b S_tau[b, e]^2)   (the reference's
                     torch.mean(torch.norm(S, dim=0)), dim 0 the batch);
      norm='sample': D(tau) = mean over samples b of sqrt(sum_e S_tau[b, e]^2).
    Either is unchanged by negating any sample's increments, and the two ends (tau = 0, N) always tie.
    """
    d = jnp.asarray(increments)
    if d.ndim < 2:
        raise ValueError(f"switch_curve: increments must be (N, B, ...), got shape {d.shape}")
    prefix = jnp.concatenate([jnp.zeros_like(d[:1]), jnp.cumsum(d, axis=0)])
    diff = (2 * prefix - prefix[-1]).reshape(prefix.shape[0], prefix.shape[1], -1)
    if norm == 'batch':
        return jnp.mean(jnp.sqrt(jnp.sum(diff ** 2, axis=1)), axis=1)
    if norm == 'sample':
        return jnp.mean(jnp.sqrt(jnp.sum(diff ** 2, axis=2)), axis=1)
    raise ValueError(f"switch_curve: norm must be one of {NORMS}, got {norm!r}")


class AttributeMixture(NamedTuple):
    """A 2-D mixture whose regions show a binary attribute, conditioned on a binary sensitive attribute s.

    gm: the conditional mixture, components (2R,) = (region 0 | s=1, region 0 | s=0, region 1 | s=1, ...)
        with labels s (one-hot cond over s; a zero row is s-blind).
    means (R, 2), stds (R,), attributes (R,) int {0, 1}: the regions and the attribute each shows.
    """

    gm: toy.GaussianMixture
    means: np.ndarray
    stds: np.ndarray
    attributes: np.ndarray

    def shown(self, x) -> jax.Array:
        """The attribute a sample shows: x (B, 2) -> (B,) bool, the attribute of its most likely region
        (clean likelihoods, equal region weights; for two mirrored regions of equal std, the side of the
        perpendicular bisector)."""
        return _most_likely_attribute(jnp.asarray(x, jnp.float32), jnp.asarray(self.means, jnp.float32),
                                      jnp.asarray(self.stds, jnp.float32), jnp.asarray(self.attributes, bool))


@jax.jit
def _most_likely_attribute(x, means, stds, attributes):
    """x (B, D), means (R, D), stds (R,), attributes (R,) bool -> (B,) the attribute of each x's most likely region
    (isotropic Gaussian log-likelihoods, equal weights). One compiled program, so eager calls stay cheap."""
    ll = -0.5 * jnp.sum((x[:, None] - means[None]) ** 2, axis=-1) / stds ** 2 - means.shape[1] * jnp.log(stds)
    return attributes[jnp.argmax(ll, axis=1)]


def attribute_mixture(means, stds, attributes, *, region_weights=None, p_s1: float = 0.75,
                      p_match=0.95) -> AttributeMixture:
    """Build an :class:`AttributeMixture`: means (R, 2), stds scalar or (R,), attributes (R,) {0, 1}.

    s shifts weight between the attributes: P(attribute 1 | s=1) = p1 and P(attribute 0 | s=0) = p0, with
    p_match = p (both) or the pair (p1, p0); within one attribute the regions split by region_weights (R,)
    (uniform by default). The data are biased, p(s=1) = p_s1.
    """
    means = np.asarray(means, np.float64)
    r = means.shape[0]
    stds = np.broadcast_to(np.asarray(stds, np.float64), (r,)).copy()
    attrs = np.asarray(attributes, np.int32)
    if means.shape != (r, 2) or attrs.shape != (r,) or not set(attrs.tolist()) <= {0, 1}:
        raise ValueError(f"attribute_mixture: means (R, 2) and attributes (R,) in {{0, 1}}, got {means.shape}, "
                         f"{attrs.tolist()}")
    w = np.ones(r) if region_weights is None else np.asarray(region_weights, np.float64)
    p1, p0 = (float(p_match), float(p_match)) if np.ndim(p_match) == 0 else map(float, p_match)
    within = w / np.array([w[attrs == a].sum() for a in attrs])  # region's share of its attribute
    p_attr = {1: np.where(attrs == 1, p1, 1 - p1), 0: np.where(attrs == 0, p0, 1 - p0)}  # P(attr_r | s)
    weights = np.stack([p_s1 * p_attr[1] * within, (1 - p_s1) * p_attr[0] * within], axis=1).reshape(-1)
    gm = toy.mixture(np.repeat(means, 2, axis=0), np.repeat(stds, 2), weights, labels=np.tile([1, 0], r),
                     num_classes=2)
    return AttributeMixture(gm, means, stds, attrs)


def mirror_mixture(p_s1: float = 0.75, p_a_given_s1: float = 0.95) -> toy.GaussianMixture:
    """A 2-D mixture with a binary sensitive attribute s (the condition: one-hot over s, zero row = s-blind).

    Two regions mirror each other, A at (+2, 0) and B at (-2, 0) (std 0.5); a sample shows attribute 1 when
    it lands in A (:func:`mirror_attribute`). s only shifts the region weights, p(A | s=1) = p(B | s=0) =
    p_a_given_s1, and the data are biased, p(s=1) = p_s1, so the s-blind model lands in A with probability
    p_s1 p_a_given_s1 + (1 - p_s1)(1 - p_a_given_s1) (0.725 by default). Both attributes share the same
    components, so the condition only matters while the region is undecided (mid noise levels), as in an
    image model whose late steps no longer change the attribute: switching 0 -> 1 at tau moves the rate of A
    continuously from 1 - p_a_given_s1 (tau -> 0) to p_a_given_s1 (tau -> inf).
    Components (4,): A|s=1, A|s=0, B|s=1, B|s=0 with labels [1, 0, 1, 0] (:func:`attribute_mixture` of
    the two regions).
    """
    return attribute_mixture([[2.0, 0.0], [-2.0, 0.0]], 0.5, [1, 0], p_s1=p_s1, p_match=p_a_given_s1).gm


def mirror_attribute(x) -> jax.Array:
    """The attribute a :func:`mirror_mixture` sample shows: x (B, 2) -> (B,) bool, True in region A (x_0 > 0).

    This is the Bayes classifier of the mirror pair, so no trained classifier is needed to measure it.
    """
    return jnp.asarray(x)[:, 0] > 0


def balanced_error_rate(predictions, attributes) -> jax.Array:
    """BER(f(X), S) = (P(f = 0 | S = 1) + P(f = 1 | S = 0)) / 2 = (FNR + FPR) / 2.

    predictions: (N,) binary predictions f(X) of the sensitive attribute (bool or {0, 1});
    attributes:  (N,) the true binary attribute S.
    Returns () float32 in [0, 1]: 0.5 means f carries no information about S (the fair ideal), 0 or 1 that
    f determines S. NaN when one attribute value is absent (a rate conditioned on an empty group).
    """
    f = jnp.asarray(predictions).astype(bool)
    s = jnp.asarray(attributes).astype(bool)
    if f.shape != s.shape or f.ndim != 1:
        raise ValueError(f"predictions and attributes must both be (N,), got {f.shape} and {s.shape}")
    fnr = jnp.sum(~f & s) / jnp.sum(s)
    fpr = jnp.sum(f & ~s) / jnp.sum(~s)
    return (0.5 * (fnr + fpr)).astype(jnp.float32)


def attribute_rate(predictions) -> jax.Array:
    """Fraction of samples predicted to have attribute 1: predictions (N,) binary -> () float32."""
    return jnp.mean(jnp.asarray(predictions).astype(jnp.float32))
