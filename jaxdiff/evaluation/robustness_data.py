"""What the robustness evaluation loads: an adversarial-training run as a classifier, evaluation images from a
dataset spec (``digits[:split]``, ``fashion_mnist[:split]``, an .npz, a sample.py folder), and a diffusion run
as DiffPure's purifier or the smoothing denoiser (``python -m eval.robustness`` parses the flags).
"""
from __future__ import annotations

import os

import numpy as np

from jaxdiff import files

DATASETS = ('digits', 'fashion_mnist')


class Classifier:
    """A trained adversarial-training run: ``apply(variables, x (B, H, W, C) in [0, 1]) -> logits (B, K)``."""

    def __init__(self, workdir: str, checkpoint: str = 'auto'):
        from jaxdiff.tasks import adversarial
        from jaxdiff.runs import load_run, wrong_kind
        from jaxdiff.tasks.registry import task_name
        from jaxdiff.engine import checkpoint as ckpt
        if not os.path.isdir(workdir):
            raise FileNotFoundError(f'run directory not found: {workdir!r}; pass the --workdir of an adversarial '
                                    'training run (python train.py --config configs/robust/digits.py --workdir RUN)')
        task = task_name(ckpt.read_config(workdir))
        if task != 'adversarial':
            raise ValueError(wrong_kind(workdir, task, 'adversarial'))
        if checkpoint == 'auto':
            checkpoint = 'best' if os.path.isdir(os.path.join(workdir, adversarial.BEST_DIR, 'checkpoints')) else 'latest'
        run = load_run(workdir, checkpoint=checkpoint)
        self.workdir, self.config, self.info, self.net, self.variables = workdir, run.config, run.info, run.net, \
            run.variables
        self.source, self.step = run.checkpoint, run.step
        self.best = adversarial.read_best(workdir) if checkpoint == 'best' else None
        self.shape = (self.info.resolution, self.info.resolution, self.info.channels)

    def apply(self, variables, x):
        return self.net.apply(variables, x, train=False)

    def describe(self) -> dict:
        m = self.config.model
        return dict(path=os.path.abspath(self.workdir), checkpoint=self.source, step=self.step,
                    arch=f'{m.arch}-{m.depth}-{m.width}' if m.arch == 'wrn' else m.arch,
                    method=self.config.method, train_eps=float(self.config.eps), train_norm=self.config.norm,
                    generated_fraction=float(self.config.generated_fraction),
                    generated=self.config.data.generated or None, image_shape=list(self.shape),
                    num_classes=int(self.info.num_classes), best=self.best)


def load_data(spec: str, allow_incomplete: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, H, W, C), labels int32 (N,)) of a --data spec (module docstring); one-line errors."""
    from jaxdiff.data.arrays import as_nhwc
    from jaxdiff.data.sources import load_digits, load_fashion_mnist
    name, _, split = spec.partition(':')
    if name in DATASETS and not os.path.exists(spec):
        from jaxdiff.metrics.feature_classifier import SPLITS, dataset_split
        if name == 'digits' and split == 'all':
            return load_digits()
        if name == 'fashion_mnist' and split == 'test':
            from jaxdiff.metrics.feature_classifier import FASHION_MNIST_DIR
            return load_fashion_mnist(FASHION_MNIST_DIR, 'test')
        split = split or ('heldout' if name == 'digits' else 'test')
        if split not in SPLITS:
            extra = 'all' if name == 'digits' else 'test'
            raise ValueError(f'--data {spec}: unknown split {split!r}; use one of {", ".join(SPLITS + (extra,))}')
        return dataset_split(f'{name}_classifier', split)
    if os.path.isdir(spec):
        from jaxdiff.sampling import shards
        if not any(n.startswith('shard-') and n.endswith('.npz') for n in os.listdir(spec)):
            raise ValueError(f'--data {spec}: the folder holds no sample shards (shard-XXXXX.npz); give a sample.py '
                             'folder, an .npz with images and labels, or a dataset split such as digits:heldout')
        data = shards.load_samples(spec, allow_incomplete)
        if (data['labels'] < 0).any():
            raise ValueError(f'--data {spec}: unconditional samples have no labels to attack')
        return data['images'], data['labels'].astype(np.int32)
    if spec.endswith('.npz') and os.path.isfile(spec):
        npz = files.read_npz(spec, 'an .npz of images and labels')
        if 'images' not in npz or 'labels' not in npz:
            raise ValueError(f'--data {spec}: an .npz needs "images" and "labels" arrays (found {sorted(npz)})')
        images, labels = as_nhwc(npz['images'], spec), npz['labels'].astype(np.int32)
        if labels.shape != images.shape[:1]:
            raise ValueError(f'--data {spec}: labels have shape {labels.shape}, expected ({len(images)},)')
        return images, labels
    raise FileNotFoundError(f'--data {spec!r} not found: give digits[:train|ref|heldout|all], '
                            'fashion_mnist[:train|test|ref|heldout], an .npz with images and labels, or a sample.py '
                            'folder')


def fit_data(images: np.ndarray, labels: np.ndarray, shape: tuple, num_classes: int, spec: str) -> np.ndarray:
    """images brought to the classifier's ``shape`` by the data pipeline's rule, or a one-line ValueError."""
    from jaxdiff.data.sources import fit_resolution
    h, w, c = images.shape[1:]
    side, channels = shape[0], shape[2]
    if c != channels or h != w or side < h:
        raise ValueError(f'--data {spec} holds {h}x{w}x{c} images but the classifier takes '
                         f'{side}x{side}x{channels}; evaluate on data of the training set\'s shape')
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f'--data {spec} has labels in {labels.min()}..{labels.max()} but the classifier has '
                         f'{num_classes} classes')
    if side != h:
        images = np.stack([fit_resolution(im, side) for im in images])
    return images


def load_denoiser(path: str, shape: tuple, flag: str):
    """(unconditional denoiser fn(variables) -> D, variables, description) of a diffusion run for --diffpure /
    --smoothing, checked against the classifier's image shape."""
    from jaxdiff.sampling.model import load_model
    from jaxdiff.engine import checkpoint as ckpt
    if not os.path.isdir(path):
        raise FileNotFoundError(f'{flag} {path!r}: no such directory; pass a train.py diffusion run')
    if os.path.isfile(os.path.join(path, ckpt.CONFIG_FILE)):
        task = ckpt.read_config(path).get('task', 'denoiser')
        if task not in ('denoiser', 'trigger'):
            from jaxdiff.runs import wrong_kind
            raise ValueError(f'{flag}: {wrong_kind(path, task, "denoiser")}')
    model = load_model(path)
    if (model.resolution, model.resolution, model.channels) != tuple(shape):
        raise ValueError(f'{flag} {path} generates {model.resolution}x{model.resolution}x{model.channels} images '
                         f'but the classifier takes {"x".join(map(str, shape))}')
    return model.denoiser, model.variables, model.description
