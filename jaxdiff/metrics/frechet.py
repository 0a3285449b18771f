"""Fréchet distance between Gaussians fitted to two feature sets (FID when the features are Inception's).

The statistics live on the host in float64: covariances of 2048-dim features over 50k samples lose digits in
float32, and the matrix square root amplifies such errors. Reference statistics are ``.npz`` files with arrays
``mu`` (D,) and ``sigma`` (D, D), the layout written by pytorch-fid's ``--save-stats`` and read by EDM's
``fid.py``, so published reference files load unchanged.
"""
from __future__ import annotations

import os

import numpy as np

from jaxdiff import files


class FeatureStats:
    """Streaming mean and covariance of feature vectors, in float64.

    Each ``update`` computes its chunk's mean and centred scatter and merges them into the running totals with
    Chan et al.'s pairwise formula. Centring per chunk (instead of summing raw outer products) keeps the
    covariance accurate when the features have a large mean relative to their spread.
    """

    def __init__(self):
        self.count = 0
        self._mean = None
        self._scatter = None  # sum over samples of (x - mean)(x - mean)^T, (D, D)

    def update(self, features) -> None:
        """Adds features (B, D) (any float dtype, numpy or JAX); B may be 0."""
        x = np.asarray(features, np.float64)
        if x.ndim != 2:
            raise ValueError(f'FeatureStats.update needs features of shape (B, D), got {x.shape}')
        if self._mean is not None and x.shape[1] != self._mean.shape[0]:
            raise ValueError(f'FeatureStats holds {self._mean.shape[0]}-dim features, got {x.shape[1]}-dim ones')
        n = x.shape[0]
        if n == 0:
            return
        mean = x.mean(axis=0)
        centred = x - mean
        scatter = centred.T @ centred
        if self._mean is None:
            self.count, self._mean, self._scatter = n, mean, scatter
            return
        total = self.count + n
        delta = mean - self._mean
        self._scatter = self._scatter + scatter + np.outer(delta, delta) * (self.count * n / total)
        self._mean = self._mean + delta * (n / total)
        self.count = total

    def mean(self) -> np.ndarray:
        """Mean (D,) float64 of all features seen."""
        if self.count == 0:
            raise ValueError('FeatureStats.mean: no features were added')
        return self._mean.copy()

    def cov(self) -> np.ndarray:
        """Unbiased covariance (D, D) float64 (ddof=1, as ``np.cov(x, rowvar=False)``); needs >= 2 samples."""
        if self.count < 2:
            raise ValueError(f'FeatureStats.cov needs at least 2 samples, got {self.count}')
        return self._scatter / (self.count - 1)


def _check_gaussian(mu, sigma, what: str) -> tuple[np.ndarray, np.ndarray]:
    """(mu (D,), sigma (D, D)) as float64 arrays; ValueError naming ``what`` for other shapes."""
    mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
    if mu.ndim != 1:
        raise ValueError(f'{what}: mu must have shape (D,), got {mu.shape}')
    if sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f'{what}: sigma must be square with shape {(mu.shape[0],) * 2} to match mu, got {sigma.shape}')
    return mu, sigma


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Square root (D, D) of a symmetric PSD matrix (D, D); round-off negative eigenvalues count as 0."""
    values, vectors = np.linalg.eigh(matrix)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Squared Fréchet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2); mu (D,), sigma (D, D).

    d = ||mu1 - mu2||^2 + Tr(sigma1) + Tr(sigma2) - 2 Tr((sigma1 sigma2)^{1/2}).

    sigma1 sigma2 is not symmetric, so a general matrix square root of it (scipy's ``sqrtm``, used by
    pytorch-fid) can return complex values or fail when the covariances are near-singular, as they are whenever
    N < D. Its eigenvalues equal those of the symmetric PSD matrix sqrt(sigma1) sigma2 sqrt(sigma1), so the trace
    of the root is the sum of square roots of that matrix's eigenvalues: a symmetric eigendecomposition whose
    round-off negatives are clipped to 0, real and defined for every pair of PSD covariances.
    """
    mu1, sigma1 = _check_gaussian(mu1, sigma1, 'frechet_distance (first)')
    mu2, sigma2 = _check_gaussian(mu2, sigma2, 'frechet_distance (second)')
    if mu1.shape != mu2.shape:
        raise ValueError(f'frechet_distance: feature dimensions differ ({mu1.shape[0]} vs {mu2.shape[0]}); '
                         'both statistics must come from the same feature extractor')
    # Symmetrise: saved or streamed covariances can be asymmetric by round-off, and eigh reads one triangle only.
    sigma1, sigma2 = (sigma1 + sigma1.T) / 2, (sigma2 + sigma2.T) / 2
    root1 = _psd_sqrt(sigma1)
    inner = root1 @ sigma2 @ root1
    eigenvalues = np.linalg.eigvalsh((inner + inner.T) / 2)
    trace_root = np.sqrt(np.clip(eigenvalues, 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_root)


def save_stats(path: str, mu, sigma) -> None:
    """Writes mu (D,) and sigma (D, D) to the .npz at ``path`` (exactly that name) under keys 'mu' and 'sigma'."""
    mu, sigma = _check_gaussian(mu, sigma, f'save_stats({path!r})')
    with open(path, 'wb') as f:  # a file object stops numpy from appending '.npz' to the name
        np.savez(f, mu=mu, sigma=sigma)


def load_stats(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(mu (D,), sigma (D, D)) float64 from an .npz with keys 'mu' and 'sigma' (jaxdiff, pytorch-fid, EDM)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f'feature statistics file not found: {path!r}')
    npz = files.read_npz(path, 'a feature statistics file')
    missing = [key for key in ('mu', 'sigma') if key not in npz]
    if missing:
        raise ValueError(f'{path} lacks {" and ".join(missing)} (found {sorted(npz)}); expected the statistics '
                         'layout of save_stats / pytorch-fid --save-stats (arrays mu and sigma)')
    mu, sigma = _check_gaussian(npz['mu'], npz['sigma'], path)
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f'{path} holds NaN or inf in mu or sigma: the statistics are broken; recompute them '
                         '(save_stats of finite features)')
    return mu, sigma


def features_distance(features, ref: FeatureStats) -> float:
    """Fréchet distance of features (N, D) to the reference statistics ``ref``; nan with fewer than 2 samples."""
    if len(features) < 2:
        return float('nan')
    stats = FeatureStats()
    stats.update(features)
    return frechet_distance(stats.mean(), stats.cov(), ref.mean(), ref.cov())

