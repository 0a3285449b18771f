"""Adversarial training's input pipeline on N generated images: images/s and the process's peak memory.

    python bench/adversarial_data.py [--sizes 100000,1000000] [--steps 200] [--batch 512] [--dir DIR] [--in_memory]

Writes N random 32x32x3 "generated" images as sample.py shards (10,000 per shard, once per size, into DIR), then,
in a fresh process per size, builds the mixed batches of jaxdiff.robust.mixed_data (70% generated / 30% real,
the reference's composition; 5,000 random real images) and draws --steps global batches, reporting images/s and
the process's peak RSS (ru_maxrss). The generated images are read from the shards on demand
(jaxdiff.data.sample_shards), so the peak should not grow with N; --in_memory loads the whole folder instead
(jaxdiff.sampling.shards.load_samples, the old way) for comparison. Prints one JSON line per size.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

SHARD = 10_000
SHAPE = (32, 32, 3)


def write_folder(folder: str, n: int) -> None:
    """N random uint8 images with labels 0-9 as sample.py shards in ``folder`` (skipped when already there)."""
    from jaxdiff.sampling import shards
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    plan = shards.Plan(0, n, SHARD)
    for k in range(plan.num_shards):
        if os.path.exists(shards.shard_path(folder, k)):
            continue
        count = len(plan.seeds(k))
        shards.write_shard(folder, k, rng.integers(0, 256, (count,) + SHAPE, dtype=np.uint8),
                           rng.integers(0, 10, count), plan.seeds(k), 10)
    shards.write_manifest(folder, shards.plan_record(plan, image_shape=list(SHAPE)), shards.shard_entries(folder, plan))


def measure(folder: str, steps: int, batch: int, in_memory: bool) -> dict:
    """Draw ``steps`` mixed batches over the generated folder; images/s and this process's peak RSS."""
    from jaxdiff.data.sources import DatasetInfo
    from jaxdiff.robust import mixed_data
    rng = np.random.default_rng(1)
    real = rng.integers(0, 256, (5000,) + SHAPE, dtype=np.uint8), rng.integers(0, 10, 5000).astype(np.int32)
    if in_memory:
        from jaxdiff.sampling.shards import load_samples
        loaded = load_samples(folder)
        gen_images, gen_labels = loaded['images'], loaded['labels'].astype(np.int32)
    else:
        gen_images, gen_labels = mixed_data.load_generated(folder, SHAPE, 10)
    data = mixed_data.AdvData(*real, gen_images, gen_labels, real[0][:0], real[1][:0],
                              DatasetInfo(SHAPE[0], SHAPE[2], 10, 5000))
    batches = mixed_data.MixedBatches(data, batch, 0.7, seed=0)
    batches.batch(0)
    begin = time.perf_counter()
    for step in range(1, steps + 1):
        out = batches.batch(step)
    seconds = time.perf_counter() - begin
    assert out['image'].shape == (batch,) + SHAPE
    return dict(n_generated=len(gen_labels), in_memory=in_memory, steps=steps, batch=batch,
                images_per_s=steps * batch / seconds, ms_per_batch=1e3 * seconds / steps,
                peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--sizes', default='100000,1000000', help='comma list of generated-set sizes N')
    ap.add_argument('--steps', type=int, default=200, help='timed batches per size')
    ap.add_argument('--batch', type=int, default=512, help='global batch')
    ap.add_argument('--dir', default=os.path.join(tempfile.gettempdir(), 'jaxdiff_adversarial_bench'),
                    help='where the shard folders are written (and reused)')
    ap.add_argument('--in_memory', action='store_true', help='load the whole folder into RAM (the old way)')
    ap.add_argument('--child', default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:  # one measurement in a fresh process, so ru_maxrss is this size's alone
        print(json.dumps(measure(args.child, args.steps, args.batch, args.in_memory)))
        return
    for n in (int(s) for s in args.sizes.split(',')):
        folder = os.path.join(args.dir, f'n{n}')
        begin = time.perf_counter()
        write_folder(folder, n)
        print(f'N={n:,}: shards ready in {time.perf_counter() - begin:.1f} s ({folder})', file=sys.stderr)
        command = [sys.executable, __file__, '--child', folder, '--steps', str(args.steps), '--batch',
                   str(args.batch)] + (['--in_memory'] if args.in_memory else [])
        result = subprocess.run(command, capture_output=True, text=True,
                                env=dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [
                                    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                    os.environ.get('PYTHONPATH')]))))
        if result.returncode:
            raise SystemExit(f'bench: N={n} failed:\n{result.stderr[-3000:]}')
        row = json.loads(result.stdout.strip().splitlines()[-1])
        print(f'N={n:,} ({"in memory" if args.in_memory else "read on demand"}): {row["images_per_s"]:,.0f} '
              f'images/s ({row["ms_per_batch"]:.1f} ms per batch of {args.batch}), peak RSS '
              f'{row["peak_rss_mib"]:,.0f} MiB', file=sys.stderr)
        print(json.dumps(row), flush=True)


if __name__ == '__main__':
    main()
