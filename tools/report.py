#!/usr/bin/env python
"""Write the CPT report (report.md + PNG plots) from training runs and evaluation results.

Examples:
  tools/report.py runs/cpt --eval base=eval/base.json cpt=eval/cpt.json merged=eval/merged.json \\
      --out reports/cpt
  tools/report.py runs/cpt-a runs/cpt-b --general 'wiki*' 'redpajama*' --out reports/ab
"""

from __future__ import annotations

import argparse
import sys

from megatron_cpt.cli import run
from megatron_cpt.evaluation.report import DEFAULT_GENERAL, ReportConfig, build_report


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "runs",
        nargs="*",
        metavar="RUN_DIR",
        help="run directory (metrics.jsonl or TensorBoard events), or LABEL=RUN_DIR",
    )
    p.add_argument(
        "--eval",
        nargs="+",
        default=[],
        metavar="LABEL=RESULTS_JSON",
        help="evaluation results from tools/evaluate.py; the first is the baseline",
    )
    p.add_argument("--out", required=True, help="report directory (report.md + PNGs)")
    p.add_argument(
        "--general",
        nargs="+",
        default=DEFAULT_GENERAL,
        metavar="PATTERN",
        help="glob patterns of general/replay set names (the rest are domain sets)",
    )
    p.add_argument("--title", default="Continual pre-training report")
    p.add_argument("--smooth", type=float, default=0.9, help="EMA weight of the train-loss line")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    path = build_report(
        ReportConfig(
            runs=args.runs,
            evals=args.eval,
            out_dir=args.out,
            general=args.general,
            title=args.title,
            smooth=args.smooth,
        )
    )
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    run(main)
