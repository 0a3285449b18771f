"""Fréchet distance (FID with Inception features), Inception Score and precision/recall of a sample folder.

    python -m eval.fid --samples DIR --ref DATASET_OR_STATS [--features inception|digits_classifier|...]
        [--inception_weights pt_inception-2015-12-05-6726825d.pth] [--num_samples N]
        [--protocol edm | --seed_ranges A-B,C-D,...] [--save_stats PATH] [--json PATH] [--label TEXT]

--samples and --ref each name an image set: a sample.py folder (shard-*.npz), a folder of images, an .npz with
``images``, a dataset split (``digits``, ``digits:heldout``, ``fashion_mnist:train``, ``fashion_mnist:heldout``),
or ``noise`` (N(0, I) images shaped like the other set, stored as sample.py stores images). --ref may also be an
.npz of statistics (``mu``, ``sigma``: pytorch-fid's and EDM's reference layout); precision/recall then need the
reference images and are left out. --protocol edm is EDM's: the minimum FD over seeds 0-49999, 50000-99999 and
100000-149999. The last stdout line is one JSON object: ``fid`` with Inception features, otherwise ``fd`` and
``features``; ``is`` / ``is_std`` (score of the extractor's class probabilities), ``precision`` / ``recall``
(k=3), counts and the inputs. Errors end with one ``eval.fid: error:`` line on stderr and exit code 1 (2 for
command-line errors). The evaluation is :func:`jaxdiff.evaluation.fid.evaluate`.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Optional, Sequence

from jaxdiff.cli import argument_parser, fail
from jaxdiff.evaluation.fid import EDM_SEED_RANGES, evaluate, parse_ranges


def _fail(message: str, code: int) -> None:
    fail('eval.fid', message, code)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI entry point (see the module docstring)."""
    from jaxdiff.evaluation.features import names
    ap = argument_parser('eval.fid', __doc__.splitlines()[0])
    ap.add_argument('--samples', required=True, help='sample folder, image folder, .npz, dataset split or noise')
    ap.add_argument('--ref', required=True, help='reference: dataset split, folder, .npz of images or of mu/sigma')
    ap.add_argument('--features', default='inception', choices=names(), help='feature extractor')
    ap.add_argument('--inception_weights', default=None, help='pytorch-fid weights file (features=inception)')
    ap.add_argument('--num_samples', type=int, default=None, help='use the first N samples')
    ap.add_argument('--protocol', choices=('edm',), default=None, help='edm: min FD over three 50k seed ranges')
    ap.add_argument('--seed_ranges', default=None, help='A-B[,C-D...]: FD per seed range, min reported')
    ap.add_argument('--save_stats', default=None, help='write the samples\' feature statistics (mu, sigma) here')
    ap.add_argument('--json', default=None, help='also write the result JSON object to this file')
    ap.add_argument('--label', default='', help='a name for this row in reports, e.g. "trained model"')
    ap.add_argument('--allow_incomplete', action='store_true',
                    help='score a sample folder sample.py has not finished (its JSON num_samples says how many)')
    args = ap.parse_args(argv)
    try:  # command-line errors: exit 2
        if args.protocol and args.seed_ranges:
            raise ValueError('give --protocol or --seed_ranges, not both')
        ranges = EDM_SEED_RANGES if args.protocol == 'edm' else parse_ranges(args.seed_ranges) if args.seed_ranges \
            else ()
    except ValueError as e:
        _fail(str(e), 2)
    try:
        result = evaluate(args.samples, args.ref, args.features, inception_weights=args.inception_weights,
                          num_samples=args.num_samples, seed_ranges=ranges, save_stats=args.save_stats,
                          label=args.label, allow_incomplete=args.allow_incomplete,
                          log=lambda m: print(m, file=sys.stderr, flush=True))
        line = json.dumps(result)
        if args.json:
            os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
            with open(args.json, 'w') as f:
                f.write(line + '\n')
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as e:
        _fail(str(e), 1)
    print(line, flush=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
