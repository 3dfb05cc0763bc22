"""Which slice of a global megatron tensor one tensor-parallel rank holds.

The converter itself never needs this (``dist_checkpointing`` re-shards from global shapes);
it exists so tests can prove, on a real TP=2 model, that every rank's local parameter equals the
slice the Llama layout rules predict: column-parallel rows (QKV split per query group, fc1 per
[gate; up] half), row-parallel columns, vocabulary rows, replicated norms.
"""

from __future__ import annotations

import torch

from megatron_cpt.errors import UserError

COLUMN_PARALLEL = (
    "linear_qkv.weight",
    "linear_qkv.bias",
    "word_embeddings.weight",
    "output_layer.weight",
)
ROW_PARALLEL = ("linear_proj.weight", "linear_fc2.weight")
GATED_COLUMN_PARALLEL = ("linear_fc1.weight",)


def tp_shard(name: str, tensor: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    """The part of global ``tensor`` (megatron name ``name``) that TP rank ``rank`` owns."""
    if name.endswith(GATED_COLUMN_PARALLEL):
        # Each rank keeps [gate_r; up_r] so SwiGLU's chunk-in-two stays local.
        gate, up = torch.chunk(tensor, 2, dim=0)
        return torch.cat([_chunk(name, gate, 0, tp, rank), _chunk(name, up, 0, tp, rank)], dim=0)
    if name.endswith(COLUMN_PARALLEL):
        return _chunk(name, tensor, 0, tp, rank)
    if name.endswith(ROW_PARALLEL):
        return _chunk(name, tensor, 1, tp, rank)
    return tensor  # norms: replicated


def _chunk(name: str, tensor: torch.Tensor, dim: int, tp: int, rank: int) -> torch.Tensor:
    if tensor.shape[dim] % tp:
        raise UserError(f"{name}: dimension {dim} ({tensor.shape[dim]}) not divisible by TP={tp}")
    return torch.chunk(tensor, tp, dim=dim)[rank]
