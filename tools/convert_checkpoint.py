#!/usr/bin/env python
"""Convert Llama, Mistral, Qwen2/2.5 and Qwen3 checkpoints between HF (safetensors dir or GGUF) and megatron-core.

  hf-to-mcore --hf PATH --out DIR --tensor-model-parallel-size N --pipeline-model-parallel-size M
  mcore-to-hf --load DIR --out HF_DIR [--tokenizer-from PATH] [--lora-adapter-only]

A megatron checkpoint loads at any TP/PP (dist_checkpointing re-shards on load), so one process
converts for any target layout; see docs/conversion.md.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_cpt.cli import run  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    imp = sub.add_parser("hf-to-mcore", help="HF safetensors dir or .gguf -> megatron-core")
    imp.add_argument(
        "--hf",
        required=True,
        help="HF model directory (safetensors) or .gguf file (llama/qwen2/qwen3)",
    )
    imp.add_argument("--out", required=True, help="megatron checkpoint directory to create")
    imp.add_argument("--tensor-model-parallel-size", type=int, default=1)
    imp.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    imp.add_argument("--model", help="preset or config.json the checkpoint must match")
    imp.add_argument(
        "--dtype", choices=["float32", "bfloat16", "float16"], help="default: as stored"
    )
    imp.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    imp.add_argument("--overwrite", action="store_true")

    exp = sub.add_parser("mcore-to-hf", help="megatron-core checkpoint -> HF directory")
    exp.add_argument("--load", required=True, help="megatron checkpoint directory")
    exp.add_argument("--out", required=True, help="HF directory to create")
    exp.add_argument("--tokenizer-from", help="HF dir or .gguf (default: saved at import)")
    exp.add_argument(
        "--dtype", choices=["float32", "bfloat16", "float16"], help="default: as stored"
    )
    exp.add_argument("--max-shard-size-gb", type=float, default=2.0)
    exp.add_argument(
        "--lora-adapter-only",
        action="store_true",
        help="a LoRA run: write only its adapters as a PEFT adapter directory "
        "(adapter_config.json + adapter_model.safetensors) instead of the merged model",
    )
    exp.add_argument("--overwrite", action="store_true")
    return parser


def _shard_bytes(gb: float) -> int:
    from megatron_cpt.errors import UserError

    if not gb > 0 or gb == float("inf"):  # also NaN
        raise UserError(f"--max-shard-size-gb {gb}: must be a positive number")
    return max(1, int(gb * 1024**3))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.command == "hf-to-mcore":
        from megatron_cpt.convert.importer import ImportConfig, import_hf

        out = import_hf(
            ImportConfig(
                hf_path=args.hf,
                out_dir=args.out,
                tensor_parallel=args.tensor_model_parallel_size,
                pipeline_parallel=args.pipeline_model_parallel_size,
                model=args.model,
                dtype=args.dtype,
                make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
                overwrite=args.overwrite,
            )
        )
    elif args.lora_adapter_only:
        from megatron_cpt.convert.peft_adapter import AdapterExportConfig, export_peft_adapter

        out = export_peft_adapter(AdapterExportConfig(args.load, args.out, args.overwrite))
    else:
        from megatron_cpt.convert.exporter import ExportConfig, export_hf

        out = export_hf(
            ExportConfig(
                load_dir=args.load,
                out_dir=args.out,
                tokenizer_from=args.tokenizer_from,
                dtype=args.dtype,
                max_shard_bytes=_shard_bytes(args.max_shard_size_gb),
                overwrite=args.overwrite,
            )
        )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    run(main)
