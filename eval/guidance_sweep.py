"""Guidance side by side: CFG, CFG in a guidance interval and autoguidance at several weights.

    python -m eval.guidance_sweep --toy [--num_samples 4000] [--num_steps 32] [--out DIR]
    python -m eval.guidance_sweep --workdir RUN [--guide GUIDE_RUN --guide_steps 125,250,375]
        [--cfg_weights 1.5,2,3,4] [--autoguidance_weights 1.5,2,2.5,3] [--intervals 0.28:2.9,...]
        [--num_samples 2000] [--num_steps 18] [--batch_size 250] [--ref digits] [--features digits_classifier]
        [--out DIR]

--toy: the autoguidance paper's toy on an exact oracle (:mod:`jaxdiff.evaluation.guidance_toy`: a two-class 2-D
branching mixture, main = its exact denoiser or a blurred one, guide = a more blurred one); rows per setting with
outliers, branches lost, branch TV and SWD; writes ``OUT/guidance_toy.json`` and ``OUT/guidance_toy.png``.
--workdir: a class-conditional train.py run (:mod:`jaxdiff.evaluation.guidance_sweep`); every setting samples the
same seeds into ``OUT/samples/<setting>/`` (reused when complete) and is scored by FD and precision/recall; writes
``OUT/guidance_sweep.json`` and ``OUT/guidance_sweep.png`` (FD against weight). Both print a table on stderr and, as
the last stdout line, one JSON object. Errors end with one ``eval.guidance_sweep: error:`` line on stderr and exit
code 1 (2 for command-line errors).
"""
from __future__ import annotations

import os
import sys
from typing import Optional, Sequence

from jaxdiff.cli import argument_parser, fail, save_result, text_table


def _fail(message: str, code: int) -> None:
    fail('eval.guidance_sweep', message, code)


def _floats(text: str, flag: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(','))
    except ValueError:
        _fail(f'{flag} {text!r}: expected numbers like 1.5,2,3', 2)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI entry point (see the module docstring)."""
    from jaxdiff.engine.checkpoint import CheckpointError
    from jaxdiff.evaluation import guidance_sweep as sweep
    from jaxdiff.transforms.guided import parse_interval
    ap = argument_parser('eval.guidance_sweep', __doc__.splitlines()[0])
    ap.add_argument('--toy', action='store_true', help='the 2-D branching-mixture toy on the exact oracle')
    ap.add_argument('--workdir', default=None, help='a class-conditional train.py run (the main model)')
    ap.add_argument('--guide', default=None, help='the guide\'s train.py run (autoguidance rows)')
    ap.add_argument('--guide_steps', default=None, help='comma list of the guide\'s checkpoint steps (default: newest)')
    ap.add_argument('--cfg_weights', default=','.join(map(str, sweep.CFG_WEIGHTS)), help='CFG weights')
    ap.add_argument('--autoguidance_weights', default=','.join(map(str, sweep.AUTOGUIDANCE_WEIGHTS)),
                    help='autoguidance weights')
    ap.add_argument('--intervals', default=','.join(f'{lo}:{hi}' for lo, hi in sweep.INTERVALS),
                    help='comma list of LO:HI guidance intervals for CFG (empty: none)')
    ap.add_argument('--num_samples', type=int, default=None, help='samples per setting (toy 4000, model 2000)')
    ap.add_argument('--num_steps', type=int, default=None, help='EDM Heun steps (toy 32, model 18)')
    ap.add_argument('--batch_size', type=int, default=250, help='samples per jitted call (model)')
    ap.add_argument('--ref', default='digits', help='the Fréchet reference image set (model)')
    ap.add_argument('--features', default='digits_classifier', help='feature extractor (model)')
    ap.add_argument('--seed', type=int, default=0, help='toy: key of the latents and exact draws')
    ap.add_argument('--out', default='out/guidance', help='folder for the JSON, PNG and sample folders')
    args = ap.parse_args(argv)
    if args.toy == bool(args.workdir):
        _fail('give --toy or --workdir RUN (a class-conditional train.py run)', 2)
    if (args.num_samples is not None and args.num_samples < 2) or (args.num_steps is not None and args.num_steps < 2):
        _fail('--num_samples and --num_steps must be >= 2', 2)
    try:
        intervals = tuple(parse_interval(t) for t in args.intervals.split(',') if t)
    except ValueError as e:
        _fail(f'--intervals: {e}', 2)
    steps = (args.guide_steps or '').split(',') if args.guide_steps else []
    if not all(s.isdigit() for s in steps):
        _fail(f'--guide_steps {args.guide_steps!r}: expected checkpoint steps like 125,250', 2)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    try:
        os.makedirs(args.out, exist_ok=True)
        if args.toy:
            from jaxdiff.evaluation.guidance_toy import run_toy, toy_plot
            result, samples, labels = run_toy(args.num_samples or 4000, args.num_steps or 32, args.seed, log)
            name, columns = 'guidance_toy', ('main', 'method', 'weight', 'nfe', 'outliers', 'branches_lost',
                                             'branch_tv', 'swd')
            result['plot'] = toy_plot(samples, labels, os.path.join(args.out, f'{name}.png'))
        else:
            num_steps = args.num_steps or 18
            settings = sweep.sweep_settings(args.guide, [int(s) for s in steps], num_steps,
                                            _floats(args.cfg_weights, '--cfg_weights'),
                                            _floats(args.autoguidance_weights, '--autoguidance_weights'), intervals)
            result = sweep.run_sweep(args.workdir, args.out, guide=args.guide, num_samples=args.num_samples or 2000,
                                     num_steps=num_steps, batch_size=args.batch_size, ref=args.ref,
                                     features=args.features, settings=settings, log=log)
            name, columns = 'guidance_sweep', ('setting', 'method', 'weight', 'detail', 'nfe', 'fd', 'precision',
                                               'recall')
            result['plot'] = sweep.sweep_plot(result, os.path.join(args.out, f'{name}.png'))
        line = save_result(result, os.path.join(args.out, f'{name}.json'))
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError, CheckpointError) as e:
        _fail(str(e), 1)
    log(text_table(result['rows'], columns))
    print(line, flush=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
