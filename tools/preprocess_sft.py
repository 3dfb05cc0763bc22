"""Tokenize chat JSONL into SFT shards: tokens plus an assistant-only loss mask, packed.

Example::

    python tools/preprocess_sft.py --input chats.jsonl --output-prefix data/chat \\
        --tokenizer-type HuggingFaceTokenizer --tokenizer-model SmolLM2-135M-Instruct.gguf \\
        --seq-length 2048 --packing pack --overlong truncate

Each line is ``{"messages": [{"role", "content"}, ...]}`` or ``{"prompt", "response"}``.
Writes ``data/chat_tokens.{bin,idx}`` and ``data/chat_mask.{bin,idx}`` (same layout: one
document per sample of seq-length + 1 tokens, one sequence per conversation) and a JSON
summary on stdout. See docs/sft.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_cpt.cli import run  # noqa: E402
from megatron_cpt.data.sft import (  # noqa: E402
    OVERLONG_MODES,
    PACKING_MODES,
    SftConfig,
    run_sft_preprocess,
)
from megatron_cpt.tokenizers import TOKENIZER_TYPES  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = p.add_argument_group("input data")
    g.add_argument(
        "--input", nargs="+", required=True, help="JSONL files (.jsonl, .gz, .zst) or globs"
    )
    g.add_argument(
        "--skip-bad-lines", action="store_true", help="skip and count bad lines instead of stopping"
    )
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer-type", required=True, choices=TOKENIZER_TYPES)
    g.add_argument("--tokenizer-model", required=True, help="tokenizer.json / HF dir / .gguf")
    g.add_argument(
        "--chat-template",
        default=None,
        help="file holding a Jinja chat template (default: the tokenizer model's own)",
    )
    g = p.add_argument_group("samples")
    g.add_argument(
        "--seq-length", type=int, required=True, help="training sequence length (samples hold +1)"
    )
    g.add_argument(
        "--packing",
        choices=PACKING_MODES,
        default="pack",
        help="pack: several conversations per sample (default); pad: one per sample",
    )
    g.add_argument(
        "--overlong",
        choices=OVERLONG_MODES,
        default="truncate",
        help="conversations longer than a sample: keep the head (default) or skip; counted",
    )
    g = p.add_argument_group("output data")
    g.add_argument(
        "--output-prefix",
        required=True,
        help="writes {prefix}_tokens.bin/.idx, {prefix}_mask.bin/.idx",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = SftConfig(
        inputs=args.input,
        output_prefix=args.output_prefix,
        tokenizer_type=args.tokenizer_type,
        tokenizer_model=args.tokenizer_model,
        seq_length=args.seq_length,
        packing=args.packing,
        overlong=args.overlong,
        chat_template=args.chat_template,
        skip_bad_lines=args.skip_bad_lines,
    )
    summary = run_sft_preprocess(config, progress_stream=sys.stderr)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    run(main)
