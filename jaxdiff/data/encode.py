"""Encode an image dataset with an autoencoder into a latent folder (:mod:`jaxdiff.data.latents`).

    python -m jaxdiff.data.encode --autoencoder RUN_OR_DIFFUSERS_DIR --data fashion_mnist --out latents/fmnist \\
        [--data_path P] [--split train] [--resolution 32] [--no_labels] [--mode moments|sample] \\
        [--normalization channel|scale] [--batch_size 256] [--seed 0]

--autoencoder: a train.py run of ``configs/autoencoder/*.py`` or a diffusers AutoencoderKL folder; --data and its
flags: any image source of ``config.data`` (digits, fashion_mnist, npz, folder, array_record, tfds) with the same
resolution rule as training. --mode moments (default, EDM2) stores each image's posterior mean and std, and
training draws a fresh latent from them at every read; --mode sample stores one posterior draw (key
``fold_in(key(seed), index)``). --normalization: see :mod:`jaxdiff.data.latents`. Prints a progress line and,
last, one JSON line (count, shape, per-channel statistics). A finished --out is never overwritten.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

import numpy as np

from jaxdiff.data import latents

PROG = 'python -m jaxdiff.data.encode'


def encode_images(net, variables: dict, images: np.ndarray, *, sample_key=None, batch_size: int = 256,
                  log=print) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (N, H, W, C) -> (mean, std), each float32 (N, h, w, c); with ``sample_key``, (one posterior draw
    per image, drawn with fold_in(sample_key, index), None). Fixed-size jitted batches (the last one padded)."""
    import jax
    import jax.numpy as jnp
    from jaxdiff.nets.autoencoder_kl import latent_sample
    from jaxdiff.progress import Progress

    @jax.jit
    def encode(v, x, index):
        mean, logvar = net.apply(v, x.astype(jnp.float32) / 127.5 - 1, method=net.encode)
        if sample_key is None:
            return mean, jnp.exp(0.5 * logvar)
        keys = jax.vmap(lambda i: jax.random.fold_in(sample_key, i))(index)
        draw = jax.vmap(lambda m, lv, k: latent_sample(m[None], lv[None], k)[0])(mean, logvar, keys)
        return draw, draw

    n, batch = len(images), min(batch_size, len(images))
    means, stds, progress = [], [], Progress('encoded', n, log)
    for start in range(0, n, batch):
        chunk = images[start:start + batch]
        real = len(chunk)
        if real < batch:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch - real, axis=0)])
        mean, std = jax.device_get(encode(variables, chunk, np.arange(start, start + batch, dtype=np.int32)))
        means.append(np.asarray(mean[:real], np.float32))
        stds.append(np.asarray(std[:real], np.float32))
        progress.add(real)
    return np.concatenate(means), (None if sample_key is not None else np.concatenate(stds))


def _data_config(args):
    """config.data of the image source named by the flags (base_config's defaults otherwise)."""
    from jaxdiff.config import base_config
    data = base_config().data
    data.update(source=args.data, path=args.data_path, split=args.split, resolution=args.resolution,
                use_labels=not args.no_labels, tfds_name=args.tfds_name)
    return data


def encode_dataset(args) -> dict:
    """The CLI's work: load the autoencoder and the images, encode, write the folder; returns latents.json."""
    import jax
    from jaxdiff.autoencoders import load_autoencoder
    from jaxdiff.data.sources import make_source
    if os.path.isfile(os.path.join(args.out, latents.META_FILE)):
        raise FileExistsError(f'{args.out} already holds latents ({latents.META_FILE}); choose a new --out or '
                              'delete it')
    net, variables, description = load_autoencoder(args.autoencoder)
    data = _data_config(args)
    source, info = make_source(data)
    if info.channels != net.in_channels:
        raise ValueError(f'--data {args.data} has {info.channels}-channel images; the autoencoder takes '
                         f'{net.in_channels}')
    items = [source[i] for i in range(len(source))]
    images = np.stack([x['image'] for x in items])
    labels = np.asarray([x['label'] for x in items], np.int32)
    key = jax.random.key(args.seed) if args.mode == 'sample' else None
    mean, std = encode_images(net, variables, images, sample_key=key, batch_size=args.batch_size)
    scaling = description.get('scaling_factor')
    return latents.write_latents(args.out, mean, std, labels, num_classes=info.num_classes, autoencoder=description,
                                 image_shape=images.shape[1:], source=data.to_dict(),
                                 normalization=args.normalization, scaling_factor=scaling)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line (module docstring)."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument('--autoencoder', required=True, help='autoencoder train.py run or diffusers VAE folder')
    parser.add_argument('--data', required=True, help='image source (config.data.source)')
    parser.add_argument('--data_path', default='', help="its file or folder ('' = the source's default)")
    parser.add_argument('--tfds_name', default='', help='TFDS dataset name (--data tfds)')
    parser.add_argument('--split', default='train', help='dataset split')
    parser.add_argument('--resolution', type=int, default=0, help="image side (0 = the source's own)")
    parser.add_argument('--no_labels', action='store_true', help='store zero labels (unconditional)')
    parser.add_argument('--out', required=True, help='the latent folder to write')
    parser.add_argument('--mode', choices=latents.MODES, default='moments', help='store posterior moments or a draw')
    parser.add_argument('--normalization', choices=latents.NORMALIZATIONS, default='channel',
                        help='per-channel statistics (EDM2) or a scaling factor (SD)')
    parser.add_argument('--batch_size', type=int, default=256, help='images per jitted encoder call')
    parser.add_argument('--seed', type=int, default=0, help='seed of the posterior draws (--mode sample)')
    args = parser.parse_args(argv)
    if args.batch_size <= 0:
        parser.error(f'--batch_size {args.batch_size} must be positive')
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: 0 on success; a bad flag exits 2, anything else that stops it 1, after one error line."""
    from jaxdiff.cli import fail
    args = parse_args(argv)
    try:
        meta = encode_dataset(args)
    except (OSError, ValueError) as e:
        fail(PROG, str(e), 1)
    print(f"wrote {meta['count']:,} latents {'x'.join(map(str, meta['shape']))} ({meta['mode']}, "
          f"{meta['normalization']}) to {os.path.abspath(args.out)}")
    print(json.dumps({k: meta[k] for k in ('count', 'shape', 'mode', 'normalization', 'channel_mean',
                                           'channel_std', 'scaling_factor')}))
    return 0


if __name__ == '__main__':
    sys.exit(main())
