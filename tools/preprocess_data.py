"""Tokenize JSONL into megatron-core ``.bin/.idx`` shards (Megatron-LM compatible flags).

Example::

    python tools/preprocess_data.py --input 'corpus/*.jsonl.zst' --output-prefix data/sec \\
        --tokenizer-type Llama3Tokenizer --tokenizer-model tokenizer.model \\
        --append-eod --workers 16

Writes ``data/sec_text_document.{bin,idx}``, progress on stderr and a JSON summary on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_cpt.cli import run  # noqa: E402
from megatron_cpt.data.preprocess import PreprocessConfig, run_preprocess  # noqa: E402
from megatron_cpt.data.sentences import SentenceSplitterConfig  # noqa: E402
from megatron_cpt.errors import UserError  # noqa: E402
from megatron_cpt.tokenizers import TOKENIZER_TYPES  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = p.add_argument_group("input data")
    g.add_argument(
        "--input", nargs="+", required=True, help="JSONL files (.jsonl, .gz, .zst) or globs"
    )
    g.add_argument(
        "--json-keys", nargs="+", default=["text"], help="keys to extract (default: text)"
    )
    g.add_argument(
        "--split-sentences", action="store_true", help="one sequence per sentence (punkt)"
    )
    g.add_argument("--keep-newlines", action="store_true", help="keep newlines between sentences")
    g.add_argument(
        "--punkt-train-chars",
        type=int,
        default=SentenceSplitterConfig.train_chars,
        help="input characters punkt trains on (unsupervised) for --split-sentences; 0 = untrained",
    )
    g.add_argument(
        "--skip-bad-lines", action="store_true", help="skip and count bad lines instead of stopping"
    )
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer-type", required=True, choices=TOKENIZER_TYPES)
    g.add_argument(
        "--tokenizer-model", required=True, help="tokenizer.model / tokenizer.json / HF dir / .gguf"
    )
    g.add_argument("--append-eod", action="store_true", help="append the end-of-document token")
    g = p.add_argument_group("output data")
    g.add_argument(
        "--output-prefix", required=True, help="writes {prefix}_{key}_{document|sentence}.bin/.idx"
    )
    g = p.add_argument_group("runtime")
    g.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    g.add_argument(
        "--log-interval", type=int, default=10000, help="documents between progress lines"
    )
    g.add_argument(
        "--chunk-bytes",
        type=int,
        default=1 << 20,
        help="raw input bytes per worker task, at most (a small input is cut finer, down to "
        "64 KiB, so that every worker gets 8 tasks)",
    )
    g.add_argument(
        "--partitions",
        type=int,
        default=1,
        help="accepted for Megatron-LM compatibility; must be 1",
    )
    g.add_argument(
        "--keep-sequential-samples", action="store_true", help="accepted; order is always kept"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.partitions != 1:
        raise UserError(
            f"--partitions {args.partitions}: not needed here (workers share one input stream); use 1"
        )
    config = PreprocessConfig(
        inputs=args.input,
        output_prefix=args.output_prefix,
        tokenizer_type=args.tokenizer_type,
        tokenizer_model=args.tokenizer_model,
        json_keys=tuple(args.json_keys),
        workers=args.workers,
        append_eod=args.append_eod,
        split_sentences=args.split_sentences,
        sentences=SentenceSplitterConfig(
            train_chars=args.punkt_train_chars, keep_newlines=args.keep_newlines
        ),
        skip_bad_lines=args.skip_bad_lines,
        log_interval=args.log_interval,
        chunk_bytes=args.chunk_bytes,
    )
    summary = run_preprocess(config)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    run(main)
