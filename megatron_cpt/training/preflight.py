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
from megatron_cpt.training.data import parse_blend


def check_outputs(ckpt, log) -> None:
    """``--save``, ``--run-dir`` and ``--tensorboard-dir`` must be (creatable) writable dirs."""
    for flag, path in (("--save", ckpt.save), ("--run-dir", log.run_dir),
                       ("--tensorboard-dir", log.tensorboard_dir)):  # fmt: skip
        if path:
            check_output_dir(path, flag)


def _data_prefixes(data) -> list[tuple[str, str]]:
    """(flag, prefix) for every shard the run will read: train blend, validation and test sets."""
    out: list[tuple[str, str]] = []
    for flag, paths in (("--data-path", data.data_path), ("--train-data-path", data.train_data_path),
                        ("--test-data-path", data.test_data_path)):  # fmt: skip
        if paths:
            out += [(flag, p) for p in parse_blend(paths, flag)[0]]
    for prefixes, _ in data.valid_sets.values():
        out += [("--valid-data-path", p) for p in prefixes]
    return out


def check_token_ids(data, vocab_size: int) -> None:
    """Every shard's largest token id must be below ``vocab_size``.

    A shard whose dtype cannot hold an id that large needs no scan; otherwise the ``.bin`` is
    read once, sequentially, in 16M-token slices of a read-only memory map.
    """
    if data.mock:
        return
    for flag, prefix in _data_prefixes(data):
        index = validate_pair(prefix)
        if np.iinfo(index.dtype).max < vocab_size:
            continue
        largest = max_token_id(index)
        if largest >= vocab_size:
            raise UserError(
                f"{flag} {prefix}: token id {largest} >= the model's vocab_size {vocab_size}; "
                "the shard was made with a different tokenizer"
            )


def preflight(cfg) -> None:
    """Run on a resolved ``TrainConfig`` before any process group or model exists."""
    check_outputs(cfg.checkpoint, cfg.logging)
    check_token_ids(cfg.data, cfg.arch.vocab_size)
