"""Latent datasets: an autoencoder's encodings of an image dataset, as a data source the engine trains on.

A latent folder (written by ``python -m jaxdiff.data.encode``)::

    latents.json          format, mode, counts, shape, classes, the autoencoder, per-channel statistics
    shard-00000.npz       mean float32 (n, h, w, c), std float32 (n, h, w, c) [mode 'moments'] or
                          latent float32 (n, h, w, c) [mode 'sample'], labels int32 (n,)

Modes: 'moments' keeps the posterior's mean and std and draws a fresh latent mean + std * N(0, 1) every time an
example is read, as EDM2 does with its stored VAE moments; 'sample' keeps one posterior draw (LDM's and DiT's
pre-extracted features, fixed for the whole run).

Normalisation (``normalization`` in latents.json), applied when batches are read and undone before decoding:
'channel' (EDM2, the default): x = (z - mean_c) / std_c * 0.5 with the dataset's per-channel mean and std of the
latents (over the posterior: std_c^2 = E[std^2] + Var[mean]), so x has std 0.5, EDM's sigma_data; 'scale' (Stable
Diffusion, DiT): x = z * scaling_factor, the autoencoder's own constant (0.18215 for SD's VAE), or 1 / the
latents' overall std for an autoencoder without one, as SD's constant was chosen: x has std about 1, so train
with ``model.sigma_data = 1``.

Read with ``data.source = 'latents'``, ``data.path = FOLDER``: the pipeline (:mod:`jaxdiff.data.pipeline`) yields
normalised float32 latents as its 'image' and the stored labels, in the same seeded order and host slicing as
images. Mirroring is refused (the latent of a mirrored image is not the mirrored latent).
"""
from __future__ import annotations

import json
import os
from typing import Any, NamedTuple, Optional

import numpy as np

from jaxdiff import files
from jaxdiff.data.sources import DatasetInfo

META_FILE = 'latents.json'
FORMAT = 'jaxdiff-latents-1'
MODES = ('moments', 'sample')
NORMALIZATIONS = ('channel', 'scale')
FINAL_STD = 0.5  # EDM2's target std of the normalised latents (EDM's sigma_data)


class LatentSpace(NamedTuple):
    """x = (z - shift) * scale per channel, (c,) float32 each: autoencoder latents z <-> the diffusion model's x."""
    shift: np.ndarray
    scale: np.ndarray

    def normalize(self, z):
        """Autoencoder latents (..., c) -> the diffusion model's data (..., c) (numpy or jax arrays)."""
        return (z - self.shift) * self.scale

    def denormalize(self, x):
        """The diffusion model's data (..., c) -> autoencoder latents (..., c), for decoding."""
        return x / self.scale + self.shift


def channel_stats(mean: np.ndarray, std: Optional[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std (c,) float64 of the latents z = mean + std * N(0, 1) over a dataset: mean, std
    (N, h, w, c) (std None: the latents are ``mean`` itself). Var z = E[std^2] + Var[mean] (total variance)."""
    m = mean.reshape(-1, mean.shape[-1]).astype(np.float64)
    var = m.var(axis=0)
    if std is not None:
        var = var + np.square(std.reshape(-1, std.shape[-1]).astype(np.float64)).mean(axis=0)
    return m.mean(axis=0), np.sqrt(var)


def space_of(meta: dict) -> LatentSpace:
    """The :class:`LatentSpace` latents.json describes (its ``normalization``)."""
    c = int(meta['shape'][-1])
    if meta['normalization'] == 'channel':
        return LatentSpace(np.asarray(meta['channel_mean'], np.float32),
                           np.asarray(FINAL_STD / np.asarray(meta['channel_std']), np.float32))
    return LatentSpace(np.zeros(c, np.float32), np.full(c, meta['scaling_factor'], np.float32))


def shard_name(k: int) -> str:
    """The file name of shard k."""
    return f'shard-{k:05d}.npz'


def write_latents(out_dir: str, mean: np.ndarray, std: Optional[np.ndarray], labels: np.ndarray, *,
                  num_classes: int, autoencoder: dict, image_shape: tuple[int, int, int], source: dict,
                  normalization: str = 'channel', scaling_factor: Optional[float] = None,
                  shard_size: int = 50_000) -> dict:
    """Write a latent folder and return its latents.json dict.

    mean (N, h, w, c) float32: the posterior means, with std (N, h, w, c) for mode 'moments', or one posterior
    draw each with std None (mode 'sample'); labels int32 (N,); num_classes (0: unlabelled); autoencoder: where the
    encoder came from (kind, path, step / sha256 ...: what sampling decodes with); image_shape: the encoded images'
    (H, W, C); source: the image data (config.data fields). scaling_factor: the autoencoder's own (SD: 0.18215);
    None gives 1 / the latents' overall std. latents.json is written last, so a folder without it is unfinished.
    """
    if normalization not in NORMALIZATIONS:
        raise ValueError(f'normalization={normalization!r}: use one of {", ".join(NORMALIZATIONS)}')
    if mean.ndim != 4 or (std is not None and std.shape != mean.shape) or labels.shape != mean.shape[:1]:
        raise ValueError(f'latents: mean {mean.shape}, std {None if std is None else std.shape}, labels '
                         f'{labels.shape}: expected (N, h, w, c) twice and (N,)')
    ch_mean, ch_std = channel_stats(mean, std)
    if scaling_factor is None:
        overall = np.sqrt(np.mean(np.square(ch_std) + np.square(ch_mean - ch_mean.mean())))
        scaling_factor = float(1 / overall)
    os.makedirs(out_dir, exist_ok=True)
    names = []
    for k, start in enumerate(range(0, len(mean), shard_size)):
        part = slice(start, start + shard_size)
        arrays = dict(mean=mean[part], std=std[part]) if std is not None else dict(latent=mean[part])
        arrays['labels'] = labels[part].astype(np.int32)

        def save(tmp: str, arrays=arrays) -> None:
            with open(tmp, 'wb') as f:  # a file object: np.savez would append '.npz' to a path
                np.savez(f, **arrays)
        names.append(shard_name(k))
        files.atomic_write(os.path.join(out_dir, names[-1]), save)
    meta = dict(format=FORMAT, mode='moments' if std is not None else 'sample', count=int(len(mean)),
                shape=list(mean.shape[1:]), num_classes=int(num_classes), image_shape=list(image_shape),
                normalization=normalization, channel_mean=ch_mean.tolist(), channel_std=ch_std.tolist(),
                scaling_factor=float(scaling_factor), autoencoder=autoencoder, source=source, shards=names)
    files.write_json(os.path.join(out_dir, META_FILE), meta, indent=1)
    return meta


def read_meta(folder: str) -> dict:
    """latents.json of a latent folder, checked; FileNotFoundError / ValueError (one line) naming the fix."""
    path = os.path.join(folder, META_FILE)
    if not os.path.isfile(path):
        what = 'does not exist' if not os.path.isdir(folder) else f'has no {META_FILE} (unfinished or not latents)'
        raise FileNotFoundError(f'latent folder {folder!r} {what}; write one with python -m jaxdiff.data.encode '
                                '--autoencoder AE --data SOURCE --out FOLDER')
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f'{path} is unreadable ({e}); re-run python -m jaxdiff.data.encode') from None
    if meta.get('format') != FORMAT or meta.get('mode') not in MODES:
        raise ValueError(f'{path} is not a {FORMAT} file (format {meta.get("format")!r}, mode {meta.get("mode")!r})')
    return meta


class LatentSource:
    """Random access to a latent folder: item i -> dict(image=float32 (h, w, c) [the mean, or the stored draw],
    std=float32 (h, w, c) [mode 'moments' only], label=int32 ()). Shards are read into memory once."""

    def __init__(self, folder: str, meta: dict):
        arrays = [files.read_npz(os.path.join(folder, name), 'a latent shard') for name in meta['shards']]
        key = 'mean' if meta['mode'] == 'moments' else 'latent'
        self.image = np.concatenate([a[key] for a in arrays]).astype(np.float32)
        self.std = np.concatenate([a['std'] for a in arrays]).astype(np.float32) if key == 'mean' else None
        self.labels = np.concatenate([a['labels'] for a in arrays]).astype(np.int32)
        if len(self.image) != meta['count'] or list(self.image.shape[1:]) != list(meta['shape']):
            raise ValueError(f'{folder}: the shards hold {self.image.shape} latents, latents.json says '
                             f'{meta["count"]} x {meta["shape"]}; re-run python -m jaxdiff.data.encode')

    def __len__(self) -> int:
        return len(self.image)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        item = dict(image=self.image[index], label=self.labels[index])
        if self.std is not None:
            item['std'] = self.std[index]
        return item


def make_latent_source(config: Any) -> tuple[LatentSource, DatasetInfo, LatentSpace]:
    """``config.data`` with source 'latents' -> (source, DatasetInfo of the latents, their normalisation)."""
    if config.xflip:
        raise ValueError('data.xflip=True with data.source=latents: the latent of a mirrored image is not the '
                         'mirrored latent; encode the mirrored images too or set --config.data.xflip=False')
    meta = read_meta(config.path)
    h, w, c = meta['shape']
    if h != w:
        raise ValueError(f'{config.path}: latents are {h}x{w}; the diffusion nets need square inputs')
    if config.resolution not in (0, h):
        raise ValueError(f'data.resolution={config.resolution} with latents of side {h}: set it to 0 (latents are '
                         'not resized)')
    num_classes = meta['num_classes'] if config.use_labels else 0
    info = DatasetInfo(resolution=h, channels=c, num_classes=num_classes, size=meta['count'])
    return LatentSource(config.path, meta), info, space_of(meta)


class LatentBatch:
    """grain random map over a host's slice of a global batch: dict(image=(b, h, w, c), [std], label) -> the
    normalised latents (b, h, w, c) float32 and labels. In mode 'moments' each row is mean + std * N(0, 1), the
    noise drawn for the whole global batch from the batch's generator and sliced, so it depends on (seed, step,
    row) alone, whatever the process count."""

    def __init__(self, space: LatentSpace, process_index: int, process_count: int, use_labels: bool):
        self.space, self.index, self.count, self.use_labels = space, process_index, process_count, use_labels

    def __call__(self, batch: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
        z = batch['image']
        if 'std' in batch:
            b = len(z)
            noise = rng.standard_normal((self.count * b, *z.shape[1:]), dtype=np.float32)
            z = z + batch['std'] * noise[self.index * b:(self.index + 1) * b]
        label = batch['label'].astype(np.int32) if self.use_labels else np.zeros(len(z), np.int32)
        return dict(image=self.space.normalize(z).astype(np.float32), label=label)
