#!/usr/bin/env python
"""Merge checkpoints from a mergekit-style YAML recipe: ``merge_models.py CONFIG.yaml OUT_DIR``.

Example (Llama-3-SEC style: TIES the CPT model back into the instruct model)::

    merge_method: ties
    base_model: ckpt/instruct-hf
    models:
      - model: ckpt/cpt-sec-hf
        parameters: {weight: 1.0, density: 0.5}
    parameters: {normalize: true, lambda: 1.0}
    dtype: bfloat16
"""

from __future__ import annotations

import argparse
import re

from megatron_cpt.cli import run
from megatron_cpt.errors import UserError
from megatron_cpt.merge import MergeOptions, load_config, merge_checkpoints

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}


def parse_size(text: str) -> int:
    """'5GB' / '500M' / '2GiB' / '1000000' -> bytes (same spelling as mergekit's --out-shard-size)."""
    match = _SIZE.match(text)
    if not match:
        raise UserError(f"--max-shard-size: cannot read size {text!r} (e.g. 5GB, 500M)")
    unit = (match.group(2) or "").lower()
    factor = _UNITS[unit[:1]] if "i" not in unit else 1024 ** "bkmgt".index(unit[0])
    return int(float(match.group(1)) * factor)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="mergekit-style YAML recipe")
    parser.add_argument("out_dir", help="output checkpoint directory (created when complete)")
    parser.add_argument("--random-seed", type=int, default=0, help="seed for DARE/DELLA drop masks")
    parser.add_argument("--max-shard-size", default="5GB", help="output shard size (default 5GB)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--device",
        default="cpu",
        help="where the arithmetic runs: cpu (default) or cuda[:N]; tensors are moved there one "
        "at a time (in row chunks, or kept on the host, when one would not fit) and back",
    )
    args = parser.parse_args(argv)
    config = load_config(args.config)
    result = merge_checkpoints(
        config,
        args.out_dir,
        MergeOptions(
            random_seed=args.random_seed,
            max_shard_bytes=parse_size(args.max_shard_size),
            progress=not args.no_progress,
            overwrite=args.overwrite,
            device=args.device,
        ),
    )
    print(
        f"merged {result.tensors} tensors ({result.bytes_written / 1e9:.2f} GB) with "
        f"{config.merge_method} into {result.out_dir} in {result.seconds:.1f} s"
    )
    return 0


if __name__ == "__main__":
    run(main)
