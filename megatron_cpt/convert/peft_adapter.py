"""A LoRA run's adapters alone, as a PEFT adapter directory for the HF base model.

``mcore-to-hf`` normally folds the adapters into the weights (one merged model). Users who
keep one base and many adapters want the adapter on its own, in the format ``peft`` loads
(``PeftModel.from_pretrained(base, DIR)``): ``adapter_config.json`` +
``adapter_model.safetensors`` with PEFT's key names for ``LlamaForCausalLM``
(``base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`` ...).

megatron-core fuses some of HF's linears, so its adapters are fused too and are split here:

- ``linear_qkv`` (column-parallel): one ``A [r, hidden]`` shared by q, k and v, and one
  ``B [qkv_rows, r]`` whose rows are grouped per query group exactly like the fused weight's.
  ``B @ A`` restricted to q's rows is ``B_q @ A``, so q_proj/k_proj/v_proj each get ``A`` as
  their ``lora_A`` and their rows of ``B`` (``mapping.split_qkv``, the weight's own splitter)
  as their ``lora_B``: three PEFT adapters whose deltas are exactly the fused delta's blocks.
- ``linear_fc1`` = ``[gate; up]``: ``A`` shared, ``B`` split in halves (``split_gate_up``).
- ``linear_proj`` -> o_proj and ``linear_fc2`` -> down_proj map one to one.

PEFT's scaling is ``lora_alpha / r``, the same rule as ours, so rank and alpha carry over.
Tensors are the checkpoint's global (TP-independent) ones, so any saved TP works.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_cpt.convert import mcore_checkpoint
from megatron_cpt.convert.atomic_directory import AtomicDirectory
from megatron_cpt.convert.layout import tensor_layout
from megatron_cpt.convert.mapping import MC_EMBED, hf_layer_names, split_gate_up, split_qkv
from megatron_cpt.errors import UserError
from megatron_cpt.training.checkpointing import read_metadata

ADAPTER_FILE = "adapter_model.safetensors"
# megatron-core linear -> (its place in the layer, the HF roles its rows split into)
MC_LINEARS = {
    "linear_qkv": ("self_attention", ("q", "k", "v")),
    "linear_proj": ("self_attention", ("o",)),
    "linear_fc1": ("mlp", ("gate", "up")),
    "linear_fc2": ("mlp", ("down",)),
}


@dataclass
class AdapterExportConfig:
    load_dir: str
    out_dir: str
    overwrite: bool = False


def _has_adapter(reader, name: str) -> bool:
    try:
        reader.global_shape(mcore_checkpoint.sharded_key(name)[0])
    except UserError:
        return False
    return True


def export_peft_adapter(cfg: AdapterExportConfig) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` for a LoRA checkpoint."""
    from safetensors.torch import save_file

    output = AtomicDirectory(cfg.out_dir, overwrite=cfg.overwrite)
    meta = read_metadata(Path(cfg.load_dir))
    args = meta.get("args") or {}
    rank = args.get("lora_rank") or 0
    if not rank:
        raise UserError(
            f"--load {cfg.load_dir}: not a LoRA run (no --lora-rank recorded); "
            "--lora-adapter-only needs one"
        )
    alpha = args.get("lora_alpha")
    alpha = float(alpha if alpha is not None else rank)
    arch = meta["arch"]
    if arch.family != "llama":
        raise UserError(f"--lora-adapter-only: PEFT key names are written for Llama, not "
                        f"{arch.family}")  # fmt: skip
    reader = mcore_checkpoint.GlobalTensorReader(Path(meta["path"]))
    lay = tensor_layout(arch, padded_vocab_size=reader.global_shape(MC_EMBED)[0])
    tensors: dict[str, torch.Tensor] = {}
    targets: set[str] = set()
    for i in range(arch.num_layers):
        hf = hf_layer_names(i, arch.family)
        for linear, (block, roles) in MC_LINEARS.items():
            stem = f"decoder.layers.{i}.{block}.{linear}"
            if not _has_adapter(reader, f"{stem}.lora_A"):
                continue
            t = reader.read([f"{stem}.lora_A", f"{stem}.lora_B"])
            a, b = t[f"{stem}.lora_A"], t[f"{stem}.lora_B"]
            if linear == "linear_qkv":
                parts = split_qkv(b, lay)
            elif linear == "linear_fc1":
                parts = split_gate_up(b)
            else:
                parts = (b,)
            for role, b_part in zip(roles, parts):
                module = hf[role][: -len(".weight")]  # model.layers.i.self_attn.q_proj
                targets.add(module.rsplit(".", 1)[1])
                key = f"base_model.model.{module}"
                tensors[f"{key}.lora_A.weight"] = a.contiguous().clone()
                tensors[f"{key}.lora_B.weight"] = b_part.contiguous().clone()
    if not tensors:
        raise UserError(f"--load {cfg.load_dir}: the checkpoint holds no LoRA adapters")
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": int(rank),
        "lora_alpha": alpha,
        "lora_dropout": float(args.get("lora_dropout") or 0.0),
        "target_modules": sorted(targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "inference_mode": True,
        "base_model_name_or_path": None,
    }
    with output as tmp:
        save_file(tensors, str(tmp / ADAPTER_FILE), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return Path(cfg.out_dir)
