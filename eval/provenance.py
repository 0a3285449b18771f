"""Generated-image detection by reconstruction (DIRE) and by denoising loss, with a diffusion model.

    python -m eval.provenance --workdir RUN [--step S] --real SPEC --fake DIR [--fake DIR2 ...] --out DIR
        [--statistic dire,loss] [--num 500] [--steps 20] [--sigma_max S] [--order 1|2]
        [--sigmas 0.1,0.3,1] [--draws 4]
    python -m eval.provenance --oracle [--steps 5,10,20,40,80]

Detection: the first --num images of --real (a dataset split such as digits:all or fashion_mnist:heldout, a folder,
an .npz, brought to the model's size; or run:heldout / run:train, the images RUN's data.max_size left out of its
training set / the ones it trained on) and of each --fake set (sample.py folders; e.g. this model's samples and
another run's) are scored under RUN's model. ``dire``: invert each image with --steps Euler (or Heun, --order 2)
steps of the probability-flow ODE to --sigma_max (default the model's largest) and reconstruct it; the score is
minus the mean |x - x_rec|. ``loss``: minus the epsilon-space denoising loss averaged over --sigmas and --draws.
One row per statistic and fake set: AUC, TPR at 1% FPR, accuracy at the best threshold (generated = positive).
Writes DIR/provenance.json, provenance_scores.npz, provenance_roc.png and dire_maps.png.

Oracle (--oracle): inversion then reconstruction on the exact denoiser of a Gaussian mixture (16-dimensional, 4
modes), RMS and largest error for each step count: the solver's accuracy with no network error.

The last stdout line is one JSON object (also written to --json). Errors end with one ``eval.provenance: error:``
line on stderr and exit code 1 (2 for command-line errors).
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from jaxdiff.cli import argument_parser, run_eval, text_table
from jaxdiff.evaluation import memorization as mem
from jaxdiff.evaluation import provenance as prov

PROG = 'eval.provenance'


def _numbers(p, flag: str, text: str, kind=float) -> list:
    try:
        values = [kind(v) for v in text.split(',')]
    except ValueError:
        p.error(f'{flag} must be a comma list of numbers, got {text!r}')
    if min(values) <= 0:
        p.error(f'{flag} must be positive')
    return values


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argument_parser(PROG, __doc__.splitlines()[0])
    p.add_argument('--workdir', help='the diffusion run whose model scores the images')
    p.add_argument('--real', help='real images: dataset split (digits:all, fashion_mnist:heldout), folder, .npz')
    p.add_argument('--fake', action='append', default=[], help='generated images (sample folder); repeatable')
    p.add_argument('--out', help='folder for the files')
    p.add_argument('--statistic', default=','.join(prov.STATISTICS), help='dire, loss or both (comma list)')
    p.add_argument('--num', type=int, default=500, help='images per set (the first N)')
    p.add_argument('--steps', default=None, help=f'ODE steps each way (default {prov.DIRE_STEPS}; --oracle: a list)')
    p.add_argument('--sigma_max', type=float, default=None, help='inversion depth (default: the model\'s largest)')
    p.add_argument('--order', type=int, choices=(1, 2), default=1, help='1 Euler (DDIM), 2 Heun')
    p.add_argument('--sigmas', default=','.join(f'{s:g}' for s in prov.LOSS_SIGMAS), help='loss: noise levels')
    p.add_argument('--draws', type=int, default=4, help='loss: noise draws per image and level')
    p.add_argument('--seed', type=int, default=0, help='loss: noise')
    p.add_argument('--step', type=int, default=None, help='checkpoint step of RUN (default: the newest)')
    p.add_argument('--oracle', action='store_true', help='inversion accuracy on an exact mixture denoiser')
    p.add_argument('--json', help='also write the JSON here')
    args = p.parse_args(argv)
    if args.oracle:
        args.steps = _numbers(p, '--steps', args.steps or '5,10,20,40,80', int)
        return args
    if not (args.workdir and args.real and args.fake and args.out):
        p.error('detection needs --workdir RUN --real SPEC --fake DIR --out DIR (or --oracle)')
    args.steps = _numbers(p, '--steps', args.steps or str(prov.DIRE_STEPS), int)
    if len(args.steps) != 1:
        p.error('--steps takes one number for detection')
    args.steps = args.steps[0]
    args.statistic = [s.strip() for s in args.statistic.split(',')]
    unknown = set(args.statistic) - set(prov.STATISTICS)
    if unknown:
        p.error(f'--statistic: unknown {sorted(unknown)}; use {", ".join(prov.STATISTICS)}')
    args.sigmas = _numbers(p, '--sigmas', args.sigmas)
    if args.num < 2 or args.draws < 1:
        p.error('--num must be >= 2 and --draws >= 1')
    return args


def _oracle(args) -> dict:
    import jax
    from jaxdiff import toy
    means = 1.5 * jax.random.normal(jax.random.key(1), (4, 16))
    gm = toy.mixture(means, 0.3 * jax.numpy.ones((4, 16)))
    x, _ = toy.sample(gm, jax.random.key(2), 256)
    rows = prov.round_trip_error(toy.denoiser(gm), x, args.steps, order=args.order)
    return dict(rows=rows, order=args.order, mixture='4 modes in 16-D, std 0.3, means N(0, 1.5^2)')


def _image_set(spec: str, shape: tuple, num: int, workdir: str) -> dict:
    import numpy as np
    from jaxdiff.evaluation.fid import load_image_set
    from jaxdiff.evaluation.robustness_data import fit_data
    if spec in mem.RUN_SETS:
        from jaxdiff.runs import load_config
        data = mem.run_images(spec, mem.run_training_data(load_config(workdir).data))
        return dict(images=data['images'][:num], labels=data['labels'][:num])
    data = load_image_set(spec)
    if 'images' not in data:
        raise ValueError(f'{spec} holds feature statistics, not images')
    images, labels = data['images'][:num], data.get('labels')
    labels = None if labels is None else np.asarray(labels)[:num]
    if images.shape[1:] != tuple(shape) and labels is not None:
        images = fit_data(images, np.maximum(labels, 0), shape, int(np.max(labels)) + 1, spec)
    return dict(images=images, labels=labels)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """CLI entry point (see the module docstring)."""
    args = parse_args(argv)
    log = lambda m: print(m, file=sys.stderr, flush=True)
    if args.oracle:
        return run_eval(PROG, lambda: _oracle(args), args.json,
                        lambda r: text_table(r['rows'], ('steps', 'rms', 'max'), 6))
    return run_eval(PROG, lambda: _detection(args, log), args.json, lambda r: text_table(
        [dict(row, tpr_1pct=row['tpr_at_fpr']['0.01']) for row in r['rows']],
        ('statistic', 'fake', 'auc', 'tpr_1pct', 'accuracy'), 3))


def _detection(args, log) -> dict:
    from jaxdiff.sampling.model import load_model
    model = load_model(args.workdir, step=args.step)
    shape = (model.resolution, model.resolution, model.channels)
    real = _image_set(args.real, shape, args.num, args.workdir)
    fakes = {spec: _image_set(spec, shape, args.num, args.workdir) for spec in args.fake}
    detection = prov.detect(model, real, fakes, statistics=args.statistic, num_steps=args.steps,
                            sigma_max=args.sigma_max, sigmas=args.sigmas, draws=args.draws, order=args.order,
                            seed=args.seed, log=log)
    return dict(prov.write_detection(detection, args.out), out=args.out)

if __name__ == '__main__':
    main()
