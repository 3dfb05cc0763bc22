"""Write a megatron-core ``torch_dist`` checkpoint whose tensors are made one at a time.

Why this exists: ``dist_checkpointing.save`` with megatron-core's own torch_dist strategy stages
every tensor of the state dict before the first byte is written (its ``FileSystemWriterAsync``
resolves the whole plan up front), so saving needs the whole model in memory. A converter only
reads, maps and writes tensors; it has no reason to hold the model. Here the model is built on
the meta device (shapes and sharding metadata, no memory) and the save goes through the same
megatron-core steps as the trainer's (``dist_checkpointing.save`` → sharded keys → PyTorch
``ShardedTensor``s → ``MCoreSavePlanner``), except that

- torch's ``FileSystemWriter`` with one thread asks the planner for each tensor just before it is
  written and drops it afterwards, and
- the planner makes that tensor on request from a ``source`` (e.g. the HF safetensors mapped into
  megatron's layout) instead of reading it from the model.

Peak memory is therefore one megatron tensor plus what it is made of (for a Llama: the padded
embedding), not the model; the writer's own habit of keeping written tensors is defeated by
emptying each one's storage once it is on disk (``_free_written``). The files are the usual
torch_dist checkpoint (``metadata.json``, ``common.pt``, ``.metadata``, ``__0_0.distcp``) and
load through ``dist_checkpointing.load`` at any TP/PP, like a trainer checkpoint.

Which part of which parameter a write item is: megatron-core describes every shard by a *view*
of the parameter (a layer's slice of a stacked key, the gate or up half of ``linear_fc1`` for
SwiGLU re-sharding, ...). On the meta device a view still has its shape, strides and storage
offset, so the same view is re-applied to the real tensor: nothing about megatron's sharding
rules is repeated here.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from pathlib import Path

import torch

# (state-dict name, the parameter's dtype) -> the full (TP=1) tensor; a source that can make
# the tensor straight in that dtype saves holding a wider copy next to the cast
Source = Callable[[str, torch.dtype], torch.Tensor]


def streaming_save_strategy(source: Source, order: Callable[[str], int] | None = None):
    """A ``dist_checkpointing`` save strategy (torch_dist format, version 1) for one process
    that writes ``source(name, dtype)`` for every parameter ``name`` of a meta-device model.

    ``source(name, dtype)`` is called once per parameter (the result is kept for the
    parameter's other shards, e.g. the up half of ``linear_fc1`` after the gate half) and must
    return the parameter's full global tensor; it is cast to the parameter's dtype if it is
    not in it already. The save takes ownership: once written, the tensor's memory is freed
    in place (``_free_written``), so a source must not hand out a tensor it keeps using.

    ``order(name)`` ranks parameters for the source's sake: megatron-core groups the plan by
    sharded key (every layer's ``linear_qkv``, then every layer's ``linear_proj``, ...), while
    a source that reads or computes a layer at a time wants all of layer 0 first. Items are
    written in ``(order(name), name)`` order; the files' contents do not depend on it.
    """
    return _strategy_class()(source, order)


@functools.cache
def _strategy_class():
    """Defined on first use, so that importing this module does not import megatron-core."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from megatron.core.dist_checkpointing.strategies.torch import (
        MCoreSavePlanner,
        TorchDistSaveShardedStrategy,
        _replace_state_dict_keys_with_sharded_keys,
        flatten_state_dict,
        mcore_to_pyt_state_dict,
    )
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint import save as dcp_save
    from torch.distributed.checkpoint.planner import WriteItemType

    class _Planner(MCoreSavePlanner):
        def __init__(self, views: dict, source: Source, order):
            super().__init__(dedup_replicated_tensors=False, flatten_state_dict=False)
            self._views = views
            self._source = source
            self._order = order
            self._last: tuple[str, torch.Tensor] | None = None

        def finish_plan(self, new_plan):
            plan = super().finish_plan(new_plan)
            if self._order is None:
                return plan

            def rank(item):
                if item.type == WriteItemType.BYTE_IO:
                    return (-1, "")
                name = self._views[(item.index.fqn, tuple(item.index.offset))][0]
                return (self._order(name), name)

            return dataclasses.replace(plan, items=sorted(plan.items, key=rank))

        def resolve_data(self, write_item):
            if write_item.type == WriteItemType.BYTE_IO:
                return super().resolve_data(write_item)
            index = write_item.index
            name, view = self._views[(index.fqn, tuple(index.offset))]
            if self._last is None or self._last[0] != name:
                if self._last is not None:
                    _free_written(self._last[1])
                self._last = None
                full = self._source(name, view.dtype).to(view.dtype).contiguous()
                if full.numel() != view.untyped_storage().nbytes() // view.element_size():
                    raise RuntimeError(
                        f"{name}: source gave {tuple(full.shape)}, which does not fill the "
                        f"parameter's {view.untyped_storage().nbytes() // view.element_size()} "
                        "elements"
                    )
                self._last = (name, full)
            full = self._last[1]
            part = full.as_strided(view.shape, view.stride(), view.storage_offset())
            return part.reshape(write_item.tensor_data.chunk.sizes)

    class _Strategy(TorchDistSaveShardedStrategy):
        def __init__(self, source: Source, order):
            super().__init__("torch_dist", 1, thread_count=1)
            self._source = source
            self._order = order

        def save(self, sharded_state_dict, checkpoint_dir: Path) -> None:
            if torch.distributed.get_world_size() != 1:
                raise RuntimeError("the streaming save is for one process (a converter)")
            views = {}
            flat, _ = flatten_state_dict(sharded_state_dict)
            for path, sh in flat.items():
                if isinstance(sh, ShardedTensor):
                    if sh.data.device.type != "meta" or sh.flattened_range is not None:
                        raise RuntimeError(f"{path}: streaming save needs unflattened meta views")
                    views[(sh.key, tuple(sh.global_offset))] = (_param_name(path), sh.data)
            by_key, _, _ = _replace_state_dict_keys_with_sharded_keys(
                sharded_state_dict, keep_only_main_replica=True
            )
            pyt_state_dict = mcore_to_pyt_state_dict(by_key, False)
            dcp_save(
                pyt_state_dict,
                # no copy-ahead: torch then uses its serial loader (also where CUDA exists),
                # which asks for a tensor only once the previous one is written (_free_written)
                storage_writer=FileSystemWriter(
                    str(checkpoint_dir),
                    single_file_per_rank=True,
                    thread_count=1,
                    per_thread_copy_ahead=0,
                ),
                planner=_Planner(views, self._source, self._order),
            )

        def async_save(self, sharded_state_dict, checkpoint_dir):
            raise NotImplementedError("the streaming save is synchronous")

    return _Strategy


def _free_written(tensor: torch.Tensor) -> None:
    """Give back the memory of a tensor that has been written.

    torch's ``FileSystemWriter`` keeps every tensor it wrote to a file in a dict keyed by
    sharded key until the file is closed (the dict is only read for its safetensors format).
    For a converter that writes one file, that held the embedding and one layer's worth of
    every kind of tensor for the whole save (1B model, float32: ~1 GiB held while the layers
    were written), whatever the streaming. The serial loader asks for the next tensor only after writing the previous
    one, so when the planner is asked for a new parameter the previous one is on disk and its
    storage can be emptied; the writer's leftover references then hold nothing."""
    storage = tensor.untyped_storage()
    whole = tensor.storage_offset() == 0 and storage.nbytes() == tensor.nbytes
    if whole and storage.resizable():  # never a view into memory something else may still use
        storage.resize_(0)


def _param_name(flat_path: str) -> str:
    """``model.decoder.layers.0.mlp.linear_fc1.weight.1`` → ``decoder.layers.0.mlp.linear_fc1
    .weight``: the model's state-dict name, from the path ``dist_checkpointing`` flattened (the
    top-level ``model`` entry, and a list index where a factory made several shards)."""
    parts = flat_path.split(".")
    if parts and parts[0].startswith("model"):
        parts = parts[1:]
    while parts and parts[-1].isdigit():
        parts.pop()
    return ".".join(parts)
