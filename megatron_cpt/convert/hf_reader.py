"""Read HF checkpoints (Llama, Mistral, Qwen2, Qwen3) tensor by tensor: safetensors directories (sharded or not) and GGUF.

Each tensor is made only when the converter asks for it, so a multi-shard 70B directory (or an
8B GGUF) never sits in memory at once:

- safetensors: one positioned read per tensor (``megatron_cpt.safetensors_io``, shared with
  merging), nothing memory-mapped;
- GGUF: ``gguf.GGUFReader`` maps the file and ``gguf.dequantize`` turns one tensor into
  float32 (or the dtype asked for), a chunk of rows at a time; each float32 tensor equals, bit
  for bit, what transformers' ``from_pretrained(..., gguf_file=)`` loads (tested on the
  shipped SmolLM2 GGUF).

Every tensor is returned in memory it owns (torch-allocated), so the streaming save can free it
as soon as it is written.

Pickled checkpoints (``pytorch_model.bin``) are refused: loading them runs arbitrary code.
"""

from __future__ import annotations

import mmap
import os
import warnings
from pathlib import Path

import torch

from megatron_cpt.convert.mapping import HF_EMBED
from megatron_cpt.errors import UserError
from megatron_cpt.model.families import FAMILIES, family_of_gguf
from megatron_cpt.safetensors_io import SafetensorsCheckpoint

_DEQUANTIZE_CHUNK_BYTES = 64 * 1024**2


class SafetensorsModel:
    """An HF model directory of safetensors (one file or an index of shards): its transformers
    config and each tensor on request, read by :class:`megatron_cpt.safetensors_io.
    SafetensorsCheckpoint` (the merge's reader: one positioned read into memory the tensor
    owns, so nothing stays mapped and the streaming save can give the memory back)."""

    def __init__(self, path: Path):
        self.path = path
        self.config = _load_config(path)
        self.tokenizer_source = (str(path), {})
        self._files = SafetensorsCheckpoint(path)
        self._names = set(self._files.names)

    def names(self) -> set[str]:
        return set(self._names)

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor as stored, or cast to ``dtype``."""
        if name not in self._names:
            raise UserError(f"{self.path}: tensor {name} is missing")
        tensor = self._files.get(name)
        return tensor if dtype is None else tensor.to(dtype)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._files.info(name).shape

    def dtype_name(self) -> str:
        """Storage dtype of the embedding: what the export should write back by default."""
        names = self._files.names
        name = HF_EMBED if HF_EMBED in names else names[0]
        return str(self._files.info(name).dtype).removeprefix("torch.")

    def close(self) -> None:
        self._files.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class GGUFCheckpoint:
    """A llama/qwen2/qwen3 ``.gguf`` file read a tensor at a time, each dequantized when asked for.

    Only public APIs: the config from ``AutoConfig.from_pretrained(..., gguf_file=)``, GGUF <->
    HF names from the ``gguf`` package's ``get_tensor_name_map`` over the HF names of a
    meta-device model of that config, values from ``gguf.dequantize``. The one step written
    here is undoing llama.cpp's q/k rotary permutation; a test checks every tensor against
    ``from_pretrained(..., gguf_file=)`` bit for bit, so a transformers change that moved
    either side would fail there.
    """

    def __init__(self, path: Path):
        from gguf import MODEL_ARCH_NAMES, GGUFReader, get_tensor_name_map
        from transformers import AutoConfig, AutoModelForCausalLM

        self.path = path
        self.tokenizer_source = (str(path.parent), {"gguf_file": path.name})
        try:
            self._reader = GGUFReader(str(path))
        except Exception as exc:
            raise UserError(f"{path}: not a readable GGUF file ({exc})") from None
        field = self._reader.get_field("general.architecture")
        architecture = bytes(field.parts[field.data[0]]).decode() if field else None
        family = family_of_gguf(architecture)
        if family is None:
            supported = sorted(f.GGUF_ARCH for f in FAMILIES.values() if f.GGUF_ARCH)
            raise UserError(
                f"{path}: general.architecture is {architecture!r}; GGUFs of "
                f"{', '.join(supported)} convert"
            )
        try:
            self.config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
        except Exception as exc:
            raise UserError(f"{path}: not a readable GGUF file ({exc})") from None
        # llama.cpp interleaves q/k rows for llama only (qwen2/qwen3 keep HF's order)
        self._heads = (
            {
                ".attn_q.": self.config.num_attention_heads,
                ".attn_k.": self.config.num_key_value_heads,
            }
            if family.GGUF_ROPE_PERMUTED
            else {}
        )
        gguf_arch = {name: arch for arch, name in MODEL_ARCH_NAMES.items()}[architecture]
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(self.config)
        gguf_names = get_tensor_name_map(gguf_arch, self.config.num_hidden_layers)
        to_hf = {}
        for hf_name in skeleton.state_dict():
            base, _, suffix = hf_name.rpartition(".")
            gguf_base = gguf_names.get_name(base)
            if gguf_base is not None:
                to_hf[f"{gguf_base}.{suffix}"] = hf_name
        self._tensors = {}  # HF name -> gguf ReaderTensor
        for tensor in self._reader.tensors:
            if tensor.name == "rope_freqs.weight":
                # llama.cpp keeps Llama-3.1's RoPE scaling in this tensor, which the GGUF
                # config (and transformers' loader) ignore: the model would silently lose it
                raise UserError(
                    f"{path}: has rope_freqs.weight (Llama-3.1-style RoPE scaling), which the "
                    "GGUF config does not carry; convert from the HF safetensors checkpoint"
                )
            if tensor.name in to_hf:
                self._tensors[to_hf[tensor.name]] = tensor

    def names(self) -> set[str]:
        return set(self._tensors)

    def _tensor(self, name: str):
        if name not in self._tensors:
            raise UserError(f"{self.path}: tensor {name} is missing")
        return self._tensors[name]

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Dequantized to float32 (``from_pretrained``'s values), or straight into ``dtype``
        chunk by chunk (the same values as casting the float32 tensor, without holding it)."""
        from gguf import dequantize

        tensor = self._tensor(name)
        out = torch.empty(self.shape(name), dtype=dtype or torch.float32)
        rows = out.view(-1, out.shape[-1])  # not .numpy(): that would pin the storage's size
        packed = tensor.data.reshape(rows.shape[0], -1)  # one row of blocks per output row
        # a chunk of rows at a time: dequantize's temporaries are a few float32 copies of its
        # input, so a whole 128k-vocab embedding would cost several GiB beyond its own size
        step = max(1, _DEQUANTIZE_CHUNK_BYTES // (4 * rows.shape[1]))
        try:
            for start in range(0, rows.shape[0], step):
                chunk = dequantize(packed[start : start + step], tensor.tensor_type)
                with warnings.catch_warnings():  # F32/F16 chunks view the read-only map;
                    warnings.simplefilter("ignore", UserWarning)  # they are only read
                    rows[start : start + step].copy_(torch.from_numpy(chunk))
                del chunk
                self._drop_read_pages()  # each chunk's pages are read once
        except Exception as exc:  # an unsupported quantization type, a truncated file
            raise UserError(
                f"{self.path}: cannot dequantize {tensor.name} ({tensor.tensor_type.name}: {exc})"
            ) from None
        for marker, n_head in self._heads.items():
            if marker in tensor.name:
                out = _undo_llama_cpp_rope_permute(out, n_head)
        return out

    def shape(self, name: str) -> tuple[int, ...]:
        # GGUF lists dimensions innermost first
        return tuple(int(d) for d in reversed(self._tensor(name).shape.tolist()))

    def dtype_name(self) -> str:
        return "float32"  # what dequantization gives, whatever the file's quantization

    def _drop_read_pages(self) -> None:
        """Drop the file pages read so far from this process's memory (mapped pages that were
        read count in RSS until dropped or unmapped); the mapping stays, so the next read
        faults in only its own pages. Reopening instead would re-parse the whole header
        (seconds, with the vocabulary)."""
        mapping = getattr(self._reader.data, "_mmap", None)
        if mapping is not None and hasattr(mmap, "MADV_DONTNEED"):
            mapping.madvise(mmap.MADV_DONTNEED)

    def close(self) -> None:
        self._tensors.clear()
        self._reader = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _undo_llama_cpp_rope_permute(weights: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's converter reorders each head's q/k rows from HF's rotate-half layout into
    GGML's interleaved pairs; this is the inverse (as transformers' GGUF loader does)."""
    half = weights.shape[0] // n_head // 2
    grouped = weights.reshape(n_head, half, 2, *weights.shape[1:])
    return grouped.transpose(1, 2).contiguous().reshape(weights.shape)


def open_hf_checkpoint(path: str | os.PathLike) -> SafetensorsModel | GGUFCheckpoint:
    """Open a directory of safetensors (+ config.json) or a ``.gguf`` file."""
    path = Path(path)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UserError(f"--hf {path}: no such file")
        return GGUFCheckpoint(path)
    if not path.is_dir():
        raise UserError(f"--hf {path}: expected an HF model directory or a .gguf file")
    return SafetensorsModel(path)


def _load_config(path: Path):
    from transformers import AutoConfig

    if not (path / "config.json").exists():
        raise UserError(f"{path}: config.json is missing")
    try:
        return AutoConfig.from_pretrained(path)
    except Exception as exc:
        raise UserError(f"{path / 'config.json'}: unreadable config ({exc})") from None
