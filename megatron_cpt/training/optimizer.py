"""Optimizer, LR/WD schedule and DDP wrapping — all megatron-core's, configured for CPT.

megatron-core's ``get_megatron_optimizer`` gives Adam with fp32 master weights for bf16 (and the
distributed optimizer on GPUs); its ``OptimizerParamScheduler`` already implements linear warmup
and cosine/linear/constant/WSD decay, with WSD's "minus_sqrt" cooldown being the (1 - sqrt)
shape used for CPT annealing. We only map Megatron-LM's flag semantics onto them.
"""

from __future__ import annotations

from dataclasses import dataclass

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


def wrap_ddp(model_chunks: list, transformer_config, use_distributed_optimizer: bool = False):
    """megatron-core DDP: contiguous fp32 grad buffers, reduced over the data-parallel group
    by ``finalize_model_grads`` (the optimizer reads ``param.main_grad`` from these buffers)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    if use_distributed_optimizer and not platform.has_cuda():
        raise UserError("--use-distributed-optimizer needs GPUs (it refuses CPU tensors)")
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=use_distributed_optimizer,
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


def build_optimizer(model_chunks: list, settings: OptimizerSettings):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    platform.apply_cpu_patches()
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
    )
    return get_megatron_optimizer(config, model_chunks)


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
