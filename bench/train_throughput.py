"""Training throughput of a config on the available devices: compile time, step time, img/s and MFU.

    python bench/train_throughput.py --config configs/diffusion/cifar10_ddpmpp_cond.py [--batch 512] [--steps 20]
                                     [--dtype bfloat16] [--fsdp 1] [--peak_tflops 989]

Runs the real sharded train step (jaxdiff.tasks.denoiser.make_train_step) on a synthetic batch of the config's
image shape, so the number measures the model + optimizer + EMA, not the input pipeline. Model FLOPs per
step come from the step's jaxpr (bench/flops.py); MFU is against the dense bf16 peak of the device
(see bench/net_step.py's PEAK_BF16) unless --peak_tflops is given. Prints a summary and one JSON line, which
also holds the seconds spent before the step's compile: ``setup_s`` (net, params and optimizer state, the init
compiled under jit) and ``flops_s`` (tracing the step for its FLOP count).
"""
from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np

from flops import count_flops
from jaxdiff.config import from_file
from jaxdiff.data import DatasetInfo
from jaxdiff.parallel import batch_sharding, make_mesh
from jaxdiff.nets.from_config import build_net
from jaxdiff.tasks.denoiser import init_sharded_state, make_train_step
from net_step import PEAK_BF16

# Image shape and classes of the datasets the reference configs name (no data is read).
DATASETS = {'digits': (8, 1, 10), 'fashion_mnist': (32, 1, 10), 'cifar10': (32, 3, 10), 'ffhq': (64, 3, 0),
            'afhqv2': (64, 3, 0), 'imagenet': (64, 3, 1000)}


def dataset_info(config) -> DatasetInfo:
    """Image shape and class count implied by the config (resolution override wins), without reading data."""
    name = config.data.tfds_name or config.data.source
    key = next((k for k in DATASETS if k in name or k in config.data.path), None)
    if key is None:
        raise SystemExit(f'bench: cannot tell the image shape of data {name!r}; add it to DATASETS')
    res, channels, classes = DATASETS[key]
    return DatasetInfo(config.data.resolution or res, channels, classes, 0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--config', required=True, help='config file, e.g. configs/diffusion/cifar10_ddpmpp_cond.py')
    ap.add_argument('--batch', type=int, default=None, help='global batch (default: the config\'s)')
    ap.add_argument('--steps', type=int, default=20, help='timed steps after the warm-up step')
    ap.add_argument('--dtype', choices=('float32', 'bfloat16'), default=None, help='compute dtype override')
    ap.add_argument('--fsdp', type=int, default=None, help='fsdp axis size override')
    ap.add_argument('--peak_tflops', type=float, default=None, help='peak TFLOP/s for MFU (default by device)')
    args = ap.parse_args()

    begin = time.perf_counter()
    config = from_file(args.config)
    with config.unlocked():
        config.batch_size = args.batch or config.batch_size
        config.model.dtype = args.dtype or config.model.dtype
        config.parallel.fsdp = args.fsdp or config.parallel.fsdp
    info = dataset_info(config)
    net = build_net(config, info)
    mesh = make_mesh(config.parallel.fsdp)
    b = config.batch_size
    rng = np.random.default_rng(0)
    batch = {'image': rng.uniform(-1, 1, (b, info.resolution, info.resolution, info.channels)).astype(np.float32),
             'label': rng.integers(0, max(info.num_classes, 1), b).astype(np.int32)}
    batch = jax.device_put(batch, batch_sharding(mesh))

    state = init_sharded_state(config, net, info, jax.random.key(config.seed), mesh)
    step_fn = make_train_step(config, net, mesh)
    key = jax.random.key(1)
    jax.block_until_ready(state)
    setup_s = time.perf_counter() - begin
    flops = count_flops(step_fn, state, batch, key)
    flops_s = time.perf_counter() - begin - setup_s

    start = time.perf_counter()
    state, metrics = step_fn(state, batch, key)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(args.steps):
        state, metrics = step_fn(state, batch, key)
    jax.block_until_ready(metrics)
    step_s = (time.perf_counter() - start) / args.steps

    kind = jax.devices()[0].device_kind
    peak = 1e12 * args.peak_tflops if args.peak_tflops else next(
        (v for k, v in PEAK_BF16.items() if kind.startswith(k)), None)
    peak_total = peak * jax.device_count() if peak else None
    params = sum(x.size for x in jax.tree.leaves(state.params))
    result = dict(config=args.config, batch=b, dtype=config.model.dtype, fsdp=config.parallel.fsdp,
                  devices=jax.device_count(), device_kind=kind, params=int(params), setup_s=setup_s, flops_s=flops_s,
                  compile_s=compile_s,
                  step_ms=1e3 * step_s, img_per_s=b / step_s, gflop_per_step=flops / 1e9,
                  mfu=flops / step_s / peak_total if peak_total else None, loss=float(metrics['loss']))
    mfu = f', MFU {100 * result["mfu"]:.1f}%' if result['mfu'] else ''
    print(f'{args.config}: {params:,} params, batch {b}, {config.model.dtype}, {jax.device_count()} x {kind}: '
          f'compile+first step {compile_s:.1f} s, {result["step_ms"]:.1f} ms/step, {result["img_per_s"]:.0f} img/s'
          f'{mfu}')
    print(json.dumps(result))


if __name__ == '__main__':
    main()
