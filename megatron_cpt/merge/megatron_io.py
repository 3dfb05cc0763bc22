"""Megatron-core (torch_dist) checkpoints as merge inputs and outputs, without exporting to HF.

A 70B CPT run should not need an HF export before it can be merged back into the instruct
model. Reading goes through the converter's ``GlobalTensorReader``, which fetches one layer of
*global* tensors from a checkpoint saved at any TP/PP, and its mapping, which splits the fused
``linear_qkv`` / ``linear_fc1`` back into q/k/v and gate/up and drops the vocabulary padding.

Why merge in that (HF-named) view rather than on the fused Megatron tensors or on TP shards:
TIES trims each tensor to its top-``density`` magnitudes and SLERP measures the angle of each
whole tensor, so the result depends on where tensor boundaries are. On the fused QKV or on a TP
shard the top-k set differs from the per-projection top-k an HF merge uses; in this view the
Megatron merge is, by construction, the merge of the HF exports (the tests check bit-equality
after export), and a TP=2 CPT checkpoint can even be merged with a TP=1 instruct checkpoint.
The values seen are exactly what ``export_hf`` writes: tensors cast to the embedding's stored
dtype (norms that megatron-core keeps in fp32 were widened losslessly and come back exactly).

The output is a megatron-core checkpoint at the base checkpoint's padded vocabulary (so it loads
at the base's TP/PP, or any other), written by the trainer's ``save_checkpoint``. Vocabulary
padding rows are written as zeros, as the importer does: no real token uses them and an export
drops them. Both sides stream: inputs are read a layer at a time, and the output is written by
the converter's streaming save (``convert/streaming_save.py``), which asks for each merged tensor
just before writing it, in layer order, so no model copy is held.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from megatron_cpt.errors import UserError
from megatron_cpt.safetensors_io import TOKENIZER_FILES, TensorInfo

SIDE_DIR = "hf"  # the converter's HF config/tokenizer directory inside a Megatron checkpoint


def is_megatron_checkpoint(path: Path) -> bool:
    from megatron_cpt.training.checkpointing import METADATA_FILE, TRACKER_FILE

    path = Path(path)
    return (path / TRACKER_FILE).exists() or (path / METADATA_FILE).exists()


class MegatronCheckpoint:
    """HF-named, unpadded, unfused view of a Megatron checkpoint, read one layer at a time."""

    def __init__(self, path: str | Path):
        from megatron_cpt.convert.layout import tensor_layout
        from megatron_cpt.convert.mapping import (
            MC_EMBED,
            expected_hf_shapes,
            hf_group_names,
            mcore_group_names,
        )
        from megatron_cpt.convert.mcore_checkpoint import GlobalTensorReader
        from megatron_cpt.training.checkpointing import read_metadata

        self.path = Path(path)
        self.meta = read_metadata(self.path)
        self.arch = self.meta["arch"]
        self.reader = GlobalTensorReader(Path(self.meta["path"]))
        self.layout = tensor_layout(
            self.arch, padded_vocab_size=self.reader.global_shape(MC_EMBED)[0]
        )
        self.dtype = self.reader.dtype(MC_EMBED)  # what export_hf writes by default
        self.config = dict(self.meta["hf_config"])
        self._shapes = expected_hf_shapes(self.layout)
        self._groups = list(zip(mcore_group_names(self.layout), hf_group_names(self.layout)))
        self._group_of = {n: i for i, (_, hf) in enumerate(self._groups) for n in hf}
        self._cached: tuple[int, dict[str, torch.Tensor]] | None = None

    @property
    def names(self) -> list[str]:
        return [n for _, hf in self._groups for n in hf]

    def info(self, name: str) -> TensorInfo:
        return TensorInfo(name, self.dtype, tuple(self._shapes[name]))

    def get(self, name: str) -> torch.Tensor:
        from megatron_cpt.convert.mapping import mcore_to_hf_group

        index = self._group_of[name]
        if self._cached is None or self._cached[0] != index:
            self._cached = None  # drop the previous layer before reading the next
            mc_names, _ = self._groups[index]
            group = self.reader.read(mc_names)
            hf = mcore_to_hf_group(mc_names, group.__getitem__, self.layout)
            self._cached = (index, {n: t.to(self.dtype) for n, t in hf.items()})
        return self._cached[1][name]

    def side_dir(self) -> Path | None:
        """The converter's ``hf/`` files (config, tokenizer): here or at the run's start point."""
        candidates = [self.path / SIDE_DIR]
        for key in ("pretrained_checkpoint", "converted_from_mcore"):
            value = (self.meta.get("args") or {}).get(key)
            if isinstance(value, str) and value:
                candidates.append(Path(value) / SIDE_DIR)
        return next((c for c in candidates if c.is_dir()), None)

    def tokenizer_dir(self) -> Path | None:
        side = self.side_dir()
        return side / "tokenizer" if side is not None else None


class MegatronWriter:
    """Writes a merged megatron-core checkpoint (TP=1 global view) with the trainer's checkpoint
    format, pulling each merged tensor when the streaming save is about to write it.

    The model is built on the meta device only for its ``sharded_state_dict``; the save asks
    ``merged(hf_name)`` for the HF tensors each Megatron tensor is made of, a layer group at a
    time (so the inputs' layer caches are read once), and drops them after writing.
    """

    def __init__(self, base: MegatronCheckpoint, out_dtype: torch.dtype, merged_from: dict):
        from megatron_cpt import platform
        from megatron_cpt.model import ModelBuildConfig, build_model, build_transformer_config

        self.base = base
        self.layout = base.layout
        self.merged_from = merged_from
        platform.initialize_model_parallel(1, 1)
        build = ModelBuildConfig(use_transformer_engine=False)
        tconfig = build_transformer_config(
            base.arch,
            build,
            params_dtype=out_dtype,
            pipeline_dtype=out_dtype,
            bf16=out_dtype == torch.bfloat16,
            fp16=out_dtype == torch.float16,
            perform_initialization=False,
            use_cpu_initialization=True,  # meta parameters need no device
        )
        self.model = build_model(
            base.arch,
            tconfig,
            pre_process=True,
            post_process=True,
            build=build,
            vocab_size=self.layout.padded_vocab_size,
            meta=True,
        )

    def finish(
        self,
        tmp: Path,
        tokenizer_source: Path | None,
        merged: Callable[[str], torch.Tensor],
    ) -> None:
        """Save into ``tmp``; ``merged(hf_name)`` is called once per HF tensor."""
        from megatron_cpt.convert.mapping import hf_to_mcore_tensor, mcore_group_order
        from megatron_cpt.convert.streaming_save import streaming_save_strategy
        from megatron_cpt.training.checkpointing import save_checkpoint

        def source(mc_name: str, dtype: torch.dtype) -> torch.Tensor:
            return hf_to_mcore_tensor(mc_name, merged, self.layout)  # the save casts

        strategy = streaming_save_strategy(source, order=mcore_group_order(self.layout))
        meta = self.base.meta
        save_checkpoint(
            tmp,
            0,
            [self.model],
            arch=self.base.arch,
            args={
                "merged_from": self.merged_from,
                "target_tensor_parallel": meta.get("tensor_parallel"),
                "target_pipeline_parallel": meta.get("pipeline_parallel"),
            },
            save_rng=False,
            padded_vocab_size=self.layout.padded_vocab_size,
            sharded_strategy=strategy,
        )
        side = self.base.side_dir()
        if side is not None:
            shutil.copytree(side, tmp / SIDE_DIR)
        if tokenizer_source is not None and Path(tokenizer_source) != self.base.path:
            source = tokenizer_dir(Path(tokenizer_source))
            target = tmp / SIDE_DIR / "tokenizer"
            shutil.rmtree(target, ignore_errors=True)
            target.mkdir(parents=True)
            for name in TOKENIZER_FILES:
                if (source / name).is_file():
                    shutil.copy2(source / name, target / name)


def tokenizer_dir(path: Path) -> Path:
    """Where a checkpoint's tokenizer files are: an HF directory itself, or a Megatron
    checkpoint's ``hf/tokenizer`` (written by the converter)."""
    if is_megatron_checkpoint(path):
        side = MegatronCheckpoint(path).side_dir()
        if side is None or not (side / "tokenizer").is_dir():
            raise UserError(
                f"tokenizer_source {path}: this Megatron checkpoint has no hf/tokenizer"
            )
        return side / "tokenizer"
    return path
