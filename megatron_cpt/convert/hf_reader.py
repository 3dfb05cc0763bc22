"""Read HF Llama checkpoints tensor by tensor: safetensors directories (sharded or not) and GGUF.

Safetensors files are memory-mapped by ``safe_open`` and each tensor is copied out only when
the converter asks for it, so a multi-shard 70B directory never sits in memory at once. GGUF is
a whole-file quantized format that transformers dequantizes in one pass; it is only used for
small embedded models (SmolLM2-135M), so it is read fully (documented in docs/conversion.md).
Pickled checkpoints (``pytorch_model.bin``) are refused: loading them runs arbitrary code.
"""

from __future__ import annotations

import json
import os
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch

from megatron_cpt.errors import UserError

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
_SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


@dataclass
class HFCheckpoint:
    """An opened HF checkpoint: its config, tensor names, and lazy access to each tensor."""

    path: Path
    config: object  # transformers.PretrainedConfig
    weight_map: dict[str, str] = field(default_factory=dict)  # name -> shard file (safetensors)
    _tensors: dict[str, torch.Tensor] | None = None  # fully loaded (GGUF)
    _stack: ExitStack = field(default_factory=ExitStack)
    _handles: dict[str, object] = field(default_factory=dict)
    tokenizer_source: tuple[str, dict] | None = None  # (path, from_pretrained kwargs)

    def names(self) -> set[str]:
        return set(self._tensors) if self._tensors is not None else set(self.weight_map)

    def get(self, name: str) -> torch.Tensor:
        if self._tensors is not None:
            if name not in self._tensors:
                raise UserError(f"{self.path}: tensor {name} is missing")
            return self._tensors[name]
        shard = self.weight_map.get(name)
        if shard is None:
            raise UserError(f"{self.path}: tensor {name} is missing")
        return self._handle(shard).get_tensor(name)

    def shape(self, name: str) -> tuple[int, ...]:
        if self._tensors is not None:
            return tuple(self._tensors[name].shape)
        return tuple(self._handle(self.weight_map[name]).get_slice(name).get_shape())

    def dtype_name(self) -> str:
        """Storage dtype of the embedding: what the export should write back by default."""
        if self._tensors is not None:
            return str(next(iter(self._tensors.values())).dtype).removeprefix("torch.")
        name = next(iter(self.weight_map))
        code = self._handle(self.weight_map[name]).get_slice(name).get_dtype()
        return _SAFETENSORS_DTYPES.get(code, code)

    def _handle(self, shard: str):
        if shard not in self._handles:
            from safetensors import safe_open

            file = self.path / shard
            if not file.exists():
                raise UserError(f"{self.path / SAFE_INDEX}: shard {shard} does not exist")
            try:
                self._handles[shard] = self._stack.enter_context(safe_open(file, framework="pt"))
            except Exception as exc:  # corrupt header, truncated file
                raise UserError(f"{file}: not a readable safetensors file ({exc})") from None
        return self._handles[shard]

    def release(self) -> None:
        """Unmap the shard files. Pages of a memory-mapped file that were read stay in this
        process's RSS until unmapped, so a converter that never releases ends up "holding" the
        whole source checkpoint; releasing after each group keeps the mapped part to one group.
        Reopening a shard only re-reads its JSON header."""
        self._handles.clear()
        self._stack.close()
        self._stack = ExitStack()

    def close(self) -> None:
        self.release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_hf_checkpoint(path: str | os.PathLike) -> HFCheckpoint:
    """Open a directory of safetensors (+ config.json) or a ``.gguf`` file."""
    path = Path(path)
    if path.suffix == ".gguf":
        return _open_gguf(path)
    if not path.is_dir():
        raise UserError(f"--hf {path}: expected an HF model directory or a .gguf file")
    config = _load_config(path)
    if (path / SAFE_INDEX).exists():
        try:
            index = json.loads((path / SAFE_INDEX).read_text())
            weight_map = dict(index["weight_map"])
        except (ValueError, KeyError, TypeError) as exc:
            raise UserError(f"{path / SAFE_INDEX}: not a safetensors index ({exc})") from None
    elif (path / SAFE_SINGLE).exists():
        from safetensors import safe_open

        try:
            with safe_open(path / SAFE_SINGLE, framework="pt") as f:
                weight_map = {k: SAFE_SINGLE for k in f.keys()}
        except Exception as exc:
            raise UserError(
                f"{path / SAFE_SINGLE}: not a readable safetensors file ({exc})"
            ) from None
    else:
        pickles = sorted(p.name for p in path.glob("*.bin")) + sorted(
            p.name for p in path.glob("*.pt")
        )
        hint = (
            f" (found {pickles[0]}: pickled weights are refused; re-save as safetensors)"
            if pickles
            else ""
        )
        raise UserError(f"{path}: no {SAFE_SINGLE} or {SAFE_INDEX}{hint}")
    return HFCheckpoint(
        path=path, config=config, weight_map=weight_map, tokenizer_source=(str(path), {})
    )


def _load_config(path: Path):
    from transformers import AutoConfig

    if not (path / "config.json").exists():
        raise UserError(f"{path}: config.json is missing")
    try:
        return AutoConfig.from_pretrained(path)
    except Exception as exc:
        raise UserError(f"{path / 'config.json'}: unreadable config ({exc})") from None


def _open_gguf(path: Path) -> HFCheckpoint:
    from transformers import AutoModelForCausalLM

    if not path.exists():
        raise UserError(f"--hf {path}: no such file")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32
        )
    except Exception as exc:
        raise UserError(f"{path}: could not load GGUF through transformers ({exc})") from None
    tensors = {k: v.detach() for k, v in model.state_dict().items()}
    return HFCheckpoint(
        path=path,
        config=model.config,
        _tensors=tensors,
        tokenizer_source=(str(path.parent), {"gguf_file": path.name}),
    )
