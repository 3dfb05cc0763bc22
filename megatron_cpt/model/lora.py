"""LoRA adapters on megatron-core's tensor-parallel linears, with TP-correct sharding.

``y = W x + (alpha / r) * B A x`` with ``A: [r, in]`` and ``B: [out, r]``; B starts at zero so
the adapted model starts equal to the base. Sharding follows the base layer's so that no
adapter ever needs a gathered weight:

- **ColumnParallelLinear** (``linear_qkv``, ``linear_fc1``): the input is replicated and the
  output is split over TP ranks. ``A`` is replicated (every rank computes the same ``A x``) and
  ``B`` is split along its output rows like ``W``. In the backward pass ``A x``'s gradient is
  the sum of every rank's ``B_shardᵀ g_shard``, so ``A x`` goes through megatron-core's
  ``copy_to_tensor_model_parallel_region`` (identity forward, all-reduce backward): ``A``'s
  gradient is then complete and identical on every rank.
- **RowParallelLinear** (``linear_proj``, ``linear_fc2``): the input is split along its
  features and the output is all-reduced. ``A`` is split along its input columns like ``W``;
  the partial products ``A_shard x_shard`` are summed with
  ``reduce_from_tensor_model_parallel_region`` (all-reduce forward, identity backward) and
  ``B`` is replicated.

Either way each rank's merged shard is ``W_shard + scale * B_local @ A_local`` (for a column
layer ``B_local`` is the shard and ``A`` whole; for a row layer the reverse), which is exactly
the shard of the merged full weight, so merging needs no communication and the existing
exporter writes a merged HF model.

The adapter parameters are attributes of the base linear itself (``lora_A`` / ``lora_B``) and
the delta is added by a forward hook, so the base's parameter names, its sharded state dict
and the converters are unchanged. Base parameters get ``requires_grad = False``, so
megatron-core's DDP allocates no gradient buffer and its optimizer keeps no state for them.
"""

from __future__ import annotations

import math
import types
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from megatron_cpt.errors import UserError

TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")


@dataclass(frozen=True)
class LoraSettings:
    rank: int
    alpha: float
    dropout: float = 0.0
    targets: tuple[str, ...] = TARGETS

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def validate(self) -> None:
        if self.rank < 1:
            raise UserError(f"--lora-rank {self.rank}: must be at least 1")
        if not math.isfinite(self.alpha) or self.alpha <= 0:
            raise UserError(f"--lora-alpha {self.alpha}: must be a positive number")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"--lora-dropout {self.dropout}: must be in [0, 1)")
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or not self.targets:
            raise UserError(
                f"--lora-target {','.join(self.targets)}: choose from {','.join(TARGETS)}"
            )


def lora_settings_from_flags(args) -> LoraSettings:
    """``--lora-rank/--lora-alpha/--lora-dropout/--lora-target``, validated."""
    rank = args.lora_rank
    alpha = float(args.lora_alpha) if args.lora_alpha is not None else float(rank)
    targets = tuple(t.strip() for t in str(args.lora_target).split(",") if t.strip())
    settings = LoraSettings(rank=rank, alpha=alpha, dropout=args.lora_dropout, targets=targets)
    settings.validate()
    if getattr(args, "sequence_parallel", False):
        raise UserError("--lora-rank with --sequence-parallel is not supported")
    return settings


def _kind(module) -> str | None:
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    if isinstance(module, ColumnParallelLinear):
        return "column"
    if isinstance(module, RowParallelLinear):
        return "row"
    return None


def _lora_hook(module, args, kwargs, output):
    from megatron.core.tensor_parallel.mappings import (
        copy_to_tensor_model_parallel_region,
        gather_from_tensor_model_parallel_region,
        reduce_from_tensor_model_parallel_region,
    )

    x = args[0] if args else kwargs["input_"]
    out, bias = output
    x = module.lora_dropout(x)
    group = module.tp_group
    ax = torch.nn.functional.linear(x.to(module.lora_A.dtype), module.lora_A)
    if module.lora_kind == "column":
        ax = copy_to_tensor_model_parallel_region(ax, group=group)
        delta = torch.nn.functional.linear(ax, module.lora_B)
        if module.gather_output:
            delta = gather_from_tensor_model_parallel_region(delta, group=group)
    else:
        ax = reduce_from_tensor_model_parallel_region(ax, group=group)
        delta = torch.nn.functional.linear(ax, module.lora_B)
    return out + (module.lora_scale * delta).to(out.dtype), bias


def _lora_sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
    """The base layer's checkpoint sharding plus the adapters': B split like W's rows on a
    column layer (with the SwiGLU [gate; up] factory on a gated fc1, as megatron-core's MLP
    does for W), A split like W's columns on a row layer; the other half replicated."""
    from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
    from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

    state_dict = self.state_dict(prefix="", keep_vars=True)
    axes = (
        {"weight": 0, "bias": 0, "lora_B": 0}
        if self.lora_kind == "column"
        else {
            "weight": 1,
            "lora_A": 1,
        }
    )
    sharded = make_sharded_tensors_for_checkpoint(
        state_dict,
        prefix,
        axes,
        sharded_offsets,
        tp_group=self.tp_group,
        dp_cp_group=metadata["dp_cp_group"],
    )
    if self.lora_gated:
        singleton = (metadata or {}).get("singleton_local_shards", False)
        key = f"{prefix}lora_B"
        sharded[key] = apply_swiglu_sharded_factory(sharded[key], sharded_offsets, singleton)
    return sharded


def lora_layers(model) -> Iterable[tuple[str, torch.nn.Module]]:
    """``(name, linear)`` of every linear that carries an adapter."""
    for name, module in model.named_modules():
        if getattr(module, "lora_kind", None):
            yield name, module


def apply_lora(model, settings: LoraSettings, seed: int = 0) -> dict:
    """Add adapters to the targeted linears of ``model`` (a megatron-core GPTModel) and freeze
    everything else; returns parameter counts (trainable vs frozen) for this rank."""
    settings.validate()
    config = model.config
    if getattr(config, "sequence_parallel", False):
        raise UserError("LoRA with --sequence-parallel is not supported (adapters see full inputs)")
    for param in model.parameters():
        param.requires_grad = False
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    tp_rank = ps.get_tensor_model_parallel_rank()
    tp_size = ps.get_tensor_model_parallel_world_size()
    gen = torch.Generator().manual_seed(seed)
    added = 0
    for name, module in list(model.named_modules()):
        if name.rsplit(".", 1)[-1] not in settings.targets:
            continue
        kind = _kind(module)
        if kind is None or getattr(module, "lora_kind", None):
            continue
        out_local, in_local = module.weight.shape
        # A is initialised like nn.Linear (kaiming-uniform) over the *full* input width and
        # generated whole on every rank, so TP=k sees exactly the TP=1 values.
        in_full = in_local * tp_size if kind == "row" else in_local
        bound = 1.0 / math.sqrt(in_full)
        a_full = (torch.rand(settings.rank, in_full, generator=gen) * 2 - 1) * bound
        if kind == "row":
            a_full = a_full[:, tp_rank * in_local : (tp_rank + 1) * in_local]
        device, dtype = module.weight.device, torch.float32
        module.lora_A = torch.nn.Parameter(a_full.to(device=device, dtype=dtype).contiguous())
        module.lora_B = torch.nn.Parameter(
            torch.zeros(out_local, settings.rank, device=device, dtype=dtype)
        )
        # Tell megatron-core which adapter is a TP shard (like its weight) and which is the same
        # on every TP rank: the grad norm counts a replicated parameter on TP rank 0 only and a
        # shard on every rank. Without this both adapters read as replicated, TP rank 1 had no
        # gradient to count, and at TP=2 the ranks' norm all-reduces did not even match.
        sharded, replicated = (
            (module.lora_B, module.lora_A) if kind == "column" else (module.lora_A, module.lora_B)
        )
        tensor_parallel.set_tensor_model_parallel_attributes(
            sharded, is_parallel=True, dim=0 if kind == "column" else 1, stride=1
        )
        tensor_parallel.set_defaults_if_not_set_tensor_model_parallel_attributes(replicated)
        module.lora_kind = kind
        module.lora_scale = settings.scale
        module.lora_dropout = torch.nn.Dropout(settings.dropout)
        module.lora_gated = (
            kind == "column"
            and name.endswith("linear_fc1")
            and bool(getattr(config, "gated_linear_unit", False))
        )
        module.register_forward_hook(_lora_hook, with_kwargs=True)
        module.sharded_state_dict = types.MethodType(_lora_sharded_state_dict, module)
        added += 1
    if not added:
        raise UserError(
            f"--lora-target {','.join(settings.targets)}: no such tensor-parallel linear in the model"
        )
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    return {"adapted_layers": added, "trainable_params": trainable, "frozen_params": frozen}


@torch.no_grad()
def merge_lora(model) -> int:
    """Fold every adapter into its base weight shard (``W += scale * B @ A``, per rank; see the
    module docstring) and remove it; returns the number of merged layers."""
    merged = 0
    for _, module in list(lora_layers(model)):
        delta = module.lora_scale * (module.lora_B @ module.lora_A)
        module.weight.add_(delta.to(module.weight.dtype))
        for hook_id, hook in list(module._forward_hooks.items()):
            if hook is _lora_hook:
                del module._forward_hooks[hook_id]
                module._forward_hooks_with_kwargs.pop(hook_id, None)
        del module.lora_A, module.lora_B, module.lora_dropout, module.sharded_state_dict
        module.lora_kind = None
        merged += 1
    return merged


def adapter_state_dict(model) -> dict[str, torch.Tensor]:
    """This rank's adapter tensors by parameter name (``...linear_qkv.lora_A``): the adapters
    on their own, without the frozen base."""
    return {
        f"{name}.{part}": getattr(module, part).detach().cpu().clone()
        for name, module in lora_layers(model)
        for part in ("lora_A", "lora_B")
    }


def load_adapter_state_dict(model, state: dict[str, torch.Tensor]) -> None:
    """Load tensors from :func:`adapter_state_dict` into an adapted model of the same shape."""
    expected = adapter_state_dict(model)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise UserError(f"adapters: missing {missing[:3]}, unexpected {unexpected[:3]}")
    with torch.no_grad():
        for name, module in lora_layers(model):
            for part in ("lora_A", "lora_B"):
                value = state[f"{name}.{part}"]
                target = getattr(module, part)
                if value.shape != target.shape:
                    raise UserError(
                        f"adapters: {name}.{part} has shape {tuple(value.shape)}, "
                        f"the model's is {tuple(target.shape)}"
                    )
                target.copy_(value)


def attach_lora(chunks: list, cfg) -> dict:
    """The trainer's LoRA start: when the run starts from a base checkpoint (not a resume),
    load it into the bare chunks first (it has no adapter tensors), then add the adapters.
    A resumed LoRA run's checkpoint holds base and adapters, so it loads normally later."""
    from megatron_cpt.training import checkpointing

    ck = cfg.checkpoint
    candidates = (ck.save,) if ck.finetune else (ck.save, ck.load)
    resuming = any(
        c and not (ck.finetune and c == ck.load) and checkpointing.latest_iteration(c) is not None
        for c in candidates
    )
    pretrained = ck.load if ck.finetune else ck.pretrained_checkpoint
    base_loaded = bool(pretrained) and not resuming
    if base_loaded:
        checkpointing.load_checkpoint(pretrained, chunks, weights_only=True)
    counts: dict = {}
    for i, chunk in enumerate(chunks):
        stats = apply_lora(chunk, cfg.lora, seed=cfg.run.seed + i)
        for key, value in stats.items():
            counts[key] = counts.get(key, 0) + value
    return {**counts, "rank": cfg.lora.rank, "alpha": cfg.lora.alpha, "base_loaded": base_loaded}


def adapter_scale(meta: dict) -> float | None:
    """``alpha / rank`` of a checkpoint written by a LoRA run (from its recorded flags), else
    None."""
    args = meta.get("args") or {}
    rank = args.get("lora_rank") or 0
    if not rank:
        return None
    alpha = args.get("lora_alpha")
    return float(alpha if alpha is not None else rank) / rank


def merged_weight(name: str, weight: torch.Tensor, reader, scale: float | None) -> torch.Tensor:
    """A global (TP-independent) checkpoint weight with its adapter folded in:
    ``W + scale * B @ A`` (batched over the stacked-layer axis), computed in fp32. Used by the
    ``mcore-to-hf`` export, so a LoRA run exports as one merged HF model."""
    if scale is None or not name.endswith(".weight"):
        return weight
    stem = name[: -len(".weight")]
    a_key, b_key = f"{stem}.lora_A", f"{stem}.lora_B"
    from megatron_cpt.convert.mcore_checkpoint import sharded_key

    try:
        reader.global_shape(sharded_key(a_key)[0])  # per-layer names read stacked keys
    except UserError:
        return weight  # this linear carries no adapter
    t = reader.read([a_key, b_key])
    delta = torch.matmul(t[b_key].float(), t[a_key].float()) * scale
    return (weight.float() + delta).to(weight.dtype)
