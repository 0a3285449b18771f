"""Plots the audits share: histograms of per-image statistics and ROC curves (matplotlib, Agg, PNG files)."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from jaxdiff.metrics.roc import roc_curve, roc_summary


def histogram_png(values: Sequence[np.ndarray], labels: Sequence[str], xlabel: str, path: str,
                  vline: Optional[float] = None) -> str:
    """A histogram of each of ``values`` (one colour per set) written to ``path`` (PNG); returns path."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=110)
    finite = [np.asarray(v)[np.isfinite(v)] for v in values]
    edges = np.histogram_bin_edges(np.concatenate(finite), bins=60)
    for v, label in zip(finite, labels):
        ax.hist(v, bins=edges, alpha=0.6, label=label)
    if vline is not None:
        ax.axvline(vline, color='k', lw=1, ls='--')
    ax.set_xlabel(xlabel)
    ax.set_ylabel('count')
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def roc_png(curves: Sequence[tuple[str, np.ndarray, np.ndarray]], path: str, title: str = '') -> str:
    """ROC curves [(label, positive scores, negative scores)] on log-log axes (the low-FPR regime that matters for
    privacy) and linear ones, side by side, to ``path``; returns path."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.6), dpi=110)
    for label, pos, neg in curves:
        fpr, tpr, _ = roc_curve(pos, neg)
        auc = roc_summary(pos, neg)['auc']
        for ax in axes:
            ax.plot(fpr, tpr, label=f'{label} (AUC {auc:.3f})')
    for ax, scale in zip(axes, ('log', 'linear')):
        ax.plot([1e-4, 1], [1e-4, 1], color='grey', lw=0.8, ls=':')
        ax.set_xscale(scale)
        ax.set_yscale(scale)
        ax.set_xlabel('false-positive rate')
        ax.set_ylabel('true-positive rate')
    axes[1].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
