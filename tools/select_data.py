"""Select a compute-efficient subset of a domain corpus (FinPythia ETS-/ETA-DACP).

Under torchrun (``torchrun --nproc_per_node N tools/select_data.py ...``) each rank scores its
share of the documents; the selection equals the one-process run's.

Examples:
  # ETS-DACP: the 10% of filings most similar to the target tasks' data
  python tools/select_data.py --input 'edgar/*.jsonl.zst' --task-data fpb.jsonl fiqa.jsonl \\
      --metric similarity --fraction 0.1 --output selected.jsonl
  # ETA-DACP (no task data): novelty + diversity, soft sampling, a token budget
  python tools/select_data.py --input corpus.jsonl --metric perplexity,pos-entropy \\
      --sampling soft --tokens 50000000 --tokenizer path/to/tokenizer --output sel.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megatron_cpt.cli import run  # noqa: E402
from megatron_cpt.errors import UserError  # noqa: E402
from megatron_cpt.selection.dedup import DedupConfig  # noqa: E402
from megatron_cpt.selection.perplexity import PerplexityConfig  # noqa: E402
from megatron_cpt.selection.pipeline import SelectionConfig, parse_metrics, run_selection  # noqa: E402
from megatron_cpt.selection.pos_entropy import PosEntropyConfig  # noqa: E402
from megatron_cpt.selection.sampling import Budget  # noqa: E402
from megatron_cpt.selection.similarity import SimilarityConfig  # noqa: E402
from megatron_cpt.selection.to_shards import ShardOutputConfig  # noqa: E402
from megatron_cpt.selection.tokens import TokenCounterConfig  # noqa: E402
from megatron_cpt.tokenizers import TOKENIZER_TYPES  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="\n".join(__doc__.splitlines()[2:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    io = p.add_argument_group("input/output")
    io.add_argument("--input", nargs="+", required=True, help="JSONL files/globs (.gz/.zst ok)")
    io.add_argument("--output", required=True, help="selected JSONL (original lines)")
    io.add_argument("--scores-output", help="per-document scores (default <output>.scores.jsonl)")
    io.add_argument("--summary-output", help="JSON summary (default <output>.summary.json)")
    io.add_argument("--text-key", default="text")
    io.add_argument("--id-key", default="id")
    io.add_argument("--skip-bad-lines", action="store_true", help="count and skip bad lines")
    io.add_argument("--cache-dir", help="score cache (default ~/.cache/megatron_cpt/...)")
    io.add_argument("--chunk-size", type=int, default=64, help="docs per scoring call/flush")
    io.add_argument("--no-progress", action="store_true")

    sh = p.add_argument_group("selection straight to megatron-core shards")
    sh.add_argument(
        "--output-prefix",
        help="also write the selection as {prefix}_{text-key}_document.bin/.idx "
        "(as tools/preprocess_data.py would from --output)",
    )
    sh.add_argument("--tokenizer-type", choices=TOKENIZER_TYPES, help="shard tokenizer type")
    sh.add_argument("--tokenizer-model", help="shard tokenizer file/dir")
    sh.add_argument("--append-eod", action="store_true", help="end-of-document token in shards")
    sh.add_argument("--shard-workers", type=int, default=1, help="tokenizer processes")

    sel = p.add_argument_group("selection")
    sel.add_argument(
        "--metric",
        default="similarity",
        help="similarity | perplexity | pos-entropy | random | combined (= all three FinPythia "
        "metrics, rank-averaged) | a comma list (rank-averaged)",
    )
    sel.add_argument("--sampling", choices=("hard", "soft"), default="hard")
    budget = sel.add_mutually_exclusive_group(required=True)
    budget.add_argument("--fraction", type=float, help="fraction of the deduplicated corpus")
    budget.add_argument("--documents", type=int, help="number of documents")
    budget.add_argument("--tokens", type=int, help="token budget (see --tokenizer)")
    sel.add_argument("--seed", type=int, default=0)
    sel.add_argument(
        "--tokenizer", help="HF tokenizer dir or .gguf for token counts (default: words)"
    )

    sim = p.add_argument_group("similarity (ETS-DACP)")
    sim.add_argument("--task-data", nargs="+", default=[], help="task examples JSONL")
    sim.add_argument("--task-key", default="text")
    sim.add_argument("--embedding-model", default=SimilarityConfig.model)
    sim.add_argument("--embedding-batch-size", type=int, default=SimilarityConfig.batch_size)
    sim.add_argument("--embedding-device", help="torch device (default: GPU if present, else CPU)")

    ppl = p.add_argument_group("perplexity (ETA-DACP novelty)")
    ppl.add_argument(
        "--proxy-model", default=PerplexityConfig.model, help="HF dir, .gguf, or smollm2"
    )
    ppl.add_argument("--proxy-max-tokens", type=int, default=PerplexityConfig.max_tokens)
    ppl.add_argument("--proxy-batch-size", type=int, default=PerplexityConfig.batch_size)
    ppl.add_argument("--proxy-device", help="torch device (default: GPU if present, else CPU)")

    pos = p.add_argument_group("pos-entropy (ETA-DACP diversity)")
    pos.add_argument("--spacy-model", default=PosEntropyConfig.model)
    pos.add_argument("--pos-max-chars", type=int, default=PosEntropyConfig.max_chars)

    dd = p.add_argument_group("near-duplicate removal (MinHash LSH)")
    dd.add_argument("--no-dedup", action="store_true")
    dd.add_argument("--dedup-threshold", type=float, default=DedupConfig.threshold)
    dd.add_argument("--dedup-shingle-size", type=int, default=DedupConfig.shingle_size)
    dd.add_argument("--dedup-num-perm", type=int, default=DedupConfig.num_perm)
    dd.add_argument(
        "--dedup-workers",
        type=int,
        default=1,
        help="processes for the parallel dedup stages (MinHash signatures, band partitions, candidate "
        "pairs)",
    )
    dd.add_argument(
        "--dedup-chunk",
        type=int,
        default=SelectionConfig.dedup_chunk,
        help="documents per dedup chunk: bounds the memory of every dedup stage",
    )
    dd.add_argument(
        "--dedup-work-dir", help="stage files (default: a temporary dir next to --output)"
    )
    dd.add_argument(
        "--dedup-in-memory",
        action="store_true",
        help="one whole-corpus datasketch index instead of the staged files (same result)",
    )
    return p


def _shards(args: argparse.Namespace) -> ShardOutputConfig | None:
    if args.output_prefix is None:
        for flag in ("tokenizer_type", "tokenizer_model"):
            if getattr(args, flag) is not None:
                raise UserError(f"--{flag.replace('_', '-')} is only used with --output-prefix")
        return None
    for flag in ("tokenizer_type", "tokenizer_model"):
        if getattr(args, flag) is None:
            raise UserError(f"--output-prefix needs --{flag.replace('_', '-')}")
    return ShardOutputConfig(
        output_prefix=args.output_prefix,
        tokenizer_type=args.tokenizer_type,
        tokenizer_model=args.tokenizer_model,
        append_eod=args.append_eod,
        workers=args.shard_workers,
    )


def config_from_args(args: argparse.Namespace) -> SelectionConfig:
    if args.fraction is not None:
        budget = Budget("fraction", args.fraction)
    elif args.documents is not None:
        budget = Budget("documents", args.documents)
    else:
        budget = Budget("tokens", args.tokens)
    return SelectionConfig(
        inputs=tuple(args.input),
        output=args.output,
        budget=budget,
        metrics=parse_metrics(args.metric),
        sampling=args.sampling,
        seed=args.seed,
        text_key=args.text_key,
        id_key=args.id_key,
        scores_output=args.scores_output,
        summary_output=args.summary_output,
        cache_dir=args.cache_dir,
        chunk_size=args.chunk_size,
        skip_bad_lines=args.skip_bad_lines,
        progress=not args.no_progress,
        shards=_shards(args),
        dedup_in_memory=args.dedup_in_memory,
        dedup_workers=args.dedup_workers,
        dedup_chunk=args.dedup_chunk,
        dedup_work_dir=args.dedup_work_dir,
        dedup=DedupConfig(
            enabled=not args.no_dedup,
            shingle_size=args.dedup_shingle_size,
            threshold=args.dedup_threshold,
            num_perm=args.dedup_num_perm,
        ),
        similarity=SimilarityConfig(
            task_data=tuple(args.task_data),
            task_key=args.task_key,
            model=args.embedding_model,
            batch_size=args.embedding_batch_size,
            device=args.embedding_device,
        ),
        perplexity=PerplexityConfig(
            model=args.proxy_model,
            max_tokens=args.proxy_max_tokens,
            batch_size=args.proxy_batch_size,
            device=args.proxy_device,
        ),
        pos_entropy=PosEntropyConfig(model=args.spacy_model, max_chars=args.pos_max_chars),
        tokens=TokenCounterConfig(tokenizer=args.tokenizer),
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    summary = run_selection(config_from_args(args))
    if not summary:  # a rank > 0 of a sharded (torchrun) run: rank 0 writes and reports
        return 0
    counts, tokens = summary["counts"], summary["tokens"]
    print(
        f"selected {counts['selected']}/{counts['kept_after_dedup']} documents "
        f"({tokens['selected']}/{tokens['kept_after_dedup']} {tokens['unit']}); "
        f"{counts['duplicates_removed']} near-duplicates removed -> {summary['outputs']['selected']}"
    )
    print(json.dumps(summary["cache"]), file=sys.stderr)
    return 0


if __name__ == "__main__":
    run(main)
