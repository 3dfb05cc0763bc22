"""The converter's view of a megatron-core checkpoint directory.

The layout and metadata are the trainer's (:mod:`megatron_cpt.training.checkpointing`):
``DIR/iter_0000000/`` with the ``torch_dist`` files and ``megatron_cpt.json`` (HF config,
padded vocabulary), ``DIR/latest_checkpointed_iteration.txt``. The converter adds ``DIR/hf/``
(the source config.json, generation config and tokenizer) so that an export is a complete HF
directory and evaluation finds the right tokenizer.

Export reads one group (one layer) of *global* tensors at a time straight from the torch_dist
files through torch DCP, whose resharding helper finds the saved chunks (any TP/PP) that
overlap the requested region: no model is built and no more than one layer is held. Sharded
keys stack layers on a leading axis, so layer ``i`` of ``decoder.layers.3.mlp.linear_fc2``
is row ``i`` of the global ``decoder.layers.mlp.linear_fc2.weight``.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from megatron_cpt.errors import UserError

HF_SIDE_DIR = "hf"


_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.*)$")
# Plain state-dict names of the local spec -> the (TE-style) names megatron-core checkpoints use.
_SHARDED_ALIAS = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
}


def sharded_key(name: str) -> tuple[str, int | None]:
    """``decoder.layers.3.mlp.linear_fc2.weight`` -> (``decoder.layers.mlp.linear_fc2.weight``, 3)."""
    m = _LAYER.match(name)
    if not m:
        return name, None
    rest = _SHARDED_ALIAS.get(m.group(2), m.group(2))
    return f"decoder.layers.{rest}", int(m.group(1))


class GlobalTensorReader:
    """Reads global tensors of one iteration directory, a group at a time."""

    def __init__(self, iter_dir: Path):
        from megatron_cpt.training.checkpoint_integrity import verify_checkpoint

        self.iter_dir = Path(iter_dir)
        self._meta = verify_checkpoint(self.iter_dir).state_dict_metadata

    def global_shape(self, key: str) -> tuple[int, ...]:
        if key not in self._meta:
            raise UserError(f"{self.iter_dir}: tensor {key} is not in the checkpoint")
        return tuple(self._meta[key].size)

    def dtype(self, name: str) -> torch.dtype:
        key, _ = sharded_key(name)
        self.global_shape(key)
        return self._meta[key].properties.dtype

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Global tensors for plain state-dict ``names`` (one layer's slice of stacked keys)."""
        import torch.distributed.checkpoint as dcp

        regions = {}
        out = {}
        for name in names:
            key, layer = sharded_key(name)
            shape = self.global_shape(key)
            dtype = self._meta[key].properties.dtype
            if layer is None:
                buf = torch.empty(shape, dtype=dtype)
                offsets = (0,) * len(shape)
                out[name] = buf
            else:
                if layer >= shape[0]:
                    raise UserError(
                        f"{self.iter_dir}: {key} has {shape[0]} layers, not {layer + 1}"
                    )
                buf = torch.empty((1, *shape[1:]), dtype=dtype)
                offsets = (layer,) + (0,) * (len(shape) - 1)
                out[name] = buf[0]
            regions[(key, offsets)] = buf
        dcp.load(
            {},
            storage_reader=dcp.FileSystemReader(str(self.iter_dir)),
            planner=_RegionLoadPlanner(regions),
            no_dist=True,
        )
        return out


class _RegionLoadPlanner(LoadPlanner):
    """A torch DCP load planner that fills caller-owned buffers with rectangular regions of
    global checkpoint tensors (e.g. layer ``i`` of a layer-stacked key). DCP's resharding
    helper computes which saved chunks overlap each region, so any saved TP/PP works.

    megatron-core's own ``dist_checkpointing.load`` cannot do this in a one-process world: it
    declares the regions it does not request as owned by "another rank", which is itself.
    """

    def __init__(self, regions: dict[tuple[str, tuple[int, ...]], torch.Tensor]):
        self.regions = regions

    def set_up_planner(self, state_dict, metadata=None, is_coordinator=False):
        self.metadata = metadata

    def create_local_plan(self):
        items = []
        for (key, offsets), buf in self.regions.items():
            chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(buf.shape))
            items += create_read_items_for_chunk_list(
                key, self.metadata.state_dict_metadata[key], [chunk]
            )
        return LoadPlan(items)

    def create_global_plan(self, global_plan):
        return global_plan

    def finish_plan(self, central_plan):
        return central_plan

    def load_bytes(self, read_item, value):
        raise RuntimeError(f"unexpected non-tensor item {read_item.dest_index.fqn}")

    def resolve_tensor(self, read_item):
        idx = read_item.dest_index
        buf = self.regions[(idx.fqn, tuple(idx.offset))]
        for dim, (start, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            buf = buf.narrow(dim, start, length)
        return buf

    def commit_tensor(self, read_item, tensor):
        pass
