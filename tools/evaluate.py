#!/usr/bin/env python
"""Evaluate one HF or Megatron checkpoint: perplexity + bits-per-byte on JSONL sets, lm-eval tasks,
chat-template instruction following (--instruct) and TAT-QA numeric QA (--tatqa).

Examples:
  tools/evaluate.py --hf SmolLM2-135M-Instruct.Q4_1.gguf \\
      --data sec=../shared/data/domain/annual_reports.jsonl \\
      --data wiki=../shared/data/general/wikitext2.jsonl --max-docs 50 --seq-length 1024 \\
      --tasks finance --limit 200 --instruct --tatqa --output base.json
  tools/evaluate.py --megatron runs/cpt/checkpoints --data sec=held_out.jsonl --output cpt.json
"""

from __future__ import annotations

import argparse
import sys

from megatron_cpt.cli import run
from megatron_cpt.evaluation.backend import BackendSpec
from megatron_cpt.evaluation.instruct import InstructConfig
from megatron_cpt.evaluation.perplexity import PerplexityConfig
from megatron_cpt.evaluation.results import write_json_atomic
from megatron_cpt.evaluation.run import (
    EvaluateConfig,
    is_main_process,
    parse_data_specs,
    run_evaluation,
    summary_lines,
)
from megatron_cpt.evaluation.tasks_runner import TasksConfig
from megatron_cpt.evaluation.tatqa_task import TatqaConfig
from megatron_cpt.output_paths import check_output_file


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    m = p.add_argument_group("model (exactly one)")
    m.add_argument("--hf", help="Hugging Face model directory or .gguf file")
    m.add_argument("--megatron", help="Megatron checkpoint directory (torch_dist)")
    m.add_argument(
        "--tokenizer", help="Megatron only: tokenizer file/dir overriding the checkpoint's"
    )
    m.add_argument(
        "--tp", type=int, default=1, help="tensor parallel size (run under torchrun, TP*PP ranks)"
    )
    m.add_argument(
        "--pp", type=int, default=1, help="pipeline parallel size (run under torchrun, TP*PP ranks)"
    )
    m.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    d = p.add_argument_group("perplexity / bits-per-byte")
    d.add_argument(
        "--data",
        action="append",
        default=[],
        metavar="NAME=PATH[,PATH]",
        help="a named JSONL set (files or globs; .gz/.zst ok); repeatable",
    )
    d.add_argument("--text-key", default="text")
    d.add_argument("--max-docs", type=int, help="first N documents of each set")
    d.add_argument("--seq-length", type=int, default=1024, help="tokens per window (context)")
    d.add_argument(
        "--stride",
        type=int,
        help="new tokens scored per window after the first (default: --seq-length, "
        "lm-eval's disjoint windows; smaller = more context, more compute)",
    )
    d.add_argument(
        "--prefix",
        default="bos",
        choices=["bos", "eos"],
        help="token conditioning each document's first token",
    )
    d.add_argument("--batch-size", type=int, default=8)
    d.add_argument(
        "--skip-bad-lines",
        action="store_true",
        help="count and skip bad JSONL lines instead of stopping",
    )
    t = p.add_argument_group("lm-eval tasks")
    t.add_argument(
        "--tasks",
        help="comma-separated: fpb,fiqasa,headlines, finance, finance_5shot, "
        "*_5shot or any lm-eval task whose data is cached locally",
    )
    t.add_argument("--num-fewshot", type=int, help="override every task's number of shots")
    t.add_argument("--limit", type=float, help="docs per task (int) or fraction (<1)")
    t.add_argument(
        "--task-data-dir",
        help="dir with fpb.jsonl, fiqasa_*.jsonl, headlines.jsonl "
        "(default $MEGATRON_CPT_FINANCE_DATA or ../shared/data/tasks)",
    )
    i = p.add_argument_group("instruction following (zero-shot, the model's chat template)")
    i.add_argument(
        "--instruct",
        nargs="?",
        const="fpb,fiqasa,headlines",
        metavar="TASKS",
        help="FPB/FiQA-SA/Headlines as chat instructions: label log-likelihood, parsed "
        "generation (+ invalid-answer rate), chat-format NLL (default: all three)",
    )
    i.add_argument("--instruct-limit", type=int, default=200, help="items per task (fixed seed)")
    q = p.add_argument_group("TAT-QA numeric QA (k-shot generation)")
    q.add_argument("--tatqa", action="store_true", help="run TAT-QA: EM/F1 per answer type")
    q.add_argument("--tatqa-data", help="tatqa_dev.jsonl (default ../shared/data/tasks)")
    q.add_argument("--tatqa-limit", type=int, default=100, help="questions (fixed seed)")
    q.add_argument("--tatqa-shots", type=int, default=2, help="solved examples per prompt")
    q.add_argument("--seed", type=int, default=1234, help="sampling seed of --instruct/--tatqa")
    p.add_argument("--output", "-o", help="results JSON (written atomically)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.output:  # before minutes of evaluation, not after
        check_output_file(args.output, "--output")
    limit = args.limit
    if limit is not None and limit >= 1:
        limit = int(limit)
    cfg = EvaluateConfig(
        model=BackendSpec(
            hf=args.hf,
            megatron=args.megatron,
            tokenizer=args.tokenizer,
            tp=args.tp,
            pp=args.pp,
            dtype=args.dtype,
        ),
        data=parse_data_specs(args.data),
        perplexity=PerplexityConfig(
            seq_length=args.seq_length,
            stride=args.stride,
            batch_size=args.batch_size,
            max_docs=args.max_docs,
            text_key=args.text_key,
            prefix=args.prefix,
            skip_bad_lines=args.skip_bad_lines,
        ),
        tasks=TasksConfig(
            tasks=[x for x in args.tasks.split(",") if x],
            num_fewshot=args.num_fewshot,
            limit=limit,
            data_dir=args.task_data_dir,
        )
        if args.tasks
        else None,
        instruct=InstructConfig(
            tasks=[x for x in args.instruct.split(",") if x],
            limit=args.instruct_limit,
            seed=args.seed,
            data_dir=args.task_data_dir,
            batch_size=args.batch_size,
        )
        if args.instruct
        else None,
        tatqa=TatqaConfig(
            path=args.tatqa_data,
            limit=args.tatqa_limit,
            num_fewshot=args.tatqa_shots,
            seed=args.seed,
            batch_size=args.batch_size,
        )
        if args.tatqa
        else None,
    )
    result = run_evaluation(cfg)
    if not is_main_process():  # TP/PP under torchrun: every rank computed the same numbers
        return 0
    for line in summary_lines(result):
        print(line)
    if args.output:
        write_json_atomic(args.output, result)
        print(f"wrote {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    run(main)
