"""HF safetensors checkpoints, read lazily and written as a stream (used by merging, and the
stream writer by the Megatron -> HF export too).

Neither direction uses the ``safetensors`` library's I/O, for one measured reason: memory.
``safe_open`` memory-maps the file, and every page a merge touches stays mapped, so peak RSS grows
with the total input size (merging 2 x 0.44 GB bf16 checkpoints peaked at 1.07 GiB RSS, ~0.3 GiB
of it the interpreter); ``save_file`` needs a whole shard (5 GB by default) in memory. Here a
tensor is read with one positioned ``readinto`` into its own buffer, and outputs are streamed: the
merge knows every output's name, dtype and shape before it starts, so shard headers are written
first and each merged tensor is appended as soon as it exists. Peak memory is a few tensors,
whatever the model size. The layout is the documented safetensors format (8-byte little-endian
header length, JSON header with ``data_offsets``, raw little-endian data); the tests read our
files back with ``safe_open``, and mergekit and transformers load them.
"""

from __future__ import annotations

import ctypes
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

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
# Files that make up an HF tokenizer (whichever the tokenizer type uses).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)
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
            found = (
                sorted(p.name for p in [*self.path.glob("*.bin"), *self.path.glob("*.pt")])
                if self.path.is_dir()
                else []
            )
            hint = (
                f" (found {', '.join(found[:3])}: pickled weights are refused; re-save with "
                "safe_serialization=True)"
                if found
                else ""
            )
            raise UserError(f"{self.path}: no {SINGLE_NAME} or {INDEX_NAME}{hint}")
        self._file_of: dict[str, Path] = {}
        self._info: dict[str, TensorInfo] = {}
        self._start: dict[str, int] = {}
        for file in sorted(set(files.values())) if files else [self.path / SINGLE_NAME]:
            if not file.exists():
                raise UserError(f"{self.path / INDEX_NAME}: shard {file.name} is missing")
            for info, start in read_header(file):
                if files is not None and files.get(info.name) != file:
                    continue
                self._file_of[info.name] = file
                self._info[info.name] = info
                self._start[info.name] = start
        if files is not None:
            missing = sorted(set(files) - set(self._file_of))
            if missing:
                raise UserError(f"{index}: lists {missing[0]} but its shard does not contain it")
        self.config = _read_json(self.path / "config.json")

    @property
    def names(self) -> list[str]:
        return list(self._info)

    def info(self, name: str) -> TensorInfo:
        return self._info[name]

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor into memory it owns (no mapping left behind)."""
        info = self._info[name]
        buffer = torch.empty(info.nbytes, dtype=torch.uint8)
        with open(self._file_of[name], "rb", buffering=0) as fh:
            fh.seek(self._start[name])
            view = _writable_bytes(buffer)
            done = 0
            while done < info.nbytes:
                got = fh.readinto(view[done:])
                if not got:
                    raise UserError(f"{self._file_of[name]}: truncated while reading {name}")
                done += got
        return buffer.view(info.dtype).reshape(info.shape)

    def close(self) -> None:
        pass


def _writable_bytes(buffer: torch.Tensor) -> memoryview:
    """The bytes of a uint8 tensor as a writable buffer for ``readinto``. Not ``.numpy()``:
    torch then marks the storage non-resizable for good, and the converter's streaming save
    needs to free a tensor's storage in place once it is written."""
    if buffer.numel() == 0:
        return memoryview(bytearray())
    return memoryview((ctypes.c_ubyte * buffer.numel()).from_address(buffer.data_ptr())).cast("B")


def read_header(file: Path) -> list[tuple[TensorInfo, int]]:
    """Each tensor's info and absolute data offset, checked against the file size."""
    size = file.stat().st_size
    with open(file, "rb") as fh:
        prefix = fh.read(8)
        length = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        if not 2 <= length <= size - 8:
            raise UserError(f"{file}: not a safetensors file (bad header length)")
        try:
            header = json.loads(fh.read(length))
        except ValueError as exc:
            raise UserError(f"{file}: not a safetensors file ({exc})") from None
    out = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype = SAFETENSORS_DTYPES.get(entry.get("dtype"))
        if dtype is None:
            raise UserError(f"{file}: tensor {name} has unsupported dtype {entry.get('dtype')}")
        info = TensorInfo(name, dtype, tuple(entry["shape"]))
        begin, end = entry["data_offsets"]
        if end - begin != info.nbytes or 8 + length + end > size:
            raise UserError(f"{file}: tensor {name} has inconsistent offsets (truncated file?)")
        out.append((info, 8 + length + begin))
    return out


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
