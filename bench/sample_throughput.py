"""Sampling throughput of a net config, solver and step count on the available devices.

    python bench/sample_throughput.py --config configs/diffusion/cifar10_ddpmpp_cond.py [--solver edm] [--num_steps 18]
                                      [--batch 256] [--batches 5] [--dtype bfloat16] [--guidance SPEC]

Times the function sample.py runs (jaxdiff.sampling.generate: per-seed latents and keys, the solver's scan,
uint8 conversion) on random-init params of the config's net, its batch sharded over this process's devices.
--guidance takes sample.py's spec (``2`` = ``cfg:weight=2``; ``cfg:weight=2,batched=False`` evaluates the
conditional and unconditional rows in two calls instead of one on the doubled batch, to measure what batching
gains; ``cfg:weight=2,interval=0.28:2.9`` skips the unconditional rows outside the interval).
Reports compile time, seconds per batch, img/s, network evaluations per image (NFE: rows the network sees per
image, doubled by CFG) and network evaluations per second, then one JSON line (``setup_s``: the seconds before the generator's compile,
spent on the params' init and the NFE count). The images are noise (the params are random); the cost is a
trained model's.
"""
from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.config import from_file
from jaxdiff.sampling import generate as gen
from jaxdiff.sampling import options
from jaxdiff.nets.from_config import build_net, denoiser_fn
from jaxdiff.tasks.sample_grid import sigma_range
from jaxdiff.parallel import make_mesh
from jaxdiff.tasks.denoiser import init_sharded_state
from train_throughput import dataset_info


def count_net_evals(solver, transform, labels, image_shape) -> int:
    """Network evaluations per sample: the solver (and transforms) run once on a 1-sample stand-in network that
    reports the rows of every call to the host (a trace would count a scanned step once; a stacked CFG call on
    2 rows counts 2)."""
    calls = []

    def stand_in(x, sigma, cond=None):
        jax.debug.callback(lambda: calls.append(x.shape[0]))
        return jnp.zeros_like(x)

    denoiser = stand_in if transform is None else transform(stand_in)
    jax.block_until_ready(gen.generate(lambda _: denoiser, solver, labels, image_shape, None, {}, jnp.zeros(1, jnp.int32)))
    return sum(calls)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--config', required=True, help='training config naming the net, e.g. configs/diffusion/digits.py')
    ap.add_argument('--solver', default='edm', choices=list(options.SOLVERS))
    ap.add_argument('--num_steps', type=int, default=18, help='solver steps (where the solver has num_steps)')
    ap.add_argument('--batch', type=int, default=256, help='batch over all local devices')
    ap.add_argument('--batches', type=int, default=5, help='timed batches after the warm-up batch')
    ap.add_argument('--dtype', choices=('float32', 'bfloat16'), default=None, help='compute dtype override')
    ap.add_argument('--guidance', default=None, help='a sample.py --guidance spec, e.g. 2 (CFG weight 2)')
    args = ap.parse_args()

    begin = time.perf_counter()
    config = from_file(args.config)
    with config.unlocked():
        config.model.dtype = args.dtype or config.model.dtype
    info = dataset_info(config)
    net = build_net(config, info)
    # The train bench's init program: in bench/gpu_suite.sh the compilation cache then serves it from a train row.
    variables = {'params': init_sharded_state(config, net, info, jax.random.key(config.seed),
                                              make_mesh(config.parallel.fsdp)).params}
    settings = {'num_steps': args.num_steps} if 'num_steps' in options.solver_defaults(args.solver) else {}
    resolved = options.resolve_solver(args.solver, settings, sigma_range(config))
    transform, _ = options.make_transform([args.guidance] if args.guidance is not None else [],
                                          net.label_dim, args.solver, resolved, sigma_range(config))
    base = lambda v: denoiser_fn(config, net, v)  # noqa: E731
    denoiser = base if transform is None else (lambda v: transform(base(v)))
    labels = gen.make_labels(net.label_dim, class_balanced=bool(net.label_dim))
    image_shape = (info.resolution, info.resolution, info.channels)
    solver = options.make_solver(args.solver, resolved)
    evals = count_net_evals(solver, transform, labels, image_shape)

    mesh = gen.local_mesh()
    fn = gen.make_generator(denoiser, solver, labels, image_shape, mesh)
    variables = jax.device_put(variables, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    seeds = np.arange(args.batch, dtype=np.int32)
    jax.block_until_ready(variables)
    start = time.perf_counter()
    setup_s = start - begin
    jax.block_until_ready(fn(variables, seeds))
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    for i in range(1, args.batches + 1):
        out = fn(variables, seeds + i * args.batch)
    jax.block_until_ready(out)
    batch_s = (time.perf_counter() - start) / args.batches
    kind = jax.devices()[0].device_kind
    result = dict(config=args.config, solver=args.solver, num_steps=settings.get('num_steps'), net_evals=evals,
                  guidance=args.guidance, batch=args.batch, dtype=config.model.dtype,
                  devices=jax.local_device_count(), device_kind=kind, setup_s=setup_s, compile_s=compile_s,
                  batch_s=batch_s, img_per_s=args.batch / batch_s, net_evals_per_s=args.batch * evals / batch_s)
    steps = settings.get('num_steps', 'default')
    print(f'{args.config}: {args.solver} {steps} steps ({evals} net evals/img), batch {args.batch}, '
          f'{config.model.dtype}, {jax.local_device_count()} x {kind}: compile+first batch {compile_s:.1f} s, '
          f'{batch_s:.3f} s/batch, {result["img_per_s"]:.1f} img/s, {result["net_evals_per_s"]:.0f} net evals/s')
    print(json.dumps(result))


if __name__ == '__main__':
    main()
