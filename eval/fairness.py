"""Fair sampling by attribute switching (METHODS.md §4): attribute rate and BER without and with switching.

    python -m eval.fairness [--task mixture|mixture_spread|mixture_weak|mixture_ring|mixture_close] [--out DIR] ...
    python -m eval.fairness --task digits --workdir RUN [--classes 3,8] [--out DIR] [--num_samples N] ...

Every task has a binary sensitive attribute a in {0, 1} that the model is conditioned on, and a biased prior
P(a = 1) = --prior (0.75): every sample draws its initial attribute s0 from the prior. "Without switching" it is
sampled conditioned on s0 throughout, so the attribute rate (fraction of samples that *show* attribute 1) is about
the prior, >= 0.7, and the shown attribute predicts s0 (BER of predicting s0 from it near 0). "With switching" it
is conditioned on s0 while sigma > tau and on s1 = 1 - s0 after; at a tau where what a sample shows no longer
depends on s0 the BER is 0.5 whatever the prior, and the rate is the common rate of the two switching
directions there (0.5 when the two attributes mirror each other; see mixture_weak).

- mixture tasks (:data:`jaxdiff.evaluation.fairness.MIXTURES`): 2-D mixtures built by
  :func:`jaxdiff.transforms.attribute_switching.attribute_mixture`, with their exact denoiser; the shown attribute
  is that of a sample's most likely region (for the mirror pair, the side of the plane: the Bayes classifier).
  ``mixture`` is :func:`jaxdiff.transforms.attribute_switching.mirror_mixture`; the others
  vary one thing each (region spreads, conditioning strength, several interleaved modes per attribute,
  overlap). Also reports the attribute-blind base model (zero cond).
- digits: a train.py run (class-conditional, 10 classes). Attribute 0 / 1 are the two --classes (3 and 8 share
  their coarse outline), the condition is that class's one-hot label, and the shown attribute is the digits
  classifier's verdict: the rate is the fraction classified as the second class among the samples classified
  as either; samples classified as any other digit are counted (``valid``) and left out of rate and BER.

tau comes from :func:`jaxdiff.transforms.attribute_switching.tau_search` on the sampler's grid (per-sample s0 -> s1
rows, so both directions count) under both criteria of
:func:`jaxdiff.transforms.attribute_switching.switch_curve`, scored on the same chains:
``switch_search`` switches at the reference's (norm across the batch), ``switch_search_sample`` at the per-sample
norm's. With --scan_samples > 0 every grid index is also tried on a separate calibration batch and the one
whose BER is closest to 0.5 is evaluated as ``switch_best`` (the default for the mixtures; on the digits net it
costs a full sampling run per grid index, so --scan_window W limits it to the W indices either side of each
tau_search index: a fine grid near the searched taus for the price of a coarse one). Sampling is deterministic
Heun on a Karras grid.

Writes DIR/fairness_<task>.json and DIR/fairness_<task>.png (D(tau), and with a scan the measured rate and BER
per tau), prints a table, and the last stdout line is the JSON object. Errors end with one ``eval.fairness:
error:`` line on stderr and exit code 1 (2 for command-line errors). The evaluation itself is
:mod:`jaxdiff.evaluation.fairness`; this module parses flags, loads the model and prints.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Optional, Sequence

from jaxdiff.cli import fail
from jaxdiff.evaluation.fairness import MIXTURES, Task, digits_task, evaluate, mixture_task, plot, table
from jaxdiff.tasks.feature_classifier import load_or_train
from jaxdiff.sampling.model import load_model

PROG = 'eval.fairness'


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split('\n')[0])
    p.add_argument('--task', choices=(*MIXTURES, 'digits'), default='mixture',
                   help='a 2-D mixture (' + '; '.join(f'{k}: {v[0]}' for k, v in MIXTURES.items()) + ') or digits')
    p.add_argument('--workdir', help='train.py run directory (digits)')
    p.add_argument('--out', default='out/fairness', help='folder for the JSON and the plot')
    p.add_argument('--classes', default='3,8', help='digits: the classes of attribute 0 and 1')
    p.add_argument('--prior', type=float, default=0.75, help='P(initial attribute = 1)')
    p.add_argument('--num_samples', type=int, default=None, help='evaluation samples (mixture 4000, digits 1000)')
    p.add_argument('--steps', type=int, default=None, help='Karras grid steps (mixture 128, digits 18)')
    p.add_argument('--search_samples', type=int, default=256, help='samples for tau_search')
    p.add_argument('--scan_samples', type=int, default=None,
                   help='calibration samples per grid index for switch_best (mixture 2000, digits 0 = no scan)')
    p.add_argument('--scan_window', type=int, default=None,
                   help='scan only the grid indices within this distance of a tau_search index (default: all)')
    p.add_argument('--batch_size', type=int, default=500)
    p.add_argument('--seed', type=int, default=0)
    args = p.parse_args(argv)
    mixture = args.task in MIXTURES
    args.num_samples = args.num_samples or (4000 if mixture else 1000)
    args.steps = args.steps or (128 if mixture else 18)
    args.scan_samples = (2000 if mixture else 0) if args.scan_samples is None else args.scan_samples
    try:
        args.classes = tuple(int(c) for c in args.classes.split(','))
    except ValueError:
        p.error(f'--classes must be two integers like 3,8, got {args.classes!r}')
    if len(args.classes) != 2 or args.classes[0] == args.classes[1]:
        p.error(f'--classes must name two different classes, got {args.classes}')
    if not 0 < args.prior < 1:
        p.error(f'--prior must lie strictly between 0 and 1, got {args.prior}')
    if args.task == 'digits' and not args.workdir:
        p.error('--task digits needs --workdir RUN (a train.py run of a class-conditional digits model)')
    return args


def build_task(args: argparse.Namespace, log=print) -> Task:
    """The Task the arguments name; loads the model and the digits classifier for --task digits."""
    if args.task in MIXTURES:
        return mixture_task(args.steps, args.prior, args.task)
    model = load_model(args.workdir)
    if not model.label_dim or max(args.classes) >= model.label_dim or min(args.classes) < 0:
        raise ValueError(f'{args.workdir} has {model.label_dim} class labels; --classes {args.classes} must index '
                         'them (train a class-conditional model: data.use_labels=True)')
    return digits_task(model, load_or_train('digits_classifier', log=log).apply, args.classes, args.steps)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    log = lambda m: print(m, file=sys.stderr, flush=True)
    try:
        start = time.time()
        task = build_task(args, log)
        result = evaluate(task, num_samples=args.num_samples, prior=args.prior, search_samples=args.search_samples,
                          scan_samples=args.scan_samples, batch_size=args.batch_size, seed=args.seed,
                          blind=args.task in MIXTURES, scan_window=args.scan_window, log=log)
        os.makedirs(args.out, exist_ok=True)
        result['plot'] = os.path.join(args.out, f'fairness_{args.task}.png')
        plot(result, result['plot'])
        result['seconds'] = round(time.time() - start, 1)
        with open(os.path.join(args.out, f'fairness_{args.task}.json'), 'w') as f:
            json.dump(result, f, indent=1)
    except (FileNotFoundError, ValueError, OSError) as error:
        fail(PROG, error, 1)
    print(table(result))
    print(json.dumps(result))
    return result


if __name__ == '__main__':
    main()
