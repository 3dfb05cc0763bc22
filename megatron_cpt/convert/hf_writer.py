"""Write an HF model directory: sharded safetensors + index, configs, tokenizer, atomically.

Tensors arrive a group at a time and are flushed to a shard as soon as the shard is full, so the
writer holds at most one shard's worth of tensors. Everything goes into a sibling temp
directory that is renamed onto the target only after the index (the file transformers reads
first) is written: an interrupted export never leaves a directory that looks loadable.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_cpt.errors import UserError

INDEX_NAME = "model.safetensors.index.json"


@dataclass
class ShardWriterConfig:
    max_shard_bytes: int = 2 * 1024**3  # transformers' own save_pretrained default is 5 GB
    dtype: torch.dtype | None = None  # None: keep each tensor's dtype


class SafetensorsShardWriter:
    """Append tensors; they land in numbered shards and an index mapping name -> shard."""

    def __init__(self, out_dir: Path, cfg: ShardWriterConfig | None = None):
        self.out_dir = Path(out_dir)
        self.cfg = cfg or ShardWriterConfig()
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffer_bytes = 0
        self._shards: list[list[str]] = []  # tensor names per written shard
        self._total_bytes = 0

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, tensor in tensors.items():
            if self.cfg.dtype is not None:
                tensor = tensor.to(self.cfg.dtype)
            tensor = tensor.detach().contiguous()
            size = tensor.numel() * tensor.element_size()
            if self._buffer and self._buffer_bytes + size > self.cfg.max_shard_bytes:
                self._flush()
            self._buffer[name] = tensor
            self._buffer_bytes += size
            self._total_bytes += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        if not self._buffer:
            return
        number = len(self._shards)
        save_file(self._buffer, self.out_dir / f"shard-{number:05d}.tmp", metadata={"format": "pt"})
        self._shards.append(list(self._buffer))
        self._buffer, self._buffer_bytes = {}, 0

    def finish(self) -> dict[str, str]:
        """Name the shards ``model-0000k-of-0000n.safetensors`` and write the index."""
        self._flush()
        n = len(self._shards)
        weight_map: dict[str, str] = {}
        for k, names in enumerate(self._shards):
            final = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.out_dir / f"shard-{k:05d}.tmp", self.out_dir / final)
            weight_map.update({name: final for name in names})
        index = {
            "metadata": {"total_size": self._total_bytes},
            "weight_map": dict(sorted(weight_map.items())),
        }
        (self.out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        return weight_map


class AtomicDirectory:
    """A temp directory beside ``target`` that replaces it on success and vanishes on failure."""

    def __init__(self, target: str | os.PathLike, overwrite: bool = False):
        self.target = Path(target)
        if self.target.exists() and not overwrite and any(self.target.iterdir()):
            raise UserError(f"--out {self.target}: exists and is not empty (pass --overwrite)")
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.path: Path | None = None

    def __enter__(self) -> Path:
        self.path = Path(
            tempfile.mkdtemp(prefix=f".{self.target.name}.tmp-", dir=self.target.parent)
        )
        return self.path

    def __exit__(self, exc_type, exc, tb):
        assert self.path is not None
        if exc_type is not None:
            shutil.rmtree(self.path, ignore_errors=True)
            return False
        os.chmod(self.path, 0o755)  # mkdtemp's 0700 would make the export private
        for file in self.path.rglob("*"):
            if file.is_file():
                os.chmod(file, 0o644)
        if self.target.exists():
            shutil.rmtree(self.target)
        os.replace(self.path, self.target)
        return False
