"""Forward and forward+backward speed of the EDM networks and DiT.

    python bench/net_step.py --net ddpmpp_cifar_cond|ncsnpp_cifar_uncond|adm_imagenet64_cond|dit_xl2_256|tiny
                             --batch B [--dtype bfloat16] [--steps N]

Prints the parameter count, the jitted step times (after one warm-up call, synchronised with block_until_ready),
img/s for each, the model FLOPs of each step (bench/flops.py: 2 x MACs of matmuls and convolutions) and the
model FLOP utilisation (MFU) against the device's dense bf16 peak (H100/H200 SXM: 989 TFLOP/s;
--peak_tflops overrides), then one JSON line.
"""
from __future__ import annotations

import argparse
import json
import math
import time

import jax
import jax.numpy as jnp

from jaxdiff.nets import DhariwalUNet, DiT, SongUNet

from flops import count_flops

_DDPMPP_CIFAR = dict(img_resolution=32, in_channels=3, out_channels=3, model_channels=128, channel_mult=(2, 2, 2),
                     channel_mult_emb=4, num_blocks=4, attn_resolutions=(16,), dropout=0.13,
                     embedding_type='positional', channel_mult_noise=1, encoder_type='standard',
                     decoder_type='standard', resample_filter=(1, 1))
# name -> (network class, constructor kwargs); the EDM and DiT papers' settings.
NETS = {
    'ddpmpp_cifar_cond': (SongUNet, dict(_DDPMPP_CIFAR, label_dim=10, augment_dim=9)),
    'ncsnpp_cifar_uncond': (SongUNet, dict(_DDPMPP_CIFAR, embedding_type='fourier', channel_mult_noise=2,
                                           encoder_type='residual', resample_filter=(1, 3, 3, 1))),
    'adm_imagenet64_cond': (DhariwalUNet, dict(img_resolution=64, in_channels=3, out_channels=3, label_dim=1000,
                                               model_channels=192, channel_mult=(1, 2, 3, 4), num_blocks=3,
                                               attn_resolutions=(32, 16, 8), dropout=0.1)),
    # DiT-XL/2 on ImageNet-256 latents (32x32x4), with learned variance, as the reference trains it.
    'dit_xl2_256': (DiT, dict(img_resolution=32, in_channels=4, label_dim=1000, patch_size=2, hidden_size=1152,
                              depth=28, num_heads=16)),
    'tiny': (SongUNet, dict(img_resolution=16, in_channels=3, out_channels=3, label_dim=10, model_channels=32,
                            channel_mult=(1, 2), num_blocks=1, attn_resolutions=(8,))),
}


def make_inputs(net, batch: int, key: jax.Array):
    """Random (x (B, H, W, C), noise_labels (B,), class_labels (B, label_dim) or None, augment (B, A) or None)."""
    kx, kn, kc, ka = jax.random.split(key, 4)
    x = jax.random.normal(kx, (batch, net.img_resolution, net.img_resolution, net.in_channels))
    noise = jax.random.normal(kn, (batch,))
    labels = None
    if net.label_dim:
        labels = jax.nn.one_hot(jax.random.randint(kc, (batch,), 0, net.label_dim), net.label_dim)
    augment = jax.random.normal(ka, (batch, net.augment_dim)) if net.augment_dim else None
    return x, noise, labels, augment


# Dense bf16 peak FLOP/s by device kind prefix, for the MFU estimate.
PEAK_BF16 = {'NVIDIA H100': 989e12, 'NVIDIA H200': 989e12, 'TPU v5p': 459e12, 'TPU v4': 275e12}


def time_steps(fn, args, steps: int) -> float:
    """Seconds per call of ``fn(*args)`` after one warm-up call."""
    jax.block_until_ready(fn(*args))
    start = time.perf_counter()
    for _ in range(steps):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--net', choices=sorted(NETS), required=True)
    parser.add_argument('--batch', type=int, required=True)
    parser.add_argument('--dtype', choices=('float32', 'bfloat16'), default='float32')
    parser.add_argument('--steps', type=int, default=10)
    parser.add_argument('--peak_tflops', type=float, default=None, help='peak TFLOP/s for MFU (default by device)')
    args = parser.parse_args()

    cls, kwargs = NETS[args.net]
    net = cls(**kwargs, dtype=jnp.dtype(args.dtype))
    inputs = make_inputs(net, args.batch, jax.random.key(0))
    variables = jax.jit(net.init)(jax.random.key(1), *inputs)
    params = sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(variables['params']))

    forward = jax.jit(lambda v, *a: net.apply(v, *a, train=False))

    @jax.jit
    def forward_backward(v, key, *a):
        # Training mode (dropout on) and a scalar loss, so the backward pass is what training pays for.
        def loss(p):
            out = net.apply({**v, 'params': p}, *a, train=True, rngs={'dropout': key})
            return jnp.mean(jnp.square(out.astype(jnp.float32)))
        return jax.grad(loss)(v['params'])

    kind = jax.devices()[0].device_kind
    peak = 1e12 * args.peak_tflops if args.peak_tflops else next(
        (v for k, v in PEAK_BF16.items() if kind.startswith(k)), None)
    result = dict(net=args.net, batch=args.batch, dtype=args.dtype, params=params, device=str(jax.devices()[0]),
                  device_kind=kind)
    steps = (('forward', forward, (variables, *inputs)),
             ('forward_backward', forward_backward, (variables, jax.random.key(2), *inputs)))
    for name, fn, fn_args in steps:
        start = time.perf_counter()
        compiled = fn.lower(*fn_args).compile()
        flops = count_flops(fn, *fn_args)
        result[name + '_compile_s'] = time.perf_counter() - start
        secs = time_steps(compiled, fn_args, args.steps)
        result[name + '_ms'] = 1e3 * secs
        result[name + '_img_per_s'] = args.batch / secs
        result[name + '_gflop'] = flops / 1e9 if flops else None
        result[name + '_mfu'] = flops / secs / peak if flops and peak else None
    print(f'{args.net}: {params:,} params, batch {args.batch}, {args.dtype}, on {kind}')
    for name, _, _ in steps:
        mfu = result[name + '_mfu']
        print(f'  {name.replace("_", "+"):16s} {result[name + "_ms"]:9.2f} ms  {result[name + "_img_per_s"]:10.1f} img/s'
              f'  compile {result[name + "_compile_s"]:6.1f} s' + (f'  MFU {100 * mfu:5.1f}%' if mfu else ''))
    print(json.dumps(result))


if __name__ == '__main__':
    main()
