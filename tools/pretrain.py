#!/usr/bin/env python
"""Continual pre-training of a Llama-layout model (Llama, Mistral, Qwen2.5, Qwen3) on megatron-core (what launch/pretrain_llama3.sh runs).

    torchrun --nproc_per_node 8 tools/pretrain.py --config examples/llama3_8b_cpt.yaml
    python tools/pretrain.py --model smollm2-135m --data-path 0.97 sec 0.03 wiki ...   # CPU
    python tools/pretrain.py --num-layers 2 --hidden-size 64 --num-attention-heads 4 \
        --seq-length 32 --train-iters 2 --mock-data --tokenizer-type NullTokenizer --vocab-size 1000

Flags are Megatron-LM's; see docs/training.md.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_cpt.cli import run  # noqa: E402
from megatron_cpt.config import parse_args, resolve_config  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    config = resolve_config(parse_args(argv))  # every config error, before any compute
    from megatron_cpt.training.trainer import pretrain

    pretrain(config)
    return 0


if __name__ == "__main__":
    run(main)
