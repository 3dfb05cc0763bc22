#!/usr/bin/env python
"""Continual pre-training of a Llama-layout model (Llama, Mistral, Qwen2.5, Qwen3) on megatron-core (what launch/pretrain_llama3.sh runs).

    torchrun --nproc_per_node 8 tools/pretrain.py --config examples/llama3_8b_cpt.yaml
    python tools/pretrain.py --model smollm2-135m --data-path 0.97 sec 0.03 wiki ...   # CPU

Flags are Megatron-LM's; see docs/training.md.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_cpt.cli import run  # noqa: E402
from megatron_cpt.config import parse_args  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from megatron_cpt.training.trainer import pretrain

    pretrain(args)
    return 0


if __name__ == "__main__":
    run(main)
