"""Watermark checks (Zhao et al. 2023): decode generated samples, robustness tables, trigger watermark fidelity.

    python -m eval.watermark --decoder CODEC --samples SPEC (--bits 0101... | --embedded DIR/watermarked.json)
        [--perturb] [--json PATH]
    python -m eval.watermark --decoder CODEC --workdir RUN (--bits ... | --embedded ...) --weight_noise 0,0.01,0.1
        [--num_samples 500]
    python -m eval.watermark --trigger RUN [--base RUN] [--num_samples 1000]

Decode (--samples: a sample.py folder, an image folder, an .npz, or digits[:split] as in eval.fid): each image goes
through the codec's decoder (CODEC = a ``watermark.py train_codec`` run); ``bit_acc`` is the mean fraction of bits
equal to the embedded string (logit > 0 reads as 1), ``all_bits`` the share of images whose every bit matches.
Samples of a model trained on data without this watermark decode at ~0.5. --perturb adds one row per image
perturbation (Gaussian noise, Gaussian blur, quantisation to fewer grey levels) applied before decoding.

Weight noise (--workdir RUN --weight_noise S1,S2,...): for each std, every weight of the diffusion model gets
N(0, std^2) added (one draw per std, seeded), --num_samples class-balanced samples are drawn (EDM Heun, 18 steps)
and decoded; ``fd`` is the Fréchet distance of their features (the dataset's feature classifier, digits or
Fashion-MNIST) to the real ``ref`` split.

Trigger (--trigger RUN: a trigger run, ``watermark.py trigger`` or train.py with task=trigger): ``trigger_mse`` =
mean squared error in [0, 1] of 16 trigger samples to the watermark image (the base model, which has no trigger
class, is asked with its unconditional label); ``fd`` of class-balanced samples of the base model's classes from
the fine-tuned model and from the base model (--base, default the run trigger.json names), and their ratio.

Every mode prints a table on stderr and, as the last stdout line, one JSON object (also written to --json).
Errors end with one ``eval.watermark: error:`` line on stderr and exit code 1 (2 for command-line errors). The
checks are in :mod:`jaxdiff.evaluation.watermark`.
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Optional, Sequence

from jaxdiff.cli import argument_parser, run_eval, text_table
from jaxdiff.evaluation.watermark import read_bits, run_decode, run_trigger, run_weight_noise

PROG = 'eval.watermark'


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argument_parser(PROG, __doc__.splitlines()[0])
    p.add_argument('--decoder', help='codec run directory (python watermark.py train_codec)')
    p.add_argument('--samples', help='images to decode: sample folder, image folder, .npz, digits[:split]')
    p.add_argument('--bits', help='the embedded bit string, e.g. 1100...')
    p.add_argument('--embedded', help='watermarked.json written by python watermark.py embed (holds the bits)')
    p.add_argument('--perturb', action='store_true', help='decode mode: add the image-perturbation rows')
    p.add_argument('--allow_incomplete', action='store_true',
                   help='decode mode: a sample folder sample.py has not finished')
    p.add_argument('--workdir', help='weight-noise mode: the diffusion model run trained on watermarked data')
    p.add_argument('--weight_noise', help='weight-noise mode: comma list of stds, e.g. 0,0.01,0.03,0.1,0.3')
    p.add_argument('--trigger', help='trigger mode: a trigger run (python watermark.py trigger or task=trigger)')
    p.add_argument('--base', help='trigger mode: the model before fine-tuning (default: from trigger.json)')
    p.add_argument('--num_samples', type=int, default=None, help='samples per row (weight noise 500, trigger 1000)')
    p.add_argument('--seed', type=int, default=0, help='weight-noise draws and image perturbations')
    p.add_argument('--json', help='also write the JSON here')
    args = p.parse_args(argv)
    modes = [m for m, on in (('decode', args.samples), ('weight_noise', args.weight_noise),
                             ('trigger', args.trigger)) if on]
    if len(modes) != 1:
        p.error('choose one mode: --samples (decode), --workdir with --weight_noise, or --trigger')
    args.mode = modes[0]
    if args.mode != 'trigger' and not args.decoder:
        p.error(f'--{"samples" if args.mode == "decode" else "weight_noise"} needs --decoder CODEC_RUN')
    if args.mode == 'weight_noise':
        if not args.workdir:
            p.error('--weight_noise needs --workdir RUN (the diffusion model to perturb)')
        try:
            args.weight_noise = [float(s) for s in args.weight_noise.split(',')]
        except ValueError:
            p.error(f'--weight_noise must be a comma list of numbers, got {args.weight_noise!r}')
        if min(args.weight_noise) < 0:
            p.error('--weight_noise stds must be >= 0')
    args.num_samples = args.num_samples or (1000 if args.mode == 'trigger' else 500)
    if args.num_samples < 2:
        p.error('--num_samples must be >= 2')
    return args


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """CLI entry point (see the module docstring)."""
    args = parse_args(argv)
    log = lambda m: print(m, file=sys.stderr, flush=True)
    columns = {'trigger': ('trigger_mse', 'base_trigger_mse', 'fd', 'base_fd', 'fd_ratio'),
               'decode': ('perturbation', 'bit_acc', 'all_bits', 'n'),
               'weight_noise': ('weight_noise', 'bit_acc', 'all_bits', 'fd', 'seconds')}[args.mode]

    def compute() -> dict:
        begin = time.time()
        if args.mode == 'trigger':
            result = run_trigger(args.trigger, args.base, args.num_samples, log)
        else:
            from jaxdiff.tasks.watermark_codec import load_codec
            codec = load_codec(args.decoder)
            bits = read_bits(args.bits, args.embedded, int(codec.config.num_bits))
            if args.mode == 'decode':
                result = run_decode(codec, args.samples, bits, args.perturb, args.seed, args.allow_incomplete)
            else:
                result = run_weight_noise(codec, args.workdir, bits, args.weight_noise, args.num_samples,
                                          args.seed, log)
        result['seconds'] = round(time.time() - begin, 1)
        return result
    return run_eval(PROG, compute, args.json,
                    lambda r: text_table([r] if args.mode == 'trigger' else r['rows'], columns, 4))

if __name__ == '__main__':
    main()
