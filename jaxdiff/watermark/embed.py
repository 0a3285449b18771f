"""Embed ONE fixed bit string into every image of a dataset with a trained codec; write the set as an .npz that
train.py reads (``--config.data.source=npz --config.data.path=OUT/watermarked.npz``) and a JSON report.

    embed(codec_run, out_dir, bits=None, bits_seed=None, data_overrides=None)

The report (``OUT/watermarked.json``) measures the set as written, i.e. after uint8 quantisation: PSNR against
the original uint8 images (mean, min) and the bits the codec's decoder reads back (mean bit accuracy, share of
images with every bit right).
"""
from __future__ import annotations

import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import files
from jaxdiff.data.sources import make_source
from jaxdiff.dir_lock import DirectoryLock
from jaxdiff.tasks.watermark_codec import load_codec
from jaxdiff.watermark import bits as bitlib

NPZ_FILE = 'watermarked.npz'
JSON_FILE = 'watermarked.json'


def load_images(data_config) -> tuple[np.ndarray, np.ndarray, Any]:
    """All images of ``make_source(data_config)`` in memory: (uint8 (N, R, R, C), labels int32 (N,), DatasetInfo).
    Labels are zeros when the data has none or ``use_labels`` is false."""
    source, info = make_source(data_config)
    inner = getattr(source, 'source', None)
    if hasattr(inner, 'images') and data_config.resolution in (0, info.resolution) and \
            inner.images.shape[1] == info.resolution:
        images = np.asarray(inner.images)  # array sources at native size: no per-item copies
        labels = np.asarray(inner.labels, np.int32) if info.num_classes else np.zeros(len(images), np.int32)
    else:
        items = [source[i] for i in range(len(source))]
        images = np.stack([item['image'] for item in items])
        labels = np.asarray([item['label'] for item in items], np.int32)
    return images, labels, info


def _to_uint8(x: jax.Array) -> jax.Array:
    return jnp.round(jnp.clip(x, 0.0, 1.0) * 255.0).astype(jnp.uint8)


def embed_arrays(codec, params, images: np.ndarray, bits: np.ndarray, batch_size: int = 256,
                 print_fn: Callable = print) -> tuple[np.ndarray, np.ndarray]:
    """Watermark uint8 images (N, H, W, C) with ``bits`` (n,) and decode the quantised result.

    Returns (watermarked uint8 (N, H, W, C), decoder logits (N, n)). Batched and jitted (the last batch is
    padded to the batch size, so one program serves all batches); a progress line about every 10%.
    """
    n = len(images)
    bits_row = jnp.asarray(bits, jnp.float32)[None]

    @jax.jit
    def run(batch):
        x = batch.astype(jnp.float32) / 255.0
        watermarked = _to_uint8(codec.apply(params, jnp.broadcast_to(bits_row, (x.shape[0], bits_row.shape[1])), x,
                                            method='encode'))
        logits = codec.apply(params, watermarked.astype(jnp.float32) / 255.0, method='decode')
        return watermarked, logits

    outs, logits_all = [], []
    batch_size = max(1, min(batch_size, n))
    every = max(1, (n // batch_size) // 10)
    start = time.time()
    for i, first in enumerate(range(0, n, batch_size)):
        batch = images[first:first + batch_size]
        real = len(batch)
        if real < batch_size:
            batch = np.concatenate([batch, np.zeros((batch_size - real,) + batch.shape[1:], batch.dtype)])
        watermarked, logits = jax.device_get(run(batch))
        outs.append(watermarked[:real])
        logits_all.append(logits[:real])
        done = first + real
        if (i + 1) % every == 0 or done == n:
            print_fn(f'embedded {done}/{n} images ({done / max(time.time() - start, 1e-9):.0f} img/s)')
    return np.concatenate(outs), np.concatenate(logits_all)


def embed(codec_run: str, out_dir: str, *, bits: str | None = None, bits_seed: int | None = None,
          data_overrides: dict | None = None, batch_size: int = 256, print_fn: Callable = print) -> dict:
    """Watermark every image of the codec run's data (``data_overrides``: ``{field: value}`` of ``config.data``
    to read another source) with one bit string (``bits`` '0101...' or ``bits_seed``; seed 0 if neither) and
    write ``out_dir/watermarked.npz`` (images uint8 (N, R, R, C), labels int32 (N,) when the data has labels)
    and ``out_dir/watermarked.json``. Returns the JSON's dict.

    Raises FileNotFoundError / ValueError (one line) for a missing run, a bad bit string, data of another
    resolution or channel count than the codec's.
    """
    run = load_codec(codec_run)
    config, info = run.config, run.info
    watermark = bitlib.make_bits(config.num_bits, bits, bits_seed)
    data = config.data
    if data_overrides:
        data = data.copy_and_resolve_references()
        data.unlock()
        for key, value in data_overrides.items():
            if key not in data:
                raise ValueError(f'unknown data field {key!r}: config.data has {", ".join(sorted(data.keys()))}')
            data[key] = value
    data = data.copy_and_resolve_references()
    data.unlock()
    data.use_labels = True  # labels are kept whatever the codec was trained with
    images, labels, data_info = load_images(data)
    if (data_info.resolution, data_info.channels) != (info.resolution, info.channels):
        raise ValueError(f'the data are {data_info.resolution}x{data_info.resolution}x{data_info.channels} but the '
                         f'codec in {codec_run} was trained at {info.resolution}x{info.resolution}x'
                         f'{info.channels}; set --config.data.resolution or train a codec for this data')
    watermarked, logits = embed_arrays(run.net, run.variables, images, watermark, batch_size, print_fn)
    accuracy = bitlib.bit_accuracy(logits, watermark)
    matches = bitlib.all_match(logits, watermark)
    psnr = bitlib.psnr(watermarked, images)
    finite = psnr[np.isfinite(psnr)]

    npz_path = os.path.join(out_dir, NPZ_FILE)
    arrays = {'images': watermarked}
    if data_info.num_classes > 0:
        arrays['labels'] = labels

    def write(tmp: str) -> None:
        with open(tmp, 'wb') as f:
            np.savez(f, **arrays)
    report = {
        'npz': os.path.abspath(npz_path),
        'bits': bitlib.bits_to_str(watermark),
        'num_bits': int(config.num_bits),
        'num_images': int(len(images)),
        'resolution': int(data_info.resolution),
        'channels': int(data_info.channels),
        'labels': bool(data_info.num_classes > 0),
        'psnr_mean': float(np.mean(finite)) if finite.size else None,  # unchanged images (inf dB) left out
        'psnr_min': float(np.min(finite)) if finite.size else None,
        'unchanged_images': int(np.sum(~np.isfinite(psnr))),
        'bit_acc_mean': float(np.mean(accuracy)),
        'bit_acc_min': float(np.min(accuracy)),
        'all_bits_share': float(np.mean(matches)),
        'codec': os.path.abspath(codec_run),
        'data': {k: data[k] for k in sorted(data.keys())},
        'train_with': f'--config.data.source=npz --config.data.path={os.path.abspath(npz_path)}',
    }
    with DirectoryLock(out_dir, 'watermark.py embed'):  # one writer per output folder
        files.atomic_write(npz_path, write)
        files.write_json(os.path.join(out_dir, JSON_FILE), report)
    return report
