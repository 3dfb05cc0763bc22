"""Optimizer, LR/WD schedule and DDP wrapping — all megatron-core's, configured for CPT.

megatron-core's ``get_megatron_optimizer`` gives Adam with fp32 master weights for bf16 (and the
distributed optimizer, which shards those master weights and the Adam moments over the
data-parallel ranks); its ``OptimizerParamScheduler`` already implements linear warmup and
cosine/linear/constant/WSD decay, with WSD's "minus_sqrt" cooldown being the (1 - sqrt) shape
used for CPT annealing. We only map Megatron-LM's flag semantics onto them, plus three things
megatron-core's torch fallback (no TE/Apex) gets wrong or slow:

- :func:`optimizer_step` computes the gradient norm once per step (megatron-core's ``step()``
  would compute it again after our NaN/Inf check) and clips with it;
- :func:`_l2_norm_one_sync` replaces the fallback l2 norm, which synchronises with the host once
  per tensor, by one fp64 reduction (one sync per step, and a norm that does not depend on how
  the distributed optimizer shards the gradients);
- :func:`_init_adam_state` gives torch Adam its state before the first step, as TE/Apex's
  FusedAdam has it, so that a checkpoint can be saved or loaded before any step.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

from megatron_cpt import platform
from megatron_cpt.errors import UserError

DECAY_STYLES = ("cosine", "linear", "constant", "WSD", "inverse-square-root")
WSD_STYLES = ("minus_sqrt", "linear", "cosine", "exponential")


@dataclass
class OptimizerSettings:
    lr: float = 3e-4
    min_lr: float = 0.0
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    bf16: bool = False
    use_distributed_optimizer: bool = False
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False
    grad_reduce_in_bf16: bool = False


@dataclass
class ScheduleSettings:
    train_iters: int = 1
    lr_warmup_iters: int = 0
    lr_warmup_init: float = 0.0
    lr_decay_iters: int | None = None  # None: train_iters
    lr_decay_style: str = "cosine"
    lr_wsd_decay_iters: int | None = None  # WSD cooldown length; None: 10% of decay iters
    lr_wsd_decay_style: str = "minus_sqrt"

    def validate(self) -> None:
        if self.lr_decay_style not in DECAY_STYLES:
            raise UserError(
                f"--lr-decay-style must be one of {', '.join(DECAY_STYLES)}, "
                f"got {self.lr_decay_style!r}"
            )
        if self.lr_wsd_decay_style not in WSD_STYLES:
            raise UserError(
                f"--lr-wsd-decay-style must be one of {', '.join(WSD_STYLES)}, "
                f"got {self.lr_wsd_decay_style!r}"
            )
        decay = self.lr_decay_iters or self.train_iters
        if self.lr_warmup_iters >= decay:
            raise UserError(
                f"--lr-warmup-iters ({self.lr_warmup_iters}) must be smaller than the decay "
                f"length ({decay} iterations)"
            )


def wrap_ddp(model_chunks: list, transformer_config, settings: OptimizerSettings | None = None):
    """megatron-core DDP: contiguous grad buffers, reduced over the data-parallel group by
    ``finalize_model_grads`` (or bucket by bucket during backward with ``--overlap-grad-reduce``);
    the optimizer reads ``param.main_grad`` from these buffers.

    Grads are reduced in fp32 (Megatron-LM's default for bf16 training) unless
    ``--grad-reduce-in-bf16``. Like Megatron-LM, only the first chunk is bucketed (the others
    are virtual-pipeline chunks whose grads are ready only at the end).
    """
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    settings = settings or OptimizerSettings()
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=not settings.grad_reduce_in_bf16,
        overlap_grad_reduce=settings.overlap_grad_reduce,
        overlap_param_gather=settings.overlap_param_gather,
        use_distributed_optimizer=settings.use_distributed_optimizer,
        check_for_nan_in_grad=False,  # we skip NaN steps ourselves instead of raising
    )
    return [
        DistributedDataParallel(
            config=transformer_config,
            ddp_config=ddp_config,
            module=chunk,
            disable_bucketing=(i > 0),
        )
        for i, chunk in enumerate(model_chunks)
    ]


def validate_ddp_flags(settings: OptimizerSettings) -> None:
    """Megatron-LM's own rules for the overlap flags, as one-line errors before compute."""
    if settings.overlap_param_gather and not settings.use_distributed_optimizer:
        raise UserError(
            "--overlap-param-gather needs --use-distributed-optimizer (only the distributed "
            "optimizer all-gathers parameters)"
        )
    if settings.overlap_param_gather and not settings.overlap_grad_reduce:
        raise UserError("--overlap-param-gather needs --overlap-grad-reduce (as in Megatron-LM)")


def build_optimizer(model_chunks: list, settings: OptimizerSettings):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    platform.apply_cpu_patches()
    _install_l2_norm()
    _install_torch_adam_load_fixes()
    config = OptimizerConfig(
        optimizer="adam",
        lr=settings.lr,
        min_lr=settings.min_lr,
        weight_decay=settings.weight_decay,
        adam_beta1=settings.adam_beta1,
        adam_beta2=settings.adam_beta2,
        adam_eps=settings.adam_eps,
        clip_grad=settings.clip_grad,
        bf16=settings.bf16,
        params_dtype=torch.bfloat16 if settings.bf16 else torch.float32,
        use_distributed_optimizer=settings.use_distributed_optimizer,
        overlap_param_gather=settings.overlap_param_gather,
    )
    optimizer = get_megatron_optimizer(config, model_chunks)
    fused = platform.use_fused_adam()
    for inner in _torch_adams(optimizer):
        if fused:
            for group in inner.param_groups:  # torch reads these per step
                group["fused"], group["foreach"] = True, False
        _init_adam_state(inner)
    return optimizer


def _megatron_optimizers(optimizer) -> list:
    """The per-dtype/per-chunk optimizers inside megatron-core's ``ChainedOptimizer``."""
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _torch_adams(optimizer) -> list:
    """torch's Adam/AdamW inside megatron-core's wrappers (its fallback without TE/Apex)."""
    out = []
    for opt in _megatron_optimizers(optimizer):
        inner = getattr(opt, "optimizer", None)
        if isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
            out.append(inner)
    return out


def _init_adam_state(adam: torch.optim.Optimizer) -> None:
    """Create torch Adam's per-parameter state now, exactly as its first ``step()`` would.

    torch creates ``step``/``exp_avg``/``exp_avg_sq`` lazily, so before the first step the state
    is empty, and megatron-core's ``DistributedOptimizer.state_dict()`` (called when saving *and*
    when loading a checkpoint) asserts one common ``step`` over an empty set (issue 14, Found 3).
    Megatron-LM's fix for its own fused optimizers is an ``init_state_fn`` that fills the moments
    with zeros; torch Adam also needs its ``step`` counter. Zeros and step 0 are what torch's
    ``_init_group`` would create, so the first update is bit-identical.
    """
    for group in adam.param_groups:
        on_device = group.get("fused") or group.get("capturable")
        for p in group["params"]:
            state = adam.state[p]
            if len(state) == 0:
                state["step"] = torch.zeros(
                    (), dtype=torch.float32, device=p.device if on_device else "cpu"
                )
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if group.get("amsgrad"):
                    state["max_exp_avg_sq"] = torch.zeros_like(
                        p, memory_format=torch.preserve_format
                    )


def _l2_norm_one_sync(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """Drop-in for megatron-core's ``local_multi_tensor_l2_norm`` (its no-TE/Apex fallback).

    The fallback takes ``float(torch.norm(t))`` per tensor (a host sync each) and rounds the
    total to fp32 before it is squared and summed over ranks. Here: per-tensor norms in fp64 with
    one foreach call, combined on the device, returned as an fp64 tensor, so that the
    all-reduce in ``get_grad_norm_fp32`` sums fp64 squares and its ``.item()`` is the step's only
    host sync. fp64 also makes the norm independent of how the distributed optimizer splits the
    gradients across ranks to within fp64 rounding, far below the fp32 precision it is used at.
    """
    tensors = [t for t in tensor_lists[0] if t.numel()]
    if not tensors:
        dev = tensor_lists[0][0].device if tensor_lists[0] else platform.device()
        return torch.zeros(1, dtype=torch.float64, device=dev), None
    norms = torch._foreach_norm(tensors, 2, dtype=torch.float64)
    total = torch.linalg.vector_norm(torch.stack(norms))
    return total.reshape(1), None


def _install_l2_norm() -> None:
    from megatron.core import utils
    from megatron.core.optimizer import clip_grads

    if clip_grads.l2_norm_impl is utils.local_multi_tensor_l2_norm:  # TE/Apex kernels stay
        clip_grads.l2_norm_impl = _l2_norm_one_sync


def _install_torch_adam_load_fixes() -> None:
    """Let the distributed optimizer load its state into torch Adam (megatron-core's fallback).

    ``DistributedOptimizer._set_main_param_and_optimizer_states`` copies the loaded tensors into
    ``{"param": main_param, **optimizer.state[main_param]}`` key by key, and every caller leaves
    out ``"step"`` ("handled separately": ``load_state_dict`` restores it from the param groups
    first). TE/Apex's FusedAdam keeps no per-parameter ``step``, torch Adam does, so with
    megatron-core's torch fallback every reshardable load stops with ``KeyError: 'step'``. Copying
    the keys that were loaded (param and moments) is what the method means to do.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    upstream = DistributedOptimizer._set_main_param_and_optimizer_states
    if getattr(upstream, "__torch_adam_fixed__", False):
        return

    @functools.wraps(upstream)
    def set_states(self, model_param, tensors):
        if self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            return upstream(self, model_param, tensors)
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        dst = {"param": main_param, **self.optimizer.state[main_param]}
        for key, value in tensors.items():
            dst[key].copy_(value)
        return None

    set_states.__torch_adam_fixed__ = True
    DistributedOptimizer._set_main_param_and_optimizer_states = set_states

    # ``load_state_dict`` gives every parameter's state the *same* ``step`` tensor, and torch
    # loads it without a copy; torch's foreach Adam then increments that one tensor once per
    # parameter, so from the first step after a load the bias correction is wrong (a resumed
    # run diverges from an uninterrupted one). One tensor per parameter, as torch keeps it.
    load = DistributedOptimizer.load_state_dict

    @functools.wraps(load)
    def load_state_dict(self, state_dict):
        result = load(self, state_dict)
        for state in self.optimizer.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()
        return result

    DistributedOptimizer.load_state_dict = load_state_dict


def optimizer_step(optimizer, loss_is_finite: bool) -> tuple[float, bool]:
    """One optimizer step with the gradient norm computed once: ``(grad_norm, skipped)``.

    megatron-core's ``optimizer.step()`` is ``prepare_grads`` + ``get_grad_norm`` + clip +
    ``step_with_ready_grads``. We need the norm *before* deciding to step (a NaN/Inf loss or norm
    skips the update, the learning-rate schedule does not advance), so we run the same four
    parts ourselves and clip with the norm we already have instead of letting ``step()``
    compute it again. The norm is rounded to fp32, the precision the clip coefficient is applied
    in, so that it does not depend on how the gradients were sharded.
    """
    from megatron.core.optimizer import clip_grads

    found_inf = bool(optimizer.prepare_grads())
    grad_norm = float(np.float32(optimizer.get_grad_norm()))
    if found_inf or not loss_is_finite or not math.isfinite(grad_norm):
        return grad_norm, True
    for opt in _megatron_optimizers(optimizer):
        if getattr(opt, "is_stub_optimizer", False) or opt.config.clip_grad <= 0.0:
            continue
        params = opt.get_parameters()
        if params:
            clip_grads.clip_grad_by_total_norm_fp32(
                params,
                max_norm=opt.config.clip_grad,
                total_norm=grad_norm,
                use_decoupled_grad=opt.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8,
            )
    ok = bool(optimizer.step_with_ready_grads())
    return grad_norm, not ok


def build_scheduler(optimizer, opt: OptimizerSettings, sched: ScheduleSettings):
    """Megatron-LM's schedule semantics, in iterations (one step per global batch)."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    sched.validate()
    decay = sched.lr_decay_iters or sched.train_iters
    wsd = None
    if sched.lr_decay_style == "WSD":
        wsd = sched.lr_wsd_decay_iters or max(1, decay // 10)
        if wsd > decay:
            raise UserError(f"--lr-wsd-decay-iters ({wsd}) exceeds the decay length ({decay})")
    return OptimizerParamScheduler(
        optimizer,
        init_lr=sched.lr_warmup_init,
        max_lr=opt.lr,
        min_lr=opt.min_lr,
        lr_warmup_steps=sched.lr_warmup_iters,
        lr_decay_steps=decay,
        lr_decay_style=sched.lr_decay_style,
        start_wd=opt.weight_decay,
        end_wd=opt.weight_decay,
        wd_incr_steps=decay,
        wd_incr_style="constant",
        # A resumed run keeps the schedule it started with, unless the flags change it.
        use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=True,
        wsd_decay_steps=wsd,
        lr_wsd_decay_style=sched.lr_wsd_decay_style if wsd else None,
    )


def current_lr(optimizer) -> float:
    from megatron.core.optimizer_param_scheduler import get_canonical_lr_for_logging

    lr = get_canonical_lr_for_logging(optimizer.param_groups)
    return float(lr if lr is not None else optimizer.param_groups[0]["lr"])
