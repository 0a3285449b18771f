"""Feature extractors for Fréchet distances, by name: the FID Inception or a small dataset classifier.

An extractor maps uint8 images (B, H, W, C) to ``{'features': (B, D), 'logits': (B, K)}``. ``inception`` gives
the 2048-D pool3 features and the 1008 logits (without the fc bias, as Inception Score is defined) of the standard
FID network (weights from a file the user supplies);
``digits_classifier`` / ``fashion_mnist_classifier`` are trained on data this machine has (see
:mod:`jaxdiff.metrics.feature_classifier`), for offline distances with a known scale.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import jax
import numpy as np

from jaxdiff.progress import Progress

INCEPTION = 'inception'


class Extractor(NamedTuple):
    """name; apply(images uint8 (B,H,W,C)) -> {'features': (B, D), 'logits': (B, K)}; batch_size it runs at."""
    name: str
    apply: Callable
    batch_size: int


def names() -> list[str]:
    """Every extractor name."""
    from jaxdiff.metrics.feature_classifier import CLASSIFIERS
    return [INCEPTION, *CLASSIFIERS]


def make_extractor(name: str, inception_weights: Optional[str] = None, log: Callable[[str], None] = print
                   ) -> Extractor:
    """The extractor ``name``; ``inception`` needs ``inception_weights`` (pytorch-fid's pt_inception-*.pth)."""
    if name == INCEPTION:
        if not inception_weights:
            raise ValueError('--features inception needs --inception_weights PATH (pytorch-fid\'s '
                             'pt_inception-2015-12-05-6726825d.pth; nothing is downloaded)')
        from jaxdiff.metrics import inception
        variables = inception.load_fid_inception(inception_weights)

        @jax.jit
        def features(v, images):
            out = inception.inception_features(v, images)
            # Inception Score uses logits without the fc bias, as the original TF code and torch-fidelity do.
            return {'features': out['pool'], 'logits': out['pool'] @ v['params']['fc']['weight']}

        return Extractor(INCEPTION, lambda images: features(variables, images), 100)
    from jaxdiff.metrics.feature_classifier import CLASSIFIERS
    from jaxdiff.tasks.feature_classifier import load_or_train
    if name not in CLASSIFIERS:
        raise ValueError(f'unknown --features {name!r}: use one of {", ".join(names())}')
    net = load_or_train(name, log=log)
    return Extractor(name, net.apply, 1000)


def extract(extractor: Extractor, images: np.ndarray, log: Optional[Callable[[str], None]] = None
            ) -> tuple[np.ndarray, np.ndarray]:
    """(features float64 (N, D), logits float32 (N, K)) of uint8 images (N, H, W, C), in fixed-size batches
    (the last one padded) so the extractor compiles once."""
    b = extractor.batch_size
    feats, logits = [], []
    progress = Progress(f'{extractor.name} features:', len(images), log) if log else None
    for lo in range(0, len(images), b):
        chunk = images[lo:lo + b]
        real = len(chunk)
        if real < b and len(images) > b:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], b - real, axis=0)])
        out = extractor.apply(chunk)
        feats.append(np.asarray(out['features'], np.float64)[:real])
        logits.append(np.asarray(out['logits'], np.float32)[:real])
        if progress:
            progress.add(real)
    return np.concatenate(feats), np.concatenate(logits)
