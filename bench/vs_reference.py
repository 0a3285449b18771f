"""jaxdiff's DDPM++ CIFAR-10 network against NVIDIA's EDM torch reference, on CPU, side by side.

    python bench/vs_reference.py --edm_repo PATH [--torch_python PY] [--batch 8] [--rounds 7] [--iters 10]
                                 [--threads 2] [--cpus 0,1] [--check | --profile]

Network: ``ddpmpp_cifar_cond`` of bench/net_step.py under EDM preconditioning; in the reference
``training.networks.EDMPrecond`` with the kwargs of EDM's train.py ``--arch=ddpmpp --cond=1``. float32. Measured:
- forward: the denoiser D(x, sigma, class_labels) in eval mode (jitted apply / ``torch.no_grad``);
- train: EDMLoss (P_mean=-1.2, P_std=1.2, sigma_data=0.5; summed / batch as EDM's training loop) forward +
  backward + Adam (lr 1e-3: optax.adam / torch.optim.Adam), dropout on, augment labels zero.

How: the driver (run by jaxdiff's venv) starts two persistent workers, this file with ``--worker jax`` and, under
the interop python, ``--worker torch``. Each builds its network once and warms up (jit compile / first calls),
then answers 'forward N' / 'train N' on stdin with the seconds of N back-to-back synchronised calls. The driver
alternates rounds (jax, torch, jax, torch, ...) so one worker computes at a time and slow drifts of the machine
hit both, and reports each side's median seconds per call, the median over rounds of the per-round ratio
jaxdiff/torch (round k paired with round k) with its min and max, then one JSON line. Threads: torch gets
set_num_threads(T) and set_num_interop_threads(1). XLA's CPU backend has no "T intra-op threads" flag
(``--xla_cpu_multi_thread_eigen=false`` forces one); it sizes its pools from the CPUs the process may run on,
so both workers run under ``taskset -c CPUS`` (default 0,1 where taskset exists).

``--check`` times nothing: the torch worker randomises its weights (so EDM's near-zero-initialised layers
matter), jaxdiff loads them with ``jaxdiff.nets.convert.from_edm``, both run D on one input, and it prints the
max relative error max|D_jax - D_torch| / max|D_torch|.

``--profile`` runs ``--iters`` calls of each measurement under each side's profiler (jax.profiler's trace of the
XLA thunks, mapped to the compiled HLO; torch.profiler's self CPU time per aten op) and prints milliseconds per
call by kind of op: convolution (with GFLOP/s, counted from the compiled HLO's convolutions, which both sides
compute), matmul, layout copies (transposes, copies) and other (normalisation, activations, elementwise,
reductions, the optimiser). EDM's 2x resampling is a depthwise convolution in torch and strided slices in
jaxdiff, so it lands in different rows (a few ms).

Interop venv (torch stays out of jaxdiff's venv; the reference needs torch and numpy only)::

    python3 -m venv /tmp/interop
    /tmp/interop/bin/pip install torch==2.13.0 numpy  # CPU build: torch==2.13.0+cpu, or --index-url .../whl/cpu
    export JAXDIFF_TORCH_PYTHON=/tmp/interop/bin/python JAXDIFF_EDM_REPO=/tmp/edm  # or --torch_python, --edm_repo
    git clone https://github.com/NVlabs/edm /tmp/edm  # needs dnnlib/, torch_utils/, training/
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

MEASUREMENTS = ('forward', 'train')
LABEL_DIM, AUGMENT_DIM, RES = 10, 9, 32
# EDM train.py for --arch=ddpmpp --cond=1 (augment_dim=9 comes with its default --augment=0.12, dropout 0.13).
REF_KWARGS = dict(img_resolution=RES, img_channels=3, label_dim=LABEL_DIM, model_type='SongUNet',
                  model_channels=128, channel_mult=[2, 2, 2], augment_dim=AUGMENT_DIM, dropout=0.13,
                  embedding_type='positional', encoder_type='standard', decoder_type='standard',
                  channel_mult_noise=1, resample_filter=[1, 1])
LR, WARMUP_CALLS, SEED = 1e-3, 2, 0


# ---------------------------------------------------------------- workers: one network each, commands on stdin

def jax_worker(args):
    """Build jaxdiff's network, its jitted denoiser and train step; return (info, {command: fn(n)}, check)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from jaxdiff import losses, precond
    from jaxdiff.nets.convert import from_edm
    from net_step import NETS  # bench/ is sys.path[0]: this file lives there

    cls, kwargs = NETS['ddpmpp_cifar_cond']
    net, b = cls(**kwargs), args.batch
    kx, kl, ks, kinit, kstep = jax.random.split(jax.random.key(SEED), 5)
    x = jax.random.normal(kx, (b, RES, RES, 3))
    labels = jax.nn.one_hot(jax.random.randint(kl, (b,), 0, LABEL_DIM), LABEL_DIM)
    sigma = jnp.exp(-1.2 + 1.2 * jax.random.normal(ks, (b,)))
    augment = jnp.zeros((b, AUGMENT_DIM))
    variables = jax.jit(net.init)(kinit, x, sigma, labels, augment_labels=augment)
    tx = optax.adam(LR)

    forward = jax.jit(lambda v, x, s, c: precond.edm(net, v, label_dim=LABEL_DIM)(x, s, c))

    def _step(params, opt_state, key, images, labels):
        key, k_loss, k_drop = jax.random.split(key, 3)

        def loss_fn(p):
            den = precond.edm(net, {'params': p}, label_dim=LABEL_DIM, augment_labels=augment,
                              train=True, rngs={'dropout': k_drop})
            return jnp.sum(losses.edm_loss(den, images, k_loss, labels)) / images.shape[0]
        grads = jax.grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, key
    # Donated like torch's in-place update, so neither side pays for copying 55M parameters per step; the
    # trained params are a copy because forward keeps using the initial ones.
    step = jax.jit(_step, donate_argnums=(0, 1))
    params = jax.tree_util.tree_map(jnp.copy, variables['params'])
    state = [params, tx.init(params), kstep]

    def run_forward(n):
        for _ in range(n):
            jax.block_until_ready(forward(variables, x, sigma, labels))

    def run_train(n):
        for _ in range(n):
            state[:] = step(*state, x, labels)
        jax.block_until_ready(state)

    def check(folder):
        sd = dict(np.load(os.path.join(folder, 'torch_state.npz')))
        io = np.load(os.path.join(folder, 'io.npz'))
        out = forward(from_edm(sd, net), io['x'].transpose(0, 2, 3, 1), io['sigma'], io['labels'])
        diff = np.abs(np.asarray(out).transpose(0, 3, 1, 2) - io['out'])
        return dict(max_abs_err=float(diff.max()), max_rel_err=float(diff.max() / np.abs(io['out']).max()))

    def profile(measurement, n):
        compiled = (forward.lower(variables, x, sigma, labels) if measurement == 'forward'
                    else step.lower(*state, x, labels)).compile()
        return xla_op_profile(compiled.as_text(), lambda: (run_forward if measurement == 'forward'
                                                             else run_train)(n), n)

    count = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(variables['params']))
    info = dict(params=count, jax=jax.__version__, backend=jax.default_backend(),
                xla_flags=os.environ.get('XLA_FLAGS', ''))
    return info, dict(forward=run_forward, train=run_train), check, profile


KINDS = ('convolution', 'matmul', 'layout copies', 'other')
_HLO_INSTR = re.compile(r'^\s*(?:ROOT )?%(\S+) = (\S+?)(?:\{[^}]*\})? (\w[\w-]*)\((.*)$')


def hlo_kinds(hlo: str) -> tuple[dict[str, str], float]:
    """Each instruction of a compiled HLO module -> its kind (KINDS), and the FLOPs of all its convolutions.

    An instruction's kind is that of the first match over its own opcode and the opcodes of the computation it
    calls (a fusion's body): convolution, dot (matmul), else only copies/transposes/reversals (layout copies:
    flipped kernels, activations put in the layout a convolution wants), else other. Convolution FLOPs: 2 x output elements x window size x contracted input features per group.
    """
    bodies, shapes, current = {}, {}, None
    for line in hlo.splitlines():
        head = re.match(r'^(?:ENTRY )?%(\S+) \(.*\{$', line)
        if head:
            current = bodies.setdefault(head.group(1), [])
            continue
        m = _HLO_INSTR.match(line)
        if m and current is not None:
            name, shape, opcode, rest = m.groups()
            shapes[name] = [int(d) for d in re.findall(r'\d+', shape.split('[', 1)[-1])] if '[' in shape else []
            current.append((name, opcode, rest))
    flops = 0.0
    for instrs in bodies.values():
        for name, opcode, rest in instrs:
            if opcode != 'convolution':
                continue
            lhs = re.match(r'%(\S+?),', rest).group(1)
            labels = re.search(r'dim_labels=(\w+)_', rest).group(1)
            window = re.search(r'size=([\dx]+)', rest)
            groups = re.search(r'feature_group_count=(\d+)', rest)
            taps = math.prod(int(w) for w in window.group(1).split('x')) if window else 1
            flops += (2 * math.prod(shapes[name]) * taps * shapes[lhs][labels.index('f')]
                      / (int(groups.group(1)) if groups else 1))
    kinds = {}
    for instrs in bodies.values():
        for name, opcode, rest in instrs:
            called = re.search(r'calls=%([^,\s]+)', rest)
            ops = {opcode} | ({op for _, op, _ in bodies.get(called.group(1), [])} if called else set())
            ops -= {'parameter', 'constant', 'bitcast', 'fusion'}
            kinds[name] = ('convolution' if 'convolution' in ops else 'matmul' if 'dot' in ops else
                           'layout copies' if ops and ops <= {'copy', 'transpose', 'reverse'} else 'other')
    return kinds, flops


def xla_op_profile(hlo: str, run, calls: int) -> dict:
    """Trace ``run()`` (``calls`` calls of the compiled module ``hlo``); wall ms per call by kind, conv GFLOP/s.

    XLA's CPU runtime runs independent thunks concurrently, so their durations overlap and sum to more than the
    wall time; each instant is shared equally among the thunks running then, which partitions the wall time.
    """
    import glob
    import jax
    kinds, flops = hlo_kinds(hlo)
    with tempfile.TemporaryDirectory() as folder:
        jax.profiler.start_trace(folder)
        run()
        jax.profiler.stop_trace()
        trace = jax.profiler.ProfileData.from_file(glob.glob(f'{folder}/**/*.xplane.pb', recursive=True)[0])
    edges = []  # (time, +1 start / -1 end, kind); thunks are named after their HLO instruction
    for plane in trace.planes:
        for line in plane.lines:
            for event in line.events:
                if event.name in kinds:
                    edges += [(event.start_ns, 1, kinds[event.name]), (event.end_ns, -1, kinds[event.name])]
    ms, active, last = dict.fromkeys(KINDS, 0.0), dict.fromkeys(KINDS, 0), None
    for t, change, kind in sorted(edges):
        running = sum(active.values())
        if running:
            for k, n in active.items():
                ms[k] += (t - last) * n / running / 1e6 / calls
        active[kind] += change
        last = t
    return dict(ms=ms, conv_gflop=flops / 1e9)


def torch_op_profile(run, calls: int) -> dict:
    """Self CPU time of every aten op over ``run()`` (``calls`` calls), ms per call by kind."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    ms = dict.fromkeys(KINDS, 0.0)
    for op in prof.key_averages():
        name = op.key.split('::')[-1]
        kind = ('convolution' if 'convolution' in name else 'matmul' if name in ('mm', 'bmm', 'addmm', 'baddbmm')
                else 'layout copies' if name in ('copy_', 'clone', 'contiguous', '_to_copy') else 'other')
        ms[kind] += op.self_cpu_time_total / 1e3 / calls
    return dict(ms=ms)


def torch_worker(args):
    """Build the EDM reference (EDMPrecond + EDMLoss + Adam); return (info, {command: fn(n)}, check)."""
    import types
    import numpy as np
    import torch
    # Before any parallel work, or torch refuses to change the inter-op pool.
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    sys.path.insert(0, os.path.abspath(args.edm_repo))
    try:
        import requests  # noqa: F401
    except ImportError:  # dnnlib.util imports it only to download URLs, which the benchmark never does
        sys.modules['requests'] = types.ModuleType('requests')
    from training.loss import EDMLoss
    from training.networks import EDMPrecond

    torch.manual_seed(SEED)
    net, b = EDMPrecond(**REF_KWARGS), args.batch
    x = torch.randn(b, 3, RES, RES)
    labels = torch.nn.functional.one_hot(torch.randint(0, LABEL_DIM, (b,)), LABEL_DIM).float()
    sigma = (-1.2 + 1.2 * torch.randn(b)).exp()
    loss_fn = EDMLoss(P_mean=-1.2, P_std=1.2, sigma_data=0.5)
    augment_pipe = lambda images: (images, torch.zeros(images.shape[0], AUGMENT_DIM))  # zero augment labels
    opt = torch.optim.Adam(net.parameters(), lr=LR)

    def run_forward(n):
        net.eval()
        with torch.no_grad():
            for _ in range(n):
                net(x, sigma, labels)

    def run_train(n):
        net.train()
        for _ in range(n):
            opt.zero_grad(set_to_none=True)
            # As EDM's training loop: loss.sum() / batch, then backward.
            (loss_fn(net, x, labels, augment_pipe=augment_pipe).sum() / b).backward()
            opt.step()

    def check(folder):
        io = dict(np.load(os.path.join(folder, 'io.npz')))
        with torch.no_grad():
            for p in net.parameters():  # every layer must matter, including EDM's near-zero init_zero ones
                p.copy_(torch.randn_like(p) / p[0].numel() ** 0.5 if p.ndim > 1 else p + 0.1 * torch.randn_like(p))
            net.eval()
            out = net(*(torch.from_numpy(io[k]) for k in ('x', 'sigma', 'labels')))
        np.savez(os.path.join(folder, 'torch_state.npz'), **{k: v.numpy() for k, v in net.state_dict().items()})
        np.savez(os.path.join(folder, 'io.npz'), **io, out=out.numpy())
        return {}

    def profile(measurement, n):
        return torch_op_profile(lambda: (run_forward if measurement == 'forward' else run_train)(n), n)

    info = dict(params=sum(p.numel() for p in net.parameters()), torch=torch.__version__,
                num_threads=torch.get_num_threads(), num_interop_threads=torch.get_num_interop_threads())
    return info, dict(forward=run_forward, train=run_train), check, profile


def serve(args) -> None:
    """Worker loop: one JSON reply per command line ('info', 'warmup', 'forward N', 'train N', 'check DIR',
    'profile MEASUREMENT N')."""
    reply = os.fdopen(os.dup(1), 'w', buffering=1)
    os.dup2(2, 1)  # anything a library prints goes to stderr and cannot corrupt the protocol
    info, run, check, profile = (jax_worker if args.worker == 'jax' else torch_worker)(args)
    info['cpus_visible'] = len(os.sched_getaffinity(0))
    for line in sys.stdin:
        cmd, *rest = line.split()
        if cmd == 'info':
            out = info
        elif cmd == 'warmup':
            start = time.perf_counter()
            for fn in run.values():
                fn(WARMUP_CALLS)
            out = dict(seconds=time.perf_counter() - start)
        elif cmd == 'check':
            out = check(rest[0])
        elif cmd == 'profile':
            out = profile(rest[0], int(rest[1]))
        else:
            start = time.perf_counter()
            run[cmd](int(rest[0]))
            out = dict(seconds=time.perf_counter() - start)
        reply.write(json.dumps(out) + '\n')


# ---------------------------------------------------------------- driver

class Worker:
    """A persistent worker subprocess; ``ask`` sends one command and returns its JSON reply."""

    def __init__(self, kind: str, python: str, args):
        cmd = [python, os.path.abspath(__file__), '--worker', kind, '--batch', str(args.batch),
               '--threads', str(args.threads), '--edm_repo', args.edm_repo or '']
        if args.cpus:
            cmd = ['taskset', '-c', args.cpus] + cmd
        env = dict(os.environ)
        if kind == 'jax':
            env['JAX_PLATFORMS'] = 'cpu'
            env['XLA_FLAGS'] = (env.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=1').strip()
        else:
            env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
        self.kind = kind
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)

    def ask(self, command: str) -> dict:
        self.proc.stdin.write(command + '\n')
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f'the {self.kind} worker died on {command!r} (exit {self.proc.wait()}); see stderr')
        return json.loads(line)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def cpu_model() -> str:
    """The 'model name' line of /proc/cpuinfo, else platform.processor()."""
    try:
        with open('/proc/cpuinfo') as f:
            return next(l.split(':', 1)[1].strip() for l in f if l.startswith('model name'))
    except (OSError, StopIteration):
        return platform.processor()


def time_rounds(workers, args) -> dict:
    """Alternate jax and torch rounds of each measurement; per-call medians and per-round ratio stats."""
    secs = {m: {w.kind: [] for w in workers} for m in MEASUREMENTS}
    for r in range(args.rounds):
        for m in MEASUREMENTS:
            for w in workers:
                secs[m][w.kind].append(w.ask(f'{m} {args.iters}')['seconds'] / args.iters)
        print(f'round {r + 1}/{args.rounds} done', file=sys.stderr)
    results = {}
    for m, s in secs.items():
        ratios = [j / t for j, t in zip(s['jax'], s['torch'])]
        results[m] = dict(jax_s=statistics.median(s['jax']), torch_s=statistics.median(s['torch']),
                          ratio_median=statistics.median(ratios), ratio_min=min(ratios), ratio_max=max(ratios),
                          jax_rounds_s=s['jax'], torch_rounds_s=s['torch'])
    return results


def run_check(workers) -> dict:
    """Same random input and (randomised) weights through both networks; the error of jaxdiff's output."""
    import numpy as np
    rng = np.random.default_rng(SEED)
    with tempfile.TemporaryDirectory() as folder:
        np.savez(os.path.join(folder, 'io.npz'), x=rng.standard_normal((4, 3, RES, RES), np.float32),
                 sigma=np.exp(-1.2 + 1.2 * rng.standard_normal(4)).astype(np.float32),
                 labels=np.eye(LABEL_DIM, dtype=np.float32)[rng.integers(0, LABEL_DIM, 4)])
        workers[1].ask(f'check {folder}')  # torch first: it writes its weights and output
        return workers[0].ask(f'check {folder}')


def run_profile(workers, args) -> dict:
    """Each measurement under each side's profiler, one side at a time; prints ms per call by kind of op."""
    result = {}
    for m in MEASUREMENTS:
        jax_p, torch_p = (w.ask(f'profile {m} {args.iters}') for w in workers)
        result[m] = dict(jax=jax_p, torch=torch_p)
        print(f"\n{m}: ms per call by kind of op ({args.iters} profiled calls)")
        print(f"{'':16s} {'jaxdiff':>9s} {'torch':>9s} {'difference':>11s}")
        for kind in KINDS:
            j, t = jax_p['ms'][kind], torch_p['ms'][kind]
            print(f"{kind:16s} {j:9.1f} {t:9.1f} {j - t:+11.1f}")
        j, t = sum(jax_p['ms'].values()), sum(torch_p['ms'].values())
        print(f"{'sum':16s} {j:9.1f} {t:9.1f} {j - t:+11.1f}")
        rate = [jax_p['conv_gflop'] / p['ms']['convolution'] * 1e3 for p in (jax_p, torch_p)]
        print(f"{'conv GFLOP/s':16s} {rate[0]:9.1f} {rate[1]:9.1f}   ({jax_p['conv_gflop']:.1f} GFLOP per call)")
        result[m]['conv_gflop_per_s'] = dict(jax=rate[0], torch=rate[1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--edm_repo', default=os.environ.get('JAXDIFF_EDM_REPO'),
                        help='checkout of NVlabs/edm (default: $JAXDIFF_EDM_REPO)')
    parser.add_argument('--torch_python', default=os.environ.get('JAXDIFF_TORCH_PYTHON'),
                        help='python of the interop venv with torch (default: $JAXDIFF_TORCH_PYTHON)')
    parser.add_argument('--batch', type=int, default=8)
    parser.add_argument('--rounds', type=int, default=7)
    parser.add_argument('--iters', type=int, default=10, help='calls per round')
    parser.add_argument('--threads', type=int, default=2, help='torch intra-op threads')
    parser.add_argument('--cpus', default='0,1' if shutil.which('taskset') else '',
                        help="taskset CPU list for both workers ('' = no pinning)")
    parser.add_argument('--check', action='store_true', help='compare outputs on shared weights; no timing')
    parser.add_argument('--profile', action='store_true', help='time per kind of op (convolution, ...) instead')
    parser.add_argument('--worker', choices=('jax', 'torch'), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return serve(args)
    if not args.torch_python or not args.edm_repo:
        parser.error('need --torch_python (or $JAXDIFF_TORCH_PYTHON) and --edm_repo; see the docstring for setup')
    if not os.path.isfile(os.path.join(args.edm_repo, 'training', 'networks.py')):
        parser.error(f'{args.edm_repo} has no training/networks.py: not a checkout of NVlabs/edm')
    if args.rounds < 1 or args.iters < 1:
        parser.error('--rounds and --iters must be at least 1')

    workers = [Worker('jax', sys.executable, args), Worker('torch', args.torch_python, args)]
    try:
        info = {w.kind: w.ask('info') for w in workers}
        settings = dict(batch=args.batch, threads=args.threads, cpus=args.cpus, rounds=args.rounds,
                        iters=args.iters, warmup_calls=WARMUP_CALLS, dtype='float32', cpu=cpu_model(),
                        jax=info['jax'].pop('jax'), torch=info['torch'].pop('torch'), python=platform.python_version())
        result = dict(settings=settings, workers=info, params_equal=info['jax']['params'] == info['torch']['params'])
        print(f"params: jaxdiff {info['jax']['params']:,}  torch {info['torch']['params']:,}"
              f"  ({'equal' if result['params_equal'] else 'DIFFERENT'})")
        if args.check:
            result['check'] = run_check(workers)
            print(f"check: max relative error {result['check']['max_rel_err']:.3e} "
                  f"(max abs {result['check']['max_abs_err']:.3e})")
        elif args.profile:
            for w in workers:
                w.ask('warmup')
            result['profile'] = run_profile(workers, args)
        else:
            for w in workers:  # one at a time, so neither compiles while the other warms up
                info[w.kind]['warmup_s'] = w.ask('warmup')['seconds']
            result['results'] = time_rounds(workers, args)
            print(f"batch {args.batch}, float32, {args.threads} threads, cpus '{args.cpus}', {settings['cpu']}; "
                  f"median of {args.rounds} alternating rounds x {args.iters} calls")
            print(f"{'':10s} {'jaxdiff ms':>11s} {'torch ms':>11s} {'jax/torch':>10s} {'min':>7s} {'max':>7s}")
            for m, r in result['results'].items():
                print(f"{m:10s} {1e3 * r['jax_s']:11.2f} {1e3 * r['torch_s']:11.2f} {r['ratio_median']:10.3f} "
                      f"{r['ratio_min']:7.3f} {r['ratio_max']:7.3f}")
    finally:
        for w in workers:
            w.close()
    print(json.dumps(result))


if __name__ == '__main__':
    main()
