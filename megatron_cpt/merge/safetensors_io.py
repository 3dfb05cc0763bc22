"""HF safetensors checkpoints, read lazily and written as a stream.

Reading uses ``safetensors.safe_open`` (memory-mapped; one tensor materialised at a time).
Writing is the one piece no library offers: ``safetensors.torch.save_file`` needs every tensor of
a shard in memory at once, which would make peak memory grow with the shard size (5 GB by
default). The merge knows every output's name, dtype and shape before it starts, so the shard
headers are written first and each merged tensor is appended as soon as it exists: peak memory
stays at one tensor. The layout is the documented safetensors format (8-byte little-endian header
length, JSON header with ``data_offsets``, raw little-endian data) and the result is checked by
reading it back with ``safe_open`` in the tests.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from megatron_cpt.errors import UserError

SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


class SafetensorsCheckpoint:
    """An HF checkpoint directory (``model.safetensors`` or a sharded index) plus its config."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        index = self.path / INDEX_NAME
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as exc:
                raise UserError(f"{index}: not a safetensors index ({exc})") from None
            files = {name: self.path / file for name, file in weight_map.items()}
        elif (self.path / SINGLE_NAME).exists():
            files = None
        else:
            found = sorted(p.name for p in self.path.glob("*.bin")) if self.path.is_dir() else []
            hint = (
                f" (found {', '.join(found[:3])}: re-save with safe_serialization=True)"
                if found
                else ""
            )
            raise UserError(f"{self.path}: no {SINGLE_NAME} or {INDEX_NAME}{hint}")
        self._handles: dict[Path, object] = {}
        self._file_of: dict[str, Path] = {}
        self._info: dict[str, TensorInfo] = {}
        for file in sorted(set(files.values())) if files else [self.path / SINGLE_NAME]:
            if not file.exists():
                raise UserError(f"{self.path / INDEX_NAME}: shard {file.name} is missing")
            handle = self._open(file)
            for name in handle.keys():
                if files is not None and files.get(name) != file:
                    continue
                piece = handle.get_slice(name)
                dtype = SAFETENSORS_DTYPES.get(piece.get_dtype())
                if dtype is None:
                    raise UserError(
                        f"{file}: tensor {name} has unsupported dtype {piece.get_dtype()}"
                    )
                self._file_of[name] = file
                self._info[name] = TensorInfo(name, dtype, tuple(piece.get_shape()))
        if files is not None:
            missing = sorted(set(files) - set(self._file_of))
            if missing:
                raise UserError(f"{index}: lists {missing[0]} but its shard does not contain it")
        self.config = _read_json(self.path / "config.json")

    def _open(self, file: Path):
        if file not in self._handles:
            try:
                self._handles[file] = safe_open(str(file), framework="pt")
            except Exception as exc:  # safetensors raises its own untyped errors
                raise UserError(f"{file}: not a readable safetensors file ({exc})") from None
        return self._handles[file]

    @property
    def names(self) -> list[str]:
        return list(self._info)

    def info(self, name: str) -> TensorInfo:
        return self._info[name]

    def get(self, name: str) -> torch.Tensor:
        return self._open(self._file_of[name]).get_tensor(name)

    def close(self) -> None:
        self._handles.clear()


def _read_json(path: Path) -> dict | None:
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise UserError(f"{path}: invalid JSON ({exc})") from None


def plan_shards(infos: list[TensorInfo], max_shard_bytes: int) -> list[list[TensorInfo]]:
    """Greedy, order-preserving split; a tensor larger than the limit gets a shard of its own."""
    shards: list[list[TensorInfo]] = [[]]
    size = 0
    for info in infos:
        if shards[-1] and size + info.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(info)
        size += info.nbytes
    return shards


class StreamingSafetensorsWriter:
    """Writes planned tensors, in plan order, straight into their final shard files.

    Files are named as ``save_pretrained`` names them (``model.safetensors`` or
    ``model-0000i-of-0000N.safetensors`` plus the index), so transformers and mergekit load them.
    """

    def __init__(self, out_dir: Path, infos: list[TensorInfo], max_shard_bytes: int):
        self.out_dir = out_dir
        self.shards = plan_shards(infos, max_shard_bytes)
        count = len(self.shards)
        self.files = (
            [SINGLE_NAME]
            if count == 1
            else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        )
        self._order: Iterator[tuple[int, TensorInfo]] = iter(
            (i, info) for i, shard in enumerate(self.shards) for info in shard
        )
        self._current = -1
        self._fh = None

    def _start_shard(self, index: int) -> None:
        if self._fh is not None:
            self._fh.close()
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for info in self.shards[index]:
            header[info.name] = {
                "dtype": _DTYPE_NAMES[info.dtype],
                "shape": list(info.shape),
                "data_offsets": [offset, offset + info.nbytes],
            }
            offset += info.nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # the format aligns data to 8 bytes
        self._fh = open(self.out_dir / self.files[index], "wb")  # noqa: SIM115
        self._fh.write(len(blob).to_bytes(8, "little"))
        self._fh.write(blob)
        self._current = index

    def write(self, name: str, tensor: torch.Tensor) -> None:
        index, info = next(self._order)
        if info.name != name or tuple(tensor.shape) != info.shape or tensor.dtype != info.dtype:
            raise RuntimeError(
                f"write order/plan mismatch: expected {info}, got {name} "
                f"{tuple(tensor.shape)} {tensor.dtype}"
            )
        if index != self._current:
            self._start_shard(index)
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
        self._fh.write(memoryview(data.numpy()))

    def close(self) -> None:
        if next(self._order, None) is not None:
            raise RuntimeError("writer closed before every planned tensor was written")
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if len(self.files) > 1:
            index = {
                "metadata": {"total_size": sum(i.nbytes for s in self.shards for i in s)},
                "weight_map": {
                    info.name: self.files[i]
                    for i, shard in enumerate(self.shards)
                    for info in shard
                },
            }
            (self.out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
