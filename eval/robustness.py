"""Adversarial robustness of a classifier run: clean, PGD-40 and AutoAttack accuracy, optionally behind DiffPure,
and certified accuracy of denoised smoothing.

    python -m eval.robustness --workdir RUN [--data digits:heldout | fashion_mnist:test | FILE.npz | SAMPLE_DIR]
        [--eps 0.1] [--norm Linf] [--num 500] [--attacks pgd40,autoattack] [--aa_iters 100] [--square_queries 5000]
        [--diffpure DIFFUSION_RUN --t_star 0.1 --eot 4 --diffpure_steps 10]
        [--smoothing DIFFUSION_RUN --sigma 0.25 --n0 100 --n 1000 --alpha 0.001 --radii 0,0.25,0.5,0.75,1.0]
        [--batch_size 250] [--seed 0] [--json PATH]

RUN is a ``task='adversarial'`` run of train.py (:mod:`jaxdiff.tasks.adversarial`): the EMA weights and BatchNorm
statistics of ``RUN/best`` (the checkpoint with the best held-out PGD accuracy), or of the newest checkpoint when
the run has no best/ (``--checkpoint latest`` forces that). The classifier runs in inference mode on images in
[0, 1]. --data: ``digits[:train|ref|heldout|all]`` (the splits of
:func:`jaxdiff.metrics.feature_classifier.dataset_split`; default ``digits:heldout``, which no library classifier
trains on), ``fashion_mnist[:train|test|ref|heldout]``, an .npz with ``images`` uint8 and ``labels``, or a
sample.py folder of class-conditional samples; the first --num examples are used. Images must have the
classifier's shape, except that the data-pipeline rule (integer upsampling, centre padding) is applied when the
classifier was trained at a larger side.

Attacks (--attacks, comma list; eps in [0, 1] pixel units, --norm Linf or L2):

- ``pgdN`` (default pgd40): PGD on the cross-entropy, N steps of size eps/4 (--pgd_step), one uniform random start
  in the ball, last iterate (:func:`jaxdiff.robust.pgd.pgd`).
- ``autoattack``: AutoAttack's standard sequence APGD-CE -> APGD-T (9 targets) -> FAB-T (9 targets) -> Square,
  each stage on the points still robust (:mod:`jaxdiff.robust.autoattack`); the robust accuracy after each stage
  is reported. Standard budget: 100 iterations per APGD/FAB run and 5000 Square queries; --aa_iters and
  --square_queries lower it for CPU runs (the JSON's ``autoattack.budget`` says which was used and
  ``standard: false`` marks a reduced one). ``worst_case_acc`` counts the points robust to every attack run.

DiffPure (--diffpure DIFFUSION_RUN, :mod:`jaxdiff.robust.diffpure`): every prediction goes through the purifier
(diffuse to VP time --t_star, --diffpure_steps ancestral reverse-SDE steps, unconditional denoiser) and is the mean
of --eot purified logits; attacks differentiate through the whole purifier (full backprop) of that EOT average with
the randomness fixed per batch. The accuracies the attacks report are judged by that same fixed-randomness
classifier; ``*_acc_fresh`` re-classify the final adversarial examples with independent randomness.

--selection recomputes the run's own keep-best numbers (:func:`jaxdiff.tasks.adversarial.selection_accuracy`: its
selection attack, e.g. CW PGD-40, on its held-out slice with its eval key) for the evaluated checkpoint; for
``best`` they equal what training recorded in ``RUN/best/best.json`` (both are in the JSON's ``selection``).

Denoised smoothing (--smoothing DIFFUSION_RUN, :mod:`jaxdiff.robust.smoothing`): base classifier = the classifier
on the one-shot denoised x + N(0, sigma^2) (Carlini et al. 2023); Cohen et al.'s CERTIFY with --n0 selection and
--n estimation draws at level --alpha; certified accuracy (correct and certified radius >= r, abstentions wrong)
for each L2 radius r of --radii in [0, 1] pixel units (also given as multiples of sigma). With n draws the largest
certifiable radius is sigma * Phi^-1(alpha^(1/n)) (2.46 sigma for n = 1000, alpha = 0.001).

Output: a table on stderr, progress lines on stderr for long phases, and as the last stdout line one JSON object
(also written to --json). Errors end with one ``eval.robustness: error:`` line on stderr and exit code 1 (2 for
command-line errors). The loading and evaluation live in :mod:`jaxdiff.evaluation.robustness_data` and
:mod:`jaxdiff.evaluation.robustness`; this module parses flags and prints.
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Callable, Optional, Sequence


from jaxdiff.cli import argument_parser, run_eval, text_table
from jaxdiff.evaluation.robustness import AA_STANDARD, DEFAULT_RADII, evaluate_run, parse_attacks

PROG = 'eval.robustness'


def table_rows(result: dict) -> list[dict]:
    """Rows (metric, accuracy, settings) for the stderr table."""
    rows = [dict(metric='clean', accuracy=result['clean_acc'], settings=result['defense'])] if 'clean_acc' in result \
        else []
    sel = result.get('selection')
    if sel:
        recorded = sel['recorded'] or {}
        for metric, name in (('clean', 'clean_acc'), ('PGD', 'pgd_acc')):
            rows.append(dict(metric=f'selection {metric}', accuracy=sel[name],
                             settings=f'{sel["attack"]}, held-out slice of {sel["eval_size"]}; training recorded '
                                      f'{recorded.get(name)}'))
    for name, entry in result.items():
        if name.startswith('pgd') and isinstance(entry, dict):
            rows.append(dict(metric=f'PGD-{entry["steps"]}', accuracy=entry['acc'],
                             settings=f'CE, step {entry["step_size"]:.4g}, random start, eps {result["eps"]:.4g} '
                                      f'{result["norm"]}'))
    if 'autoattack' in result:
        aa = result['autoattack']
        b = aa['budget']
        for stage in aa['order']:
            rows.append(dict(metric=f'  after {stage}', accuracy=aa['stages'][stage], settings=b[stage.replace(
                '-', '_')]))
        rows.append(dict(metric='AutoAttack', accuracy=aa['acc'],
                         settings='standard budget' if b['standard'] else 'REDUCED budget (--aa_iters / '
                                                                          '--square_queries)'))
    if 'worst_case_acc' in result:
        rows.append(dict(metric='worst case', accuracy=result['worst_case_acc'], settings='robust to every attack'))
    for name in ('clean_acc_fresh',):
        if name in result:
            rows.append(dict(metric='clean (fresh)', accuracy=result[name], settings='independent purifier noise'))
    for name, entry in result.items():
        if isinstance(entry, dict) and 'acc_fresh' in entry:
            rows.append(dict(metric=f'{name} (fresh)', accuracy=entry['acc_fresh'],
                             settings='adversarial examples re-classified with independent purifier noise'))
    sm = result.get('smoothing')
    if sm:
        for r in sm['rows']:
            rows.append(dict(metric=f'certified r={r["radius"]:.3g}', accuracy=r['certified_acc'],
                             settings=f'L2, {r["radius_sigma"]:.2f} sigma; sigma {sm["sigma"]}, n0 {sm["n0"]}, '
                                      f'n {sm["n"]}, alpha {sm["alpha"]}'))
    return rows


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argument_parser(PROG, __doc__.splitlines()[0])
    p.add_argument('--workdir', help='adversarial-training run (task=adversarial) to evaluate')
    p.add_argument('--checkpoint', default='auto', choices=('auto', 'best', 'latest'),
                   help='auto: best/ when present, else the newest checkpoint')
    p.add_argument('--data', default='digits:heldout', help='digits[:split], fashion_mnist[:split], .npz, sample dir')
    p.add_argument('--allow_incomplete', action='store_true', help='use a sample dir sample.py has not finished')
    p.add_argument('--num', type=int, default=500, help='evaluate the first NUM examples (0 = all)')
    p.add_argument('--eps', type=float, default=None, help='attack radius in [0, 1] pixel units (default: the '
                                                            "run's training eps)")
    p.add_argument('--norm', default=None, choices=('Linf', 'L2'), help="threat model (default: the run's)")
    p.add_argument('--attacks', default='pgd40,autoattack', help='comma list: pgdN, autoattack, none')
    p.add_argument('--pgd_step', type=float, default=None, help='PGD step size (default eps/4)')
    p.add_argument('--aa_iters', type=int, default=AA_STANDARD['n_iter'],
                   help='iterations per APGD-CE / APGD-T / FAB-T run (standard 100)')
    p.add_argument('--square_queries', type=int, default=AA_STANDARD['n_queries'],
                   help='Square attack queries (standard 5000)')
    p.add_argument('--batch_size', type=int, default=250, help='examples per attack batch')
    p.add_argument('--diffpure', help='diffusion run: attack the classifier behind DiffPure')
    p.add_argument('--t_star', type=float, default=0.1, help='DiffPure VP diffusion time')
    p.add_argument('--eot', type=int, default=4, help='DiffPure EOT draws averaged per prediction')
    p.add_argument('--diffpure_steps', type=int, default=10, help='DiffPure reverse-SDE steps')
    p.add_argument('--smoothing', help='diffusion run: certify denoised smoothing')
    p.add_argument('--sigma', type=float, default=0.25, help='smoothing noise std in [0, 1] pixel units')
    p.add_argument('--n0', type=int, default=100, help='smoothing selection draws')
    p.add_argument('--n', type=int, default=1000, help='smoothing estimation draws (Cohen et al.: 100,000)')
    p.add_argument('--alpha', type=float, default=0.001, help='smoothing failure probability')
    p.add_argument('--radii', default=','.join(map(str, DEFAULT_RADII)), help='L2 radii for certified accuracy')
    p.add_argument('--smoothing_batch', type=int, default=500, help='noise draws per smoothing batch')
    p.add_argument('--seed', type=int, default=0, help='attack / purifier / smoothing randomness')
    p.add_argument('--selection', action='store_true',
                   help="also recompute the run's keep-best numbers: its selection attack on its held-out slice")
    p.add_argument('--json', help='also write the JSON here')
    args = p.parse_args(argv)
    if not args.workdir:
        p.error('--workdir RUN is required (an adversarial-training run)')
    try:
        args.attack_list = parse_attacks(args.attacks)
    except ValueError as e:
        p.error(str(e))
    if not args.attack_list and not args.smoothing and not args.selection:
        p.error('nothing to evaluate: --attacks none needs --smoothing or --selection')
    if args.eps is not None and args.eps < 0:
        p.error(f'--eps must be >= 0, got {args.eps}')
    if args.num < 0 or args.batch_size < 1 or args.aa_iters < 1 or args.square_queries < 1:
        p.error('--num must be >= 0 and --batch_size, --aa_iters, --square_queries >= 1')
    if args.diffpure and (args.eot < 1 or args.diffpure_steps < 1 or not 0 < args.t_star <= 1):
        p.error('--eot and --diffpure_steps must be >= 1 and --t_star in (0, 1]')
    if args.smoothing:
        if args.sigma <= 0 or args.n0 < 1 or args.n < 1 or not 0 < args.alpha < 1 or args.smoothing_batch < 1:
            p.error('--smoothing needs --sigma > 0, --n0, --n, --smoothing_batch >= 1 and --alpha in (0, 1)')
        try:
            args.radii = sorted(float(r) for r in args.radii.split(','))
        except ValueError:
            p.error(f'--radii must be a comma list of numbers, got {args.radii!r}')
        if args.radii[0] < 0:
            p.error('--radii must be >= 0')
    return args


def run(args: argparse.Namespace, log: Callable[[str], None]) -> dict:
    """The evaluation of parsed arguments -> the JSON dict."""
    return evaluate_run(args.workdir, checkpoint=args.checkpoint, data=args.data, num=args.num, eps=args.eps,
                        norm=args.norm, attacks=args.attack_list, pgd_step=args.pgd_step, aa_iters=args.aa_iters,
                        square_queries=args.square_queries, batch_size=args.batch_size, diffpure=args.diffpure,
                        t_star=args.t_star, eot=args.eot, diffpure_steps=args.diffpure_steps,
                        smoothing=args.smoothing, sigma=args.sigma, n0=args.n0, n=args.n, alpha=args.alpha,
                        radii=args.radii if args.smoothing else DEFAULT_RADII, smoothing_batch=args.smoothing_batch,
                        seed=args.seed, with_selection=args.selection, allow_incomplete=args.allow_incomplete,
                        log=log)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """CLI entry point (see the module docstring)."""
    from jaxdiff.cli import quiet_checkpoint_echoes
    args = parse_args(argv)
    quiet_checkpoint_echoes()
    log = lambda m: print(m, file=sys.stderr, flush=True)

    def compute() -> dict:
        begin = time.time()
        result = run(args, log)
        result['seconds'] = round(time.time() - begin, 1)
        return result
    return run_eval(PROG, compute, args.json,
                    lambda r: text_table(table_rows(r), ('metric', 'accuracy', 'settings'), 4))

if __name__ == '__main__':
    main()
