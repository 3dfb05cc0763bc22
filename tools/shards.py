"""Merge or inspect megatron-core ``.bin/.idx`` shards.

    python tools/shards.py merge --output-prefix data/all data/sec_text_document data/wiki_text_document
    python tools/shards.py inspect data/all --tokenizer-type Llama3Tokenizer \\
        --tokenizer-model tokenizer.model --sample 2

Both validate every ``.idx`` against its ``.bin`` first; a corrupt pair is a one-line error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_cpt.cli import run  # noqa: E402
from megatron_cpt.data.shards import InspectConfig, inspect_shard, merge_shards  # noqa: E402
from megatron_cpt.errors import UserError  # noqa: E402
from megatron_cpt.tokenizers import TOKENIZER_TYPES, build_tokenizer  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Merge or inspect megatron-core indexed shards.")
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("merge", help="concatenate shards (same dtype) in the given order")
    m.add_argument("--output-prefix", required=True)
    m.add_argument("prefixes", nargs="+", help="input prefixes (without .bin/.idx)")
    i = sub.add_parser("inspect", help="validate a shard and print counts and a decoded sample")
    i.add_argument("prefix")
    i.add_argument("--tokenizer-type", choices=TOKENIZER_TYPES)
    i.add_argument("--tokenizer-model")
    i.add_argument("--sample", type=int, default=InspectConfig.sample, help="documents to decode")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "merge":
        result = merge_shards(args.prefixes, args.output_prefix)
    else:
        if args.sample < 0:
            raise UserError(f"--sample {args.sample}: must be 0 or more")
        if (args.tokenizer_type is None) != (args.tokenizer_model is None):
            raise UserError("inspect: give both --tokenizer-type and --tokenizer-model, or neither")
        tokenizer = None
        if args.tokenizer_type:
            tokenizer = build_tokenizer(args.tokenizer_type, args.tokenizer_model)
        result = inspect_shard(args.prefix, tokenizer, InspectConfig(sample=args.sample))
    print(json.dumps(result, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    run(main)
