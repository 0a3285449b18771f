"""Run report: one self-contained HTML page summarising a training run, to read in a browser or to mail.

    python -m eval.report --workdir RUN [--samples DIR ...] [--metrics FILE.json ...] [--out PATH]

Sections, each shown when its input exists and otherwise replaced by one "not available: <why>" line:

- header: run name, date written, key config fields, the last checkpoint step, the full config (collapsible);
- loss curve: loss and img/s against step from ``RUN/metrics.jsonl`` (the last row kept per step);
- training sample grids: the latest ``RUN/samples/step_*.png`` and up to three earlier ones spread over the run;
- sample folders (``--samples``, written by sample.py): ``DIR/grid.png``, or a grid of the first shard's first 100
  images with one column per class when labelled, and the fields of ``DIR/manifest.json``;
- metrics: one table row per JSON object in ``RUN/eval/*.json`` and in the ``--metrics`` files (a file holds one
  object or a list of objects); the last column names the file.

Images are base64 PNG data URIs and the CSS is inline, so the file stands alone. The report only reads the run: an
unreadable file shows as "not available: <file>: <reason>" in its section. The output defaults to
``RUN/report.html``; its path is the last stdout line. A missing workdir is one ``error:`` line and exit code 2. The
page is built by :func:`jaxdiff.evaluation.report.build_report`.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from jaxdiff.cli import argument_parser, fail
from jaxdiff.evaluation.html import reason
from jaxdiff.evaluation.report import build_report


PROG = 'eval.report'


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    """The command line (one error line and exit code 2 when it is bad)."""
    parser = argument_parser(PROG, __doc__.splitlines()[0])
    parser.add_argument('--workdir', required=True, help='run directory written by train.py')
    parser.add_argument('--samples', action='append', default=[], metavar='DIR',
                        help='sample folder written by sample.py (repeatable)')
    parser.add_argument('--metrics', action='append', default=[], metavar='FILE.json',
                        help='JSON file with a metric object or a list of them (repeatable)')
    parser.add_argument('--out', default=None, metavar='PATH', help='output HTML (default RUN/report.html)')
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry: build the report and print its path last. Returns 0; exits 2 for a bad command line or a
    missing workdir, 1 when the report cannot be written (one ``eval.report: error:`` line, as every CLI)."""
    args = parse_args(argv)
    if not os.path.isdir(args.workdir):
        fail(PROG, f'workdir {args.workdir!r} is not a directory (pass the --workdir of a train.py run)', 2)
    try:
        path = build_report(args.workdir, args.samples, args.metrics, args.out)
    except OSError as e:  # inputs that cannot be read show in the page; this is the output or a directory listing
        fail(PROG, f'{e.filename or args.out}: {reason(e)}', 1)
    print(path)
    return 0


if __name__ == '__main__':
    sys.exit(main())
