#!/usr/bin/env python
"""Sweep merge parameters and pick the domain/general trade-off: ``merge_sweep.py --base B
--model CPT --domain NAME=PATH --general NAME=PATH --out DIR``.

Every grid point (density x weight x lambda) is merged (in the inputs' own space: HF or
Megatron), evaluated (bits-per-byte on each set), and cached under DIR/candidates/ by a hash
of its recipe, seed, input files and evaluation settings, so a re-run evaluates only new points.
Writes DIR/sweep.md, DIR/sweep.json and DIR/pareto.png, and prints the recommended point.

Example::

    merge_sweep.py --base ckpt/instruct --model ckpt/cpt --method ties \\
        --density 0.3,0.5,0.7 --weight 0.5,1.0 \\
        --domain sec=data/sec_heldout.jsonl --general wiki=data/wiki_heldout.jsonl \\
        --max-docs 50 --constraint "general_bpb<=base*1.01" --out runs/sweep
"""

from __future__ import annotations

import argparse
from pathlib import Path

from megatron_cpt.cli import run
from megatron_cpt.errors import UserError
from megatron_cpt.evaluation.perplexity import PerplexityConfig
from megatron_cpt.evaluation.run import parse_data_specs
from megatron_cpt.merge.sweep import SWEEP_METHODS, Sweep, SweepConfig


def floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base", required=True, type=Path, help="base (instruct) checkpoint")
    parser.add_argument("--model", required=True, action="append", type=Path,
                        help="fine-tuned (CPT) checkpoint; repeat for several")  # fmt: skip
    parser.add_argument("--method", default="ties", choices=SWEEP_METHODS)
    parser.add_argument("--density", type=floats, default=[0.3, 0.5, 0.7],
                        help="densities (methods that sparsify; default 0.3,0.5,0.7)")  # fmt: skip
    parser.add_argument("--weight", type=floats, default=[0.5, 1.0], help="default 0.5,1.0")
    parser.add_argument("--lambda", dest="lambdas", type=floats, default=[1.0],
                        help="task-vector scales (default 1.0)")  # fmt: skip
    parser.add_argument("--normalize", action="store_true",
                        help="divide by the summed weights (off: with one model, TIES's "
                        "normalize would cancel the weight)")  # fmt: skip
    parser.add_argument("--domain", action="append", default=[], metavar="NAME=PATH[,PATH]")
    parser.add_argument("--general", action="append", default=[], metavar="NAME=PATH[,PATH]")
    parser.add_argument("--constraint", action="append", default=[],
                        help='e.g. "general_bpb<=base*1.01" or "general_bpb<=base+1%%"; '
                        "repeatable; metrics: domain_bpb, general_bpb, NAME_bpb")  # fmt: skip
    parser.add_argument("--out", required=True, type=Path, help="sweep directory (cache too)")
    parser.add_argument("--max-docs", type=int, default=None, help="documents per set")
    parser.add_argument("--seq-length", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--eval-dtype", default="float32")
    parser.add_argument("--tokenizer", default=None, help="Megatron inputs: evaluator tokenizer")
    parser.add_argument("--seed", type=int, default=0, help="DARE/DELLA mask seed")
    parser.add_argument("--device", default="cpu", help="merge arithmetic device: cpu | cuda")
    parser.add_argument("--keep-models", action="store_true", help="keep merged candidates")
    args = parser.parse_args(argv)
    if not args.domain or not args.general:
        raise UserError("give at least one --domain NAME=PATH and one --general NAME=PATH")
    domain, general = parse_data_specs(args.domain), parse_data_specs(args.general)
    perplexity = PerplexityConfig(seq_length=args.seq_length, batch_size=args.batch_size,
                                  max_docs=args.max_docs)  # fmt: skip
    perplexity.validate()
    for path in [args.base, *args.model]:
        if not path.is_dir():
            raise UserError(f"{path}: not a checkpoint directory")
    cfg = SweepConfig(
        base=args.base.resolve(),
        models=[m.resolve() for m in args.model],
        domain=domain,
        general=general,
        out_dir=args.out,
        method=args.method,
        densities=args.density,
        weights=args.weight,
        lambdas=args.lambdas,
        normalize=args.normalize,
        perplexity=perplexity,
        eval_dtype=args.eval_dtype,
        constraints=args.constraint,
        seed=args.seed,
        device=args.device,
        keep_models=args.keep_models,
        tokenizer=args.tokenizer,
    )
    summary = Sweep(cfg).run()
    rec = summary["recommended"]
    print(f"evaluated {summary['evaluated']} new point(s), {summary['cached']} from the cache")
    print(f"wrote {args.out / 'sweep.md'}, {args.out / 'sweep.json'}, {args.out / 'pareto.png'}")
    if rec is None:
        print("recommended: none (no candidate meets the constraints)")
    else:
        print(
            f"recommended: {rec['label']} {rec['params']}  domain bpb "
            f"{rec['metrics']['domain_bpb']:.4f} ({rec['domain_gain_pct']:+.2f} %)  general bpb "
            f"{rec['metrics']['general_bpb']:.4f} ({rec['general_change_pct']:+.2f} %)"
        )
    return 0


if __name__ == "__main__":
    run(main)
