"""Context parallelism: each rank of a CP group holds a slice of every sequence.

megatron-core splits the *attention* across the CP group (Transformer Engine's ring attention);
everything else about CP is the training loop's job, and getting it wrong gives a silently
wrong loss (issue 14, Found 2):

- every batch must be cut per CP rank before the forward, with megatron-core's
  ``get_batch_on_this_cp_rank``. It cuts the sequence into ``2 * CP`` chunks and gives rank
  ``r`` chunks ``r`` and ``2 * CP - 1 - r``, which balances the causal-attention work; hence
  ``seq_length % (2 * CP) == 0``;
- a rank's loss sum and token count cover only its chunks, so both are summed over the
  data-parallel *and* context-parallel ranks (``get_data_parallel_group(with_context_parallel=
  True)``), never over data-parallel alone.

The local (non-TE) attention cannot attend across ranks, so CP > 1 without TE is refused before
any compute. The split and the reduction are plain tensor code and are tested on CPU (gloo).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_cpt.errors import UserError

BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids", "attention_mask")


def validate(context_parallel: int, seq_length: int, have_te: bool) -> None:
    """One-line refusals, before any process group or model is built."""
    if context_parallel <= 1:
        return
    if not have_te:
        raise UserError(
            f"--context-parallel-size {context_parallel} needs Transformer Engine's attention "
            "(ring attention across ranks); it does not import here, and the local attention "
            "cannot attend across ranks"
        )
    if seq_length % (2 * context_parallel):
        raise UserError(
            f"--seq-length {seq_length} must be divisible by 2 x --context-parallel-size = "
            f"{2 * context_parallel} (each rank gets two of 2*CP load-balanced chunks)"
        )


def split_batch(batch: dict, cp_group=None) -> dict:
    """This CP rank's part of a batch (all ``[b, s]`` tensors; a ``[b, 1, s, s]`` mask keeps its
    key dimension). Identity when CP == 1. ``cp_group`` defaults to megatron-core's CP group."""
    from megatron.core.utils import get_batch_on_this_cp_rank

    sub = {k: batch[k] for k in BATCH_KEYS if k in batch}
    return get_batch_on_this_cp_rank(sub, cp_group=cp_group)


def loss_group():
    """The group a loss sum and its token count are reduced over: data x context parallel."""
    from megatron.core import parallel_state as ps

    return ps.get_data_parallel_group(with_context_parallel=True)


def reduce_loss_sum_and_tokens(total: torch.Tensor, group=None) -> torch.Tensor:
    """Sum ``[loss_sum, num_tokens]`` over the DP x CP group in place (no-op for one rank)."""
    group = group if group is not None else loss_group()
    if dist.get_world_size(group) > 1:
        dist.all_reduce(total, group=group)
    return total
