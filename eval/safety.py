"""Safety methods side by side: how much unsafe content each removes, and what it costs the safe rest.

    python -m eval.safety [--task mixture] [--mixture ring] [--num_samples 4000] [--num_steps 18] [--methods a,b]
        [--out DIR]
    python -m eval.safety --task digits --workdir RUN --unsafe_digit 7 [--num_samples 1000] [--batch_size 250]

Methods (each at a few strengths; ``none`` is always run, as the baseline): unguidance (CDTC, gradient of log p_h in
x0 space; as a plain transform on EDM Heun, and with the seed's exact update on its own solver, 50-step DDIM),
negative_classifier_guidance (gradient through D on x_t), safe_classifier_guidance (Bayes' rule with a
noise-conditional classifier), exact_safe_denoiser (mixture only: exact beta*), paper_safe_denoiser (the paper's
E + beta (E - E_u), E_u from a reference set, constant beta), practical_safe_denoiser (the official code's gated
x0_hat - s E_u with re-noising, run on its own solver, 50-step DDPM, next to a ``none`` row on that solver), sld (the
four presets). Every row names its ``solver``: ``edm`` (EDM Heun, --num_steps), ``ddpm50`` or ``ddim50``; each
solver has its own ``none`` row, the baseline of that solver's rows.

mixture: a labelled 2-D Gaussian mixture (``--mixture``, see MIXTURES; default the 8-mode ring of radius 4, std 0.3,
modes 0 and 1 unsafe = 25% of the mass) and its exact denoiser. p_h is the unsafe posterior mass of the mixture
blurred by sigma = 1 (its log has slope inside the modes), SLD's safety concept is class 1 (the unsafe modes'
label), the reference set 256 exact draws from the unsafe modes. Per method: ``unsafe`` (mass on the unsafe
modes), ``off`` (share of samples more than 4 of its own stds from every mode, i.e. off the data), ``min_ratio`` /
``max_ratio`` of each safe mode's share of all samples over its share of the safe sub-mixture (1 for an ideal
safe sampler; 0.75 for the unguided one on the ring, which spends a quarter of its samples on unsafe modes) and
``meets_target`` (unsafe <= 3%, off <= 1%, every ratio within 20% of 1). Writes ``OUT/safety_<mixture>.png``
(one scatter per method) and ``OUT/safety_<mixture>.json``.

digits: a class-conditional train.py run (label dropout makes the zero label unconditional) sampled
*unconditionally*: the realistic setting is a generator asked for "a digit" that sometimes makes the unsafe one,
not one asked for it by name (conditional sampling would make the unsafe class a prompt to refuse, not content to
steer away from). The detector and feature space is the ``digits_classifier``; p_h is its softmax mass on the
unsafe digit, evaluated on float images through the same network (uint8 rounding has no gradient); the reference
set is the classifier's train-split images of that digit; SLD's safety condition is the digit's one-hot label and
its prompt the zero label. Per method: ``unsafe`` (share classified as the unsafe digit), ``fd`` (Fréchet distance
of the other samples' features to the real ``ref`` split without that digit) and ``fd_ratio`` (over the unguided
model's fd on the same solver); ``meets_target`` when the unsafe share drops >= 5x and fd_ratio <= 1.25. Writes
``OUT/safety_digits.png`` (one row of samples per method) and ``OUT/safety_digits.json``.

The methods, mixtures and metrics live in :mod:`jaxdiff.evaluation.safety_mixture` and
:mod:`jaxdiff.evaluation.safety_digits`; this module only parses flags, writes the files and prints.
Both print a table on stderr and, as the last stdout line, one JSON object (the written JSON's content).
Errors end with one ``eval.safety: error:`` line on stderr and exit code 1 (2 for command-line errors).
"""
from __future__ import annotations

import os
import sys
from typing import Optional, Sequence

import numpy as np

from jaxdiff.cli import argument_parser, fail, save_result, text_table
from jaxdiff.evaluation.safety import UNGUIDANCE_ETA, practical_grid
from jaxdiff.evaluation.safety_digits import digits_plot, run_digits
from jaxdiff.evaluation.safety_mixture import MIXTURES, mixture_plot, run_mixture


def _fail(message: str, code: int) -> None:
    fail('eval.safety', message, code)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI entry point (see the module docstring)."""
    ap = argument_parser('eval.safety', __doc__.splitlines()[0])
    ap.add_argument('--task', choices=('mixture', 'digits'), default='mixture', help='2-D oracle or a digits model')
    ap.add_argument('--mixture', choices=tuple(MIXTURES), default='ring',
                    help='mixture: which labelled 2-D mixture (ring: the one the README tuned on)')
    ap.add_argument('--practical_grid', action='store_true',
                    help='run the practical safe denoiser over PRACTICAL_GRID (scale x bandwidth x window x gate) '
                         'instead of the method list')
    ap.add_argument('--out', default='out/safety', help='folder for the JSON and PNG')
    ap.add_argument('--num_samples', type=int, default=None, help='samples per method (mixture 4000, digits 1000)')
    ap.add_argument('--num_steps', type=int, default=18, help='EDM Heun steps')
    ap.add_argument('--methods', default=None, help='comma list of methods to run (none is always run)')
    ap.add_argument('--seed', type=int, default=0,
                    help='key of the mixture latents and reference set, and of the re-noising draws')
    ap.add_argument('--workdir', default=None, help='digits: train.py run directory of a class-conditional model')
    ap.add_argument('--eta', type=float, default=None,
                    help=f'unguidance\'s threshold on p_h (default: {UNGUIDANCE_ETA})')
    ap.add_argument('--unsafe_digit', type=int, default=7, help='digits: the class counted as unsafe')
    ap.add_argument('--batch_size', type=int, default=250, help='digits: samples per jitted call')
    ap.add_argument('--noisy_classifier', default=None,
                    help='digits: train.py run of configs/classifier/digits_noisy.py; adds safe classifier guidance')
    args = ap.parse_args(argv)
    if args.task == 'digits' and not args.workdir:
        _fail('--task digits needs --workdir RUN (a class-conditional train.py run)', 2)
    num = args.num_samples or (4000 if args.task == 'mixture' else 1000)
    if num < 2 or args.num_steps < 1 or args.batch_size < 1:
        _fail('--num_samples must be >= 2, --num_steps and --batch_size >= 1', 2)
    methods = args.methods.split(',') if args.methods else None
    eta = UNGUIDANCE_ETA[args.task] if args.eta is None else args.eta
    log = lambda m: print(m, file=sys.stderr, flush=True)
    try:
        os.makedirs(args.out, exist_ok=True)
        grid = practical_grid(args.task) if args.practical_grid else None
        suffix = '_practical_grid' if grid else ''
        if args.task == 'mixture':
            build, unsafe = MIXTURES[args.mixture]
            result, samples = run_mixture(num, args.num_steps, args.seed, methods, log, args.mixture, grid, eta)
            name = ('mixture' if args.mixture == 'ring' else args.mixture) + suffix
            result['plot'] = mixture_plot(samples, np.asarray(build().means)[list(unsafe)],
                                          os.path.join(args.out, f'safety_{name}.png'))
            columns = ('method', 'strength', 'solver', 'unsafe', 'off', 'min_ratio', 'max_ratio', 'meets_target',
                       'seconds')
        else:
            name = 'digits' + suffix
            result, samples = run_digits(args.workdir, args.unsafe_digit, num, args.num_steps, args.batch_size,
                                         methods, args.noisy_classifier, log, grid, args.seed, eta)
            result['plot'] = digits_plot(samples, os.path.join(args.out, f'safety_{name}.png'))
            columns = ('method', 'strength', 'solver', 'unsafe', 'fd', 'fd_ratio', 'meets_target', 'seconds')
        line = save_result(result, os.path.join(args.out, f'safety_{name}.json'))
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as e:
        _fail(str(e), 1)
    log(text_table(result['rows'], columns))
    print(line, flush=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
