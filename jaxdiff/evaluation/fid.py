"""Fréchet distance (FID with Inception features), Inception Score and precision/recall of an image set against a
reference, as a function (``python -m eval.fid`` parses the flags and prints): image-set specs, EDM's seed-range
protocol, the evaluation itself.
"""
from __future__ import annotations

import os
from typing import Any, Optional, Sequence

import numpy as np

from jaxdiff import files

EDM_SEED_RANGES = ((0, 49_999), (50_000, 99_999), (100_000, 149_999))
DATASETS = {'digits': 'digits_classifier', 'fashion_mnist': 'fashion_mnist_classifier'}


class ImageSet(dict):
    """{'images': uint8 (N,H,W,C), 'labels': int32 (N,) or None, 'seeds': int64 (N,) or None} or, for a
    statistics file, {'mu': (D,), 'sigma': (D, D)}."""


def load_image_set(spec: str, allow_incomplete: bool = False) -> ImageSet:
    """An image set (see the module docstring) by its command-line spec; errors are one-line. A sample folder must
    be finished (manifest complete, every shard present) unless ``allow_incomplete``."""
    from jaxdiff.data.arrays import as_nhwc
    from jaxdiff.data.sources import FolderSource
    from jaxdiff.sampling import shards
    name, _, split = spec.partition(':')
    if name in DATASETS and not os.path.exists(spec):
        from jaxdiff.metrics.feature_classifier import dataset_split
        images, labels = dataset_split(DATASETS[name], split or 'ref')
        return ImageSet(images=images, labels=labels, seeds=None)
    if os.path.isdir(spec):
        if any(n.startswith('shard-') and n.endswith('.npz') for n in os.listdir(spec)):
            data = shards.load_samples(spec, allow_incomplete)
            return ImageSet(images=data['images'], labels=data['labels'], seeds=data['seeds'])
        try:
            source = FolderSource(spec)
        except ValueError as e:
            if 'holds no' not in str(e):
                raise
            raise ValueError(f'{spec} holds no images: neither sample shards (shard-XXXXX.npz) nor .png/.jpg files; '
                             f'write samples with python sample.py --out {spec}') from None
        return ImageSet(images=np.stack([source[i]['image'] for i in range(len(source))]), labels=None, seeds=None)
    if spec.endswith('.npz') and os.path.isfile(spec):
        npz = files.read_npz(spec, 'an image set or statistics file')
        if 'mu' in npz and 'sigma' in npz:
            from jaxdiff.metrics.frechet import load_stats
            mu, sigma = load_stats(spec)  # checked: shapes, finite
            return ImageSet(mu=mu, sigma=sigma)
        if 'images' in npz:
            return ImageSet(images=as_nhwc(npz['images'], spec), labels=None, seeds=None)
        raise ValueError(f'{spec} holds neither images nor statistics (mu, sigma); found {sorted(npz)}')
    raise FileNotFoundError(f'{spec!r} is not an image set: give a sample folder, an image folder, an .npz, or one '
                            f'of {", ".join(f"{d}[:ref|heldout|train]" for d in DATASETS)}')


def noise_like(shape: tuple[int, ...], count: int, seed: int = 0) -> np.ndarray:
    """``count`` N(0, I) images of ``shape`` (H, W, C) as uint8, converted as sample.py converts samples."""
    z = np.random.default_rng(seed).standard_normal((count, *shape))
    return np.clip(np.floor(z * 127.5 + 128), 0, 255).astype(np.uint8)


def parse_ranges(text: str) -> list[tuple[int, int]]:
    """'0-49999,50000-99999' -> [(0, 49999), (50000, 99999)] (inclusive)."""
    out = []
    for part in text.split(','):
        a, sep, b = part.strip().partition('-')
        if not sep or not a.isdigit() or not b.isdigit() or int(b) < int(a):
            raise ValueError(f'--seed_ranges {text!r}: expected A-B[,C-D...] with A <= B')
        out.append((int(a), int(b)))
    return out


def _select(samples: ImageSet, first: int, last: int) -> np.ndarray:
    if samples.get('seeds') is None:
        raise ValueError('seed ranges need a sample.py folder (its shards store each image\'s seed)')
    rows = np.flatnonzero((samples['seeds'] >= first) & (samples['seeds'] <= last))
    if len(rows) != last - first + 1:
        raise ValueError(f'seeds {first}-{last}: the samples hold {len(rows)} of them; sample the whole range '
                         f'(python sample.py --seeds {first}-{last} ...)')
    return rows


def check_shapes(samples: np.ndarray, ref: np.ndarray) -> None:
    """Samples and reference images must have one size (a distance between sizes measures the resizing)."""
    if samples.shape[1:] != ref.shape[1:]:
        raise ValueError(f'image sizes differ: samples are {"x".join(map(str, samples.shape[1:]))}, the reference '
                         f'{"x".join(map(str, ref.shape[1:]))}; compare sets of one size')


def evaluate(samples_spec: str, ref_spec: str, features: str = 'digits_classifier', *,
             inception_weights: Optional[str] = None, num_samples: Optional[int] = None,
             seed_ranges: Sequence[tuple[int, int]] = (), save_stats: Optional[str] = None, label: str = '',
             allow_incomplete: bool = False, log=print) -> dict[str, Any]:
    """The metrics dict printed by the CLI (see the module docstring). ``allow_incomplete``: score an unfinished
    sample folder's shards (the result's num_samples says how many)."""
    from jaxdiff.metrics import frechet, precision_recall
    from jaxdiff.evaluation.features import INCEPTION, extract, make_extractor
    from jaxdiff.metrics.inception_score import inception_score

    ref = load_image_set(ref_spec)
    if samples_spec == 'noise':
        if 'images' not in ref:
            raise ValueError('--samples noise needs reference images (their shape), not statistics')
        samples = ImageSet(images=noise_like(ref['images'].shape[1:], num_samples or len(ref['images'])),
                           labels=None, seeds=None)
    else:
        samples = load_image_set(samples_spec, allow_incomplete)
    if allow_incomplete and os.path.isdir(samples_spec) and 'images' in samples:
        log(f'--allow_incomplete: scoring the {len(samples["images"]):,} images present in {samples_spec}')
    if 'images' not in samples:
        raise ValueError(f'--samples {samples_spec} is a statistics file; it needs images')
    if num_samples:
        if num_samples > len(samples['images']):
            raise ValueError(f'--num_samples {num_samples} exceeds the {len(samples["images"])} samples')
        samples = ImageSet({k: (v[:num_samples] if v is not None else None) for k, v in samples.items()})
    if 'images' in ref:
        check_shapes(samples['images'], ref['images'])
    extractor = make_extractor(features, inception_weights, log=log)
    log(f'{extractor.name} features of {len(samples["images"]):,} samples'
        + (f' and {len(ref["images"]):,} reference images' if 'images' in ref else ''))
    fake, logits = extract(extractor, samples['images'], log)
    if 'images' in ref:
        real, _ = extract(extractor, ref['images'], log)
        ref_stats = frechet.FeatureStats()
        ref_stats.update(real)
        mu, sigma = ref_stats.mean(), ref_stats.cov()
    else:
        real, mu, sigma = None, ref['mu'], ref['sigma']
        if mu.shape != fake.shape[1:]:
            raise ValueError(f'{ref_spec} holds {mu.shape[0]}-D statistics; {extractor.name} features are '
                             f'{fake.shape[1]}-D (use the statistics of the same extractor)')

    def fd(rows) -> float:
        stats = frechet.FeatureStats()
        stats.update(fake[rows])
        return frechet.frechet_distance(stats.mean(), stats.cov(), mu, sigma)

    key = 'fid' if extractor.name == INCEPTION else 'fd'
    result: dict[str, Any] = {}
    if seed_ranges:
        per_range = [fd(_select(samples, a, b)) for a, b in seed_ranges]
        result[key] = min(per_range)
        result[f'{key}_per_range'] = per_range
        result['seed_ranges'] = [f'{a}-{b}' for a, b in seed_ranges]
    else:
        result[key] = fd(slice(None))
    if save_stats:
        stats = frechet.FeatureStats()
        stats.update(fake)
        frechet.save_stats(save_stats, stats.mean(), stats.cov())
        result['saved_stats'] = save_stats
    is_mean, is_std = inception_score(logits)
    result.update({'is': is_mean, 'is_std': is_std})
    if real is not None:
        result['precision'], result['recall'] = precision_recall.precision_recall(real, fake, k=3)
    result.update(features=extractor.name, samples=samples_spec, ref=ref_spec, num_samples=int(len(fake)),
                  num_ref=int(len(real)) if real is not None else None)
    if label:
        result['label'] = label
    return result
