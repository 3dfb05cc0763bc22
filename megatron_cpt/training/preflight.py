"""Checks run before the model is built: what would otherwise fail minutes or hours in.

``build_settings`` checks each flag on its own; these checks look at the world the flags point
to: output directories that must be writable (a ``--save`` that fails at the first checkpoint
loses every iteration before it), and shards whose token ids must fit the model's vocabulary (an
out-of-range id is an ``IndexError`` in the embedding at the first forward pass, or on a GPU a
device-side assert).
"""

from __future__ import annotations

import numpy as np

from megatron_cpt.data.indexed import validate_pair
from megatron_cpt.data.shards import max_token_id
from megatron_cpt.errors import UserError
from megatron_cpt.output_paths import check_output_dir
from megatron_cpt.training.data import parse_blend, parse_named


def check_outputs(ckpt, log) -> None:
    """``--save``, ``--run-dir`` and ``--tensorboard-dir`` must be (creatable) writable dirs."""
    for flag, path in (("--save", ckpt.save), ("--run-dir", log.run_dir),
                       ("--tensorboard-dir", log.tensorboard_dir)):  # fmt: skip
        if path:
            check_output_dir(path, flag)


def check_token_ids(data, vocab_size: int) -> None:
    """Every training/validation shard's largest token id must be below ``vocab_size``.

    A shard whose dtype cannot hold an id that large needs no scan; otherwise the ``.bin`` is
    read once, sequentially, in 16M-token slices of a read-only memory map.
    """
    prefixes, _ = parse_blend(data.data_path)
    named = parse_named(data.valid_data_path)
    for flag, prefix in [*(("--data-path", p) for p in prefixes),
                         *(("--valid-data-path", p) for p in named.values())]:  # fmt: skip
        index = validate_pair(prefix)
        if np.iinfo(index.dtype).max < vocab_size:
            continue
        largest = max_token_id(index)
        if largest >= vocab_size:
            raise UserError(
                f"{flag} {prefix}: token id {largest} >= the model's vocab_size {vocab_size}; "
                "the shard was made with a different tokenizer"
            )


def preflight(settings: dict) -> None:
    check_outputs(settings["ckpt"], settings["log"])
    check_token_ids(settings["data"], settings["arch"].vocab_size)
