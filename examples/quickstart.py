#!/usr/bin/env python
"""One command, the whole CPT pipeline, offline, on a laptop CPU (``make demo``).

Converts the shipped SmolLM2-135M-Instruct, preprocesses real domain (financial) and general
text, continues pre-training on a 95/5 blend with per-dataset validation, exports to HF, merges
the result back onto the instruct model with TIES, evaluates base / CPT / merged on held-out
text and writes a report. Re-running skips stages whose outputs check out. ``--sft`` adds
CPT -> SFT -> evaluate as a fourth model.

    python examples/quickstart.py                        # CPU defaults (README has the timing)
    python examples/quickstart.py --steps 200 --device cuda
    python examples/quickstart.py --domain-data my_filings.jsonl --general-data web.jsonl
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_cpt.cli import run  # noqa: E402
from megatron_cpt.pipeline.quickstart import Pipeline, QuickstartConfig  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    d = QuickstartConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--work-dir", type=Path, default=d.work_dir, help="where every stage writes")
    p.add_argument("--device", choices=["cpu", "cuda"], default=d.device)
    p.add_argument("--domain-data", nargs="+", default=[], help="your domain JSONL (text key)")
    p.add_argument("--general-data", nargs="+", default=[], help="your general replay JSONL")
    p.add_argument("--steps", type=int, default=d.steps, help="CPT iterations")
    p.add_argument("--seq-length", type=int, default=d.seq_length)
    p.add_argument("--global-batch-size", type=int, default=d.global_batch_size)
    p.add_argument("--micro-batch-size", type=int, default=d.micro_batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--domain-weight", type=float, default=d.domain_weight)
    p.add_argument("--eval-interval", type=int, default=d.eval_interval)
    p.add_argument("--eval-docs", type=int, default=d.eval_docs, help="held-out docs per set")
    p.add_argument("--eval-chars", type=int, default=d.eval_chars, help="characters per eval doc")
    p.add_argument("--eval-seq-length", type=int, default=d.eval_seq_length)
    p.add_argument("--merge-density", type=float, default=d.merge_density)
    p.add_argument("--merge-weight", type=float, default=d.merge_weight)
    p.add_argument(
        "--instruct-items",
        type=int,
        default=d.instruct_items,
        help="items per chat-instruction task (FPB, FiQA-SA, Headlines); 0 = skip",
    )
    p.add_argument(
        "--tatqa-questions",
        type=int,
        default=d.tatqa_questions,
        help="TAT-QA questions (fixed seed); 0 = skip",
    )
    p.add_argument("--tatqa-shots", type=int, default=d.tatqa_shots)
    p.add_argument("--merge-sweep", action="store_true",
                   help="also sweep TIES density x weight (tools/merge_sweep.py; 8 extra evaluations)")  # fmt: skip
    p.add_argument(
        "--sft",
        action="store_true",
        help="also CPT -> SFT -> evaluate (off by default): fine-tune the CPT checkpoint on\n"
        "FiQA-SA train / FPB non-evaluation items in the chat-instruction format, export it\n"
        "and evaluate it as a 4th model, 'sft'. The CPT checkpoint (not the merged model) is\n"
        "tuned: SFT is what gives the domain-adapted weights their instruction following\n"
        "back, and it is already a megatron-core checkpoint (the merge is an HF export)",
    )
    p.add_argument("--sft-items", type=int, default=d.sft_items, help="SFT conversations")
    p.add_argument("--sft-lr", type=float, default=d.sft_lr)
    p.add_argument("--sft-epochs", type=int, default=d.sft_epochs)
    args = p.parse_args(argv)
    cfg = dataclasses.replace(d, **vars(args))
    start = time.perf_counter()
    Pipeline(cfg).run()
    print(
        f"\nquickstart finished in {time.perf_counter() - start:.0f} s; outputs in {cfg.work_dir}"
    )
    return 0


if __name__ == "__main__":
    run(main)
