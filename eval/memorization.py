"""Privacy audits: training-data extraction from samples (Carlini et al. 2023) and membership inference.

    python -m eval.memorization --samples DIR (--workdir RUN | --train DATASET) --out AUDIT_DIR
        [--n 50] [--alpha 0.5] [--threshold 1] [--neighbours sample|train]
    python -m eval.memorization --membership --workdir RUN [--step S] [--heldout DATASET] --out AUDIT_DIR
        [--sigmas 0.1,0.3,1] [--draws 4] [--num 1000]

Extraction (--samples: a sample.py folder, streamed shard by shard, any image set eval.fid reads, or run:heldout,
the real images the run's data.max_size left out, as a control): each sample's
nearest training images and its normalised distance l = l2(x, nn) / (alpha * mean l2 to its n nearest training
images); l < --threshold counts as extracted. The training images are the run's own (--workdir: the run's data
config, its resolution and data.max_size subset, mirrored copies too when it trained with x-flips) or a dataset
(--train: digits:all, fashion_mnist:train, an .npz, a folder; brought to the samples' size by the pipeline's rule;
--xflip adds the mirrored images). Writes AUDIT_DIR/extraction.json (the rate, quantiles of l, every extracted
sample with its training index), per_sample.npz, extracted.png (sample | training neighbour) and
l_histogram.png. --neighbours train averages over the training image's neighbourhood instead (a variant; see
jaxdiff.evaluation.memorization).

Membership (--membership --workdir RUN): per-image denoising loss at --sigmas (x0-space, mean over --draws noise
draws) of --num training images against --num images the run never saw: the ones its data.max_size left out, or
--heldout DATASET. Writes membership.json (AUC, TPR at 1% FPR, best accuracy per sigma and for the mean
epsilon-space loss), membership_scores.npz and membership_roc.png.

The last stdout line is one JSON object (also written to --json). Errors end with one ``eval.memorization: error:``
line on stderr and exit code 1 (2 for command-line errors).
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from jaxdiff.cli import argument_parser, run_eval
from jaxdiff.evaluation import memorization as mem

PROG = 'eval.memorization'


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argument_parser(PROG, __doc__.splitlines()[0])
    p.add_argument('--samples', help='extraction: the generated images (sample folder, image folder, .npz)')
    p.add_argument('--workdir', help='the diffusion run: its training data (and, for --membership, its model)')
    p.add_argument('--train', help='extraction: training images by name instead of the run\'s (digits:all, ...)')
    p.add_argument('--xflip', action='store_true', help='with --train: the mirrored training images count too')
    p.add_argument('--out', required=True, help='folder for the audit\'s files')
    p.add_argument('--n', type=int, default=mem.N_NEIGHBOURS, help='neighbourhood size of the denominator')
    p.add_argument('--alpha', type=float, default=mem.ALPHA, help='Carlini et al.\'s alpha')
    p.add_argument('--threshold', type=float, default=mem.THRESHOLD, help='extracted when l < threshold')
    p.add_argument('--neighbours', choices=mem.NEIGHBOURS, default='sample',
                   help="whose n nearest training images are averaged: the sample's (paper) or its neighbour's")
    p.add_argument('--allow_incomplete', action='store_true', help='audit a sample folder sample.py has not finished')
    p.add_argument('--membership', action='store_true', help='membership inference on the run\'s model')
    p.add_argument('--heldout', help='membership: non-member images by name (default: what data.max_size left out)')
    p.add_argument('--sigmas', default=','.join(f'{s:g}' for s in mem.MEMBERSHIP_SIGMAS), help='membership: noise '
                   'levels')
    p.add_argument('--draws', type=int, default=4, help='membership: noise draws per image and sigma')
    p.add_argument('--num', type=int, default=1000, help='membership: members and non-members each (at most)')
    p.add_argument('--seed', type=int, default=0, help='membership: which images and which noise')
    p.add_argument('--step', type=int, default=None, help='membership: checkpoint step (default: the newest)')
    p.add_argument('--json', help='also write the JSON here')
    args = p.parse_args(argv)
    if bool(args.samples) == args.membership:
        p.error('choose one: --samples DIR (extraction) or --membership (membership inference)')
    if args.membership and not args.workdir:
        p.error('--membership needs --workdir RUN (the model and its training data)')
    if args.samples and bool(args.workdir) == bool(args.train):
        p.error('extraction needs the training images: --workdir RUN (the run\'s data) or --train DATASET')
    if args.n < 1 or args.alpha <= 0 or args.draws < 1 or args.num < 2:
        p.error('--n and --draws must be >= 1, --num >= 2, --alpha > 0')
    try:
        args.sigmas = [float(s) for s in args.sigmas.split(',')]
    except ValueError:
        p.error(f'--sigmas must be a comma list of numbers, got {args.sigmas!r}')
    if min(args.sigmas) <= 0:
        p.error('--sigmas must be positive')
    return args


def _training_data(args, log) -> mem.TrainingData:
    if args.train:
        if args.samples in mem.RUN_SETS:
            raise ValueError(f'--samples {args.samples} names a run\'s images: give --workdir RUN, not --train')
        first = next(mem.sample_batches(args.samples, args.allow_incomplete))
        return mem.dataset_training_data(args.train, first['images'].shape[1:], args.xflip)
    from jaxdiff.runs import load_config
    config = load_config(args.workdir)
    train = mem.run_training_data(config.data)
    if args.heldout:
        from jaxdiff.evaluation.robustness_data import fit_data, load_data
        images, labels = load_data(args.heldout)
        images = fit_data(images, labels, train.images.shape[1:], int(labels.max()) + 1, args.heldout)
        train = train._replace(heldout_images=images, heldout_labels=labels)
    log(f'training data: {train.description}' + (' + mirrored copies' if train.xflip else ''))
    return train


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """CLI entry point (see the module docstring)."""
    args = parse_args(argv)
    log = lambda m: print(m, file=sys.stderr, flush=True)

    def compute() -> dict:
        train = _training_data(args, log)
        result = _membership(args, train, log) if args.membership else _extraction(args, train, log)
        return dict(result, out=args.out)
    return run_eval(PROG, compute, args.json)


def _membership(args, train: mem.TrainingData, log) -> dict:
    from jaxdiff.sampling.model import load_model
    model = load_model(args.workdir, step=args.step)
    if model.latent_shape is not None:
        raise ValueError(f'{args.workdir} is a latent diffusion run: membership by pixel-space denoising loss does '
                         'not apply (its loss lives in the latent space)')
    result = mem.membership_audit(model.denoiser(model.variables), model.label_dim, train, sigmas=args.sigmas,
                                  draws=args.draws, num=args.num, seed=args.seed, log=log)
    result = mem.write_membership(result, args.out)
    for name, row in list(result['per_sigma'].items()) + [('eps-loss mean', result['eps_mean'])]:
        log(f'{"sigma " + name if name[0].isdigit() else name}: AUC {row["auc"]:.3f}, TPR@1%FPR '
            f'{row["tpr_at_fpr"]["0.01"]:.3f}, accuracy {row["accuracy"]:.3f}')
    return result


def _extraction(args, train: mem.TrainingData, log) -> dict:
    batches = mem.sample_batches(args.samples, args.allow_incomplete, train)
    audit = mem.extraction_audit(batches, train, n=args.n, alpha=args.alpha, threshold=args.threshold,
                                 neighbours=args.neighbours, log=log)
    result = mem.write_extraction(audit, train, args.out)
    log(f'{result["extracted"]:,} of {result["num_samples"]:,} samples extracted (l < {args.threshold:g}): '
        f'rate {result["extraction_rate"]:.4%}; median l {result["l_quantiles"]["0.5"]:.3f}; files in {args.out}')
    return {k: v for k, v in result.items() if k != 'extracted_samples'}

if __name__ == '__main__':
    main()
