"""megatron-core distributed checkpoint (any TP/PP) -> HF directory loadable by transformers.

Reads one group (embedding, one layer, head) of global tensors at a time straight from the
``torch_dist`` files, maps it, and appends each tensor to its planned shard file (every output
name, shape and dtype is known up front, so shard headers are written first): no model is built
and peak memory is one group, whatever the model size, the shard size or the saved TP/PP.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_cpt.convert import mcore_checkpoint
from megatron_cpt.convert.atomic_directory import AtomicDirectory
from megatron_cpt.convert.layout import tensor_layout
from megatron_cpt.convert.mapping import (
    MC_EMBED,
    expected_hf_shapes,
    hf_group_names,
    mcore_group_names,
    mcore_to_hf_group,
)
from megatron_cpt.errors import UserError
from megatron_cpt.model import from_hf_config
from megatron_cpt.model.lora import adapter_scale, merged_weight
from megatron_cpt.safetensors_io import StreamingSafetensorsWriter, TensorInfo
from megatron_cpt.training.checkpointing import read_metadata

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ExportConfig:
    load_dir: str
    out_dir: str
    tokenizer_from: str | None = None  # HF dir or .gguf; default: the one saved at import
    dtype: str | None = None  # None: as stored in the checkpoint
    max_shard_bytes: int = 2 * 1024**3
    overwrite: bool = False


def export_hf(cfg: ExportConfig) -> Path:
    if cfg.max_shard_bytes < 1:
        raise UserError("--max-shard-size-gb: must be greater than 0")
    output = AtomicDirectory(cfg.out_dir, overwrite=cfg.overwrite)  # refuses a non-empty --out now
    load = Path(cfg.load_dir)
    meta = read_metadata(load)
    arch = meta["arch"]
    unmappable = arch.megatron_only_fields()
    if unmappable:
        raise UserError(
            f"--load {cfg.load_dir}: architecture field {unmappable[0]} has no HF Llama "
            f"equivalent (also: {', '.join(unmappable[1:]) or 'none'}); only Llama-shaped models "
            "(RMSNorm, SwiGLU, RoPE, no biases) convert to HF"
        )
    reader = mcore_checkpoint.GlobalTensorReader(Path(meta["path"]))
    lora_scale = adapter_scale(meta)  # a LoRA run's adapters are merged into the weights
    lay = tensor_layout(arch, padded_vocab_size=reader.global_shape(MC_EMBED)[0])
    if cfg.dtype is not None and cfg.dtype not in _DTYPES:
        raise UserError(f"--dtype {cfg.dtype}: choose one of {', '.join(_DTYPES)}")
    # Default: the embedding's stored dtype. Norm weights can be stored wider than the rest
    # (megatron-core's local RMSNorm keeps fp32 weights in a bf16 model); they were widened
    # losslessly on import, so casting back is exact.
    dtype = _DTYPES[cfg.dtype] if cfg.dtype else reader.dtype(MC_EMBED)
    side = _side_dir(load, meta)
    tokenizer = _load_tokenizer(cfg.tokenizer_from, side / "tokenizer")

    with output as tmp:
        shapes = expected_hf_shapes(lay)
        groups = list(zip(mcore_group_names(lay), hf_group_names(lay)))
        plan = [TensorInfo(n, dtype, shapes[n]) for _, hf_names in groups for n in hf_names]
        writer = StreamingSafetensorsWriter(tmp, plan, cfg.max_shard_bytes)
        for mc_names, hf_names in groups:
            group = {
                n: merged_weight(n, t, reader, lora_scale) for n, t in reader.read(mc_names).items()
            }
            hf = mcore_to_hf_group(mc_names, group.__getitem__, lay)
            del group
            for name in hf_names:
                writer.write(name, hf.pop(name).to(dtype))
        writer.close()
        hf_config = _hf_config(arch, side / "config.json", dtype)
        hf_config.save_pretrained(tmp)
        _generation_config(hf_config, side / "generation_config.json").save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(cfg.out_dir)


def _side_dir(load: Path, meta: dict) -> Path:
    """The converter's ``hf/`` files: beside this checkpoint, or beside the converted checkpoint
    a CPT run started from (the trainer records ``pretrained_checkpoint`` in its args)."""
    candidates = [load / mcore_checkpoint.HF_SIDE_DIR]
    for key in ("pretrained_checkpoint", "converted_from_mcore"):
        value = (meta.get("args") or {}).get(key)
        if isinstance(value, str) and value:
            candidates.append(Path(value) / mcore_checkpoint.HF_SIDE_DIR)
    return next((c for c in candidates if c.is_dir()), candidates[0])


def _hf_config(arch, side_config: Path, dtype: torch.dtype):
    """The source checkpoint's own config when it still describes the weights (always, for a
    converted-then-trained model): keeps every field users rely on (token ids, rope spelling).
    Read with the family's transformers config class (``LlamaConfig``, ``Qwen2Config``, ...)."""
    from transformers import CONFIG_MAPPING

    config_class = CONFIG_MAPPING[arch.family]
    if side_config.exists():
        source = json.loads(side_config.read_text())
        if from_hf_config(source) == arch:
            config = config_class.from_dict(source)
            config.dtype = dtype
            return config
    config = config_class.from_dict(arch.to_hf_config())
    config.dtype = dtype
    return config


def _generation_config(hf_config, side: Path):
    from transformers import GenerationConfig

    if side.exists():
        return GenerationConfig.from_pretrained(side.parent)
    return GenerationConfig.from_model_config(hf_config)


def _load_tokenizer(source: str | None, saved: Path):
    from transformers import AutoTokenizer

    if source is None:
        if not saved.exists():
            return None
        return AutoTokenizer.from_pretrained(saved)
    path = Path(source)
    try:
        if path.suffix == ".gguf":
            return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        return AutoTokenizer.from_pretrained(path)
    except Exception as exc:
        raise UserError(f"--tokenizer-from {source}: cannot load a tokenizer ({exc})") from None
