"""ROC analysis of a score that should be higher for positives: the curve, its area, the true-positive rate at a
low false-positive rate and the best-threshold accuracy (membership inference and generated-image detection).

The curve is the exact empirical one: one point per distinct score (ties move TPR and FPR together), so the area
equals the Mann-Whitney statistic P(s_pos > s_neg) + P(s_pos = s_neg) / 2. TPR at a given FPR is the largest TPR
among thresholds whose FPR does not exceed it (LiRA's reading of the curve: no interpolation).
"""
from __future__ import annotations

import numpy as np


def roc_curve(positives: np.ndarray, negatives: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds), each (T + 1,): classifying ``score >= thresholds[i]`` as positive gives
    ``fpr[i]`` / ``tpr[i]``; the first point is (0, 0) at threshold +inf. positives (P,), negatives (M,) float."""
    pos, neg = _checked(positives, 'positives'), _checked(negatives, 'negatives')
    scores = np.concatenate([pos, neg])
    is_pos = np.concatenate([np.ones(len(pos), bool), np.zeros(len(neg), bool)])
    order = np.argsort(-scores, kind='stable')
    scores, is_pos = scores[order], is_pos[order]
    last_of_value = np.flatnonzero(np.r_[scores[1:] != scores[:-1], True])  # a threshold admits all its ties
    tp = np.cumsum(is_pos)[last_of_value]
    fp = np.cumsum(~is_pos)[last_of_value]
    fpr = np.r_[0.0, fp / len(neg)]
    tpr = np.r_[0.0, tp / len(pos)]
    return fpr, tpr, np.r_[np.inf, scores[last_of_value]]


def _checked(values: np.ndarray, name: str) -> np.ndarray:
    values = np.asarray(values, np.float64).reshape(-1)
    if len(values) == 0:
        raise ValueError(f'ROC needs at least one score among the {name}')
    if not np.all(np.isfinite(values)):
        raise ValueError(f'{name}: {int(np.sum(~np.isfinite(values)))} scores are NaN or infinite')
    return values


def auc(fpr: np.ndarray, tpr: np.ndarray) -> float:
    """Area under the (fpr, tpr) curve by the trapezoid rule (exact for the step curve of :func:`roc_curve`)."""
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))


def tpr_at_fpr(fpr: np.ndarray, tpr: np.ndarray, max_fpr: float) -> float:
    """The largest TPR among the curve's points with FPR <= ``max_fpr``."""
    return float(np.max(tpr[fpr <= max_fpr]))


def roc_summary(positives: np.ndarray, negatives: np.ndarray, max_fprs: tuple[float, ...] = (0.01,)) -> dict:
    """{'auc', 'tpr_at_fpr': {max_fpr: tpr}, 'accuracy' (the best over thresholds, on the pooled scores),
    'balanced_accuracy' (the best mean of TPR and TNR), 'threshold' (score >= it reads positive: the highest
    threshold reaching the best accuracy),
    'num_positives', 'num_negatives'} of scores positives (P,) and negatives (M,), positives expected higher."""
    fpr, tpr, thresholds = roc_curve(positives, negatives)
    p, m = len(np.reshape(positives, -1)), len(np.reshape(negatives, -1))
    accuracy = (tpr * p + (1 - fpr) * m) / (p + m)
    best = int(np.argmax(accuracy))
    return dict(auc=auc(fpr, tpr), tpr_at_fpr={f'{f:g}': tpr_at_fpr(fpr, tpr, f) for f in max_fprs},
                accuracy=float(accuracy[best]), balanced_accuracy=float(np.max((tpr + 1 - fpr) / 2)),
                threshold=float(thresholds[best]), num_positives=p, num_negatives=m)
