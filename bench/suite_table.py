"""Prints the table of a bench suite run from its JSON lines (one per row, as bench/gpu_suite.sh collects them).

    python bench/suite_table.py LOG

Train rows come from bench/train_throughput.py, sample rows from bench/sample_throughput.py, network rows (forward,
forward+backward of one net) from bench/net_step.py; the table is
Markdown, ready for docs/benchmarks.md. ``setup s``: seconds before the timed program's compile (init, FLOP or NFE
count); ``row s``: the row's wall time, process start to exit (logs without them show '-').
"""
from __future__ import annotations

import json
import sys


def _number(text) -> bool:
    """Whether a --guidance spec is a bare CFG weight (older rows store it as a float)."""
    try:
        float(text)
        return True
    except ValueError:
        return False


def rows(lines: list[str]) -> list[str]:
    """Markdown rows (header included) for the JSON result lines ``lines`` of a suite run."""
    out = ['| bench | config | batch | dtype | steps / NFE | setup s | compile s | ms per step or batch | img/s | MFU '
           '| row s |',
           '|---|---|---:|---|---|---:|---:|---:|---:|---:|---:|']
    for line in lines:
        r = json.loads(line)
        if r['bench'] == 'net':
            for step in ('forward', 'forward_backward'):
                mfu = f'{100 * r[step + "_mfu"]:.1f}%' if r.get(step + '_mfu') else '-'
                out.append(f'| net {step.replace("_", "+")} | `{r["net"]}` | {r["batch"]} | {r["dtype"]} | - | - | '
                           f'{r[step + "_compile_s"]:.1f} | {r[step + "_ms"]:.1f} | {r[step + "_img_per_s"]:,.0f} | '
                           f'{mfu} | {_seconds(r.get("row_s"))} |')
            continue
        config = r['config'].rsplit('/', 1)[-1].removesuffix('.py')
        setup = r.get('setup_s', 0) + r.get('flops_s', 0) if 'setup_s' in r else None
        times = f'{_seconds(setup)} | {r["compile_s"]:.1f}'
        row_s = _seconds(r.get('row_s'))
        if r['bench'] == 'train':
            mfu = f'{100 * r["mfu"]:.1f}%' if r.get('mfu') else '-'
            out.append(f'| train step | `{config}` | {r["batch"]} | {r["dtype"]} | - | {times} | '
                       f'{r["step_ms"]:.1f} | {r["img_per_s"]:,.0f} | {mfu} | {row_s} |')
        else:
            spec = r.get('guidance')
            guidance = '' if spec is None else f', CFG w={float(spec):g}' if _number(spec) else f', {spec}'
            out.append(f'| sample {r["solver"]}{guidance} | `{config}` | {r["batch"]} | {r["dtype"]} | '
                       f'{r["num_steps"]} / {r["net_evals"]} | {times} | {1e3 * r["batch_s"]:.0f} | '
                       f'{r["img_per_s"]:,.0f} | - | {row_s} |')
    return out


def _seconds(value) -> str:
    return '-' if value is None else f'{value:.1f}'


def main() -> None:
    with open(sys.argv[1]) as f:
        lines = [line for line in f if line.strip()]
    if not lines:
        raise SystemExit(f'suite_table: {sys.argv[1]} holds no results (every row failed?)')
    r = json.loads(lines[0])
    print(f'{r["devices"]} x {r["device_kind"]}')
    print('\n'.join(rows(lines)))


if __name__ == '__main__':
    main()

