"""Inception Score (Salimans et al. 2016) from classifier outputs.

IS = exp(E_x KL(p(y|x) || p(y))), where p(y) is the marginal of p(y|x) over the scored images. As in the
original implementation and in StyleGAN/EDM-era code, the N predictions are cut, in their given order, into
``splits`` contiguous chunks ``[i*N//splits, (i+1)*N//splits)`` (every prediction is used; chunk sizes differ by at
most one), each chunk gets its own marginal and score, and the result is the mean and population std (ddof=0)
of the per-chunk scores. Shuffle beforehand if the order of the predictions is correlated with their class.
"""
from __future__ import annotations

import numpy as np
from scipy.special import rel_entr, softmax


def inception_score(logits_or_probs, splits: int = 10, *, from_logits: bool = True) -> tuple[float, float]:
    """(mean, std) of the Inception Score over ``splits`` contiguous chunks of predictions (N, K).

    ``from_logits=True`` applies a softmax to the rows; otherwise rows are probabilities (non-negative, summing
    to 1), and zero entries contribute 0 to the KL (0 log 0 = 0).
    """
    x = np.asarray(logits_or_probs, np.float64)
    if x.ndim != 2:
        raise ValueError(f'inception_score needs predictions of shape (N, K), got {x.shape}')
    n = x.shape[0]
    if not 1 <= splits <= n:
        raise ValueError(f'inception_score: splits={splits} must be between 1 and the number of predictions ({n})')
    if from_logits:
        p = softmax(x, axis=1)
    elif np.any(x < 0) or not np.allclose(x.sum(axis=1), 1, atol=1e-4):
        raise ValueError('inception_score(from_logits=False) needs rows of probabilities (>= 0, summing to 1); '
                         'pass logits with from_logits=True')
    else:
        p = x
    scores = []
    for i in range(splits):
        part = p[i * n // splits:(i + 1) * n // splits]
        # rel_entr(p, q) = p log(p / q) with 0 log 0 = 0, so confident (one-hot) rows need no epsilon.
        kl = rel_entr(part, part.mean(axis=0, keepdims=True)).sum(axis=1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))
