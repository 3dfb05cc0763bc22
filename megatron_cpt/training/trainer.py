"""The training loop: megatron-core's forward/backward schedules around our CPT semantics.

What is megatron-core's: the model (``GPTModel``), tensor/pipeline parallelism and the
forward-backward schedules, DDP grad buffers and their reduction (``finalize_model_grads``), the
optimizer and LR schedule, the dataset blend, checkpoint sharding. What is ours: the order in
which a CPT run starts (resume > pretrained weights > random init), NaN/Inf skipping, the data
position, logging, and the config checks that must fail before any of that is built.

``Trainer.setup()`` then ``Trainer.train()`` is the CLI; ``Trainer.train_step()`` is one
optimizer step on the next global batch, so a benchmark can time N of them
(``bench/train_throughput.py`` calls ``time_steps``).
"""

from __future__ import annotations

import argparse
import math
import os
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_cpt import platform
from megatron_cpt.config import (
    BatchSettings,
    batch_settings,
    checkpoint_settings,
    logging_settings,
)
from megatron_cpt.errors import UserError
from megatron_cpt.flops import training_flops_per_step
from megatron_cpt.model import (
    LlamaArch,
    ModelBuildConfig,
    build_model_chunks,
    build_transformer_config,
    get_arch,
    padded_vocab_size,
    validate_parallelism,
)
from megatron_cpt.training import checkpointing, context_parallel
from megatron_cpt.training.data import (
    DataSettings,
    MicroBatches,
    build_datasets,
    check_prefix,
    parse_blend,
    parse_named,
    parse_split,
    realized_blend,
)
from megatron_cpt.training.logging import MetricsLogger, TrainRecord
from megatron_cpt.training.optimizer import (
    OptimizerSettings,
    ScheduleSettings,
    build_optimizer,
    build_scheduler,
    current_lr,
    optimizer_step,
    validate_ddp_flags,
    wrap_ddp,
)
from megatron_cpt.training.overlap import OverlapControl

# Test hook (exact-resume test): pause inside this iteration, after forward/backward and before
# the optimizer step, so that a SIGKILL lands mid-iteration deterministically.
PAUSE_ENV = "MEGATRON_CPT_TEST_PAUSE_AT_ITERATION"


@dataclass
class StepResult:
    loss: float
    grad_norm: float | None
    skipped: bool
    lr: float


def _world_size_from_env() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def resolve_arch(args: argparse.Namespace) -> tuple[LlamaArch, str]:
    """The architecture: ``--model``, else the checkpoint we start from, plus shape flags."""
    source = args.model
    if source is None:
        for ckpt in (args.save, args.load, args.pretrained_checkpoint):
            if ckpt and (
                checkpointing.latest_iteration(ckpt) is not None
                or (Path(ckpt) / checkpointing.METADATA_FILE).exists()
            ):
                return _apply_overrides(checkpointing.read_metadata(ckpt)["arch"], args), ckpt
        raise UserError("--model: give a preset name or an HF config.json path")
    return _apply_overrides(get_arch(source), args), source


def _apply_overrides(arch: LlamaArch, args: argparse.Namespace) -> LlamaArch:
    tie = None
    if args.untie_embeddings_and_output_weights:
        tie = False
    head_dim = args.kv_channels
    return arch.replace(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        ffn_hidden_size=args.ffn_hidden_size,
        num_attention_heads=args.num_attention_heads,
        num_query_groups=args.num_query_groups,
        head_dim=head_dim,
        max_position_embeddings=args.max_position_embeddings,
        rope_theta=args.rotary_base,
        norm_eps=args.norm_epsilon,
        vocab_size=args.vocab_size,
        tie_word_embeddings=tie,
    ).validate()


def build_settings(args: argparse.Namespace) -> dict:
    """Every config check that needs no process group, model or data: one line, before compute."""
    world = _world_size_from_env()
    if (
        args.load
        and not checkpointing.checkpoint_exists(args.load)
        and not args.pretrained_checkpoint
    ):
        raise UserError(
            f"--load {args.load}: no published checkpoint there (give --pretrained-checkpoint "
            "for a CPT start, or drop --load to train from scratch)"
        )
    arch, arch_source = resolve_arch(args)
    build = ModelBuildConfig(
        tensor_parallel=args.tensor_model_parallel_size,
        pipeline_parallel=args.pipeline_model_parallel_size,
        context_parallel=args.context_parallel_size,
        sequence_parallel=args.sequence_parallel,
        bf16=args.bf16,
        fp8_format=args.fp8_format,
        recompute_activations=args.recompute_activations,
        init_method_std=args.init_method_std,
        make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
    )
    context_parallel.validate(
        build.context_parallel, args.seq_length, platform.have_transformer_engine()
    )
    validate_parallelism(arch, build, world)
    dp = world // (build.tensor_parallel * build.pipeline_parallel * build.context_parallel)
    batch = batch_settings(args, dp)
    if args.seq_length > arch.max_position_embeddings:
        raise UserError(
            f"--seq-length {args.seq_length} exceeds the model's max_position_embeddings "
            f"({arch.max_position_embeddings})"
        )
    if not args.data_path:
        raise UserError("--data-path: give the training shards (W1 PREFIX1 W2 PREFIX2 ...)")
    prefixes, _ = parse_blend(args.data_path)
    for p in prefixes:
        check_prefix(p, "--data-path")
    for p in parse_named(args.valid_data_path).values():
        check_prefix(p, "--valid-data-path")
    parse_split(args.split)
    if not args.tokenizer_type or not args.tokenizer_model:
        raise UserError("--tokenizer-type and --tokenizer-model are required (the data's EOD id)")
    from megatron_cpt.tokenizers import build_tokenizer

    tokenizer = build_tokenizer(args.tokenizer_type, args.tokenizer_model)
    if tokenizer.vocab_size > arch.vocab_size:
        raise UserError(
            f"--tokenizer-model {args.tokenizer_model}: vocabulary of {tokenizer.vocab_size} "
            f"tokens is larger than the model's vocab_size {arch.vocab_size}"
        )
    for flag, ckpt in (("--pretrained-checkpoint", args.pretrained_checkpoint),
                       ("--load", args.load), ("--save", args.save)):  # fmt: skip
        if not ckpt or (
            flag != "--pretrained-checkpoint" and not checkpointing.checkpoint_exists(ckpt)
        ):
            continue
        saved = checkpointing.read_metadata(ckpt)["arch"]
        diff = arch.differences(saved)
        if diff:
            raise UserError(
                f"{flag} {ckpt}: the checkpoint's architecture differs from the requested model "
                f"({arch_source}): {'; '.join(diff[:3])}; drop --model to use the checkpoint's"
            )
    for name in ("log_interval", "eval_iters"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1")
    if args.save_interval is not None and args.save_interval < 1:
        raise UserError("--save-interval must be >= 1")
    if args.save_interval and not args.save:
        raise UserError("--save-interval needs --save DIR")
    if args.keep_last is not None and args.keep_last < 1:
        raise UserError("--keep-last must be >= 1")
    warmup = args.lr_warmup_iters
    if args.lr_warmup_fraction is not None:
        warmup = int(args.lr_warmup_fraction * (args.lr_decay_iters or batch.train_iters))
    optim = OptimizerSettings(
        lr=args.lr,
        min_lr=args.min_lr,
        weight_decay=args.weight_decay,
        adam_beta1=args.adam_beta1,
        adam_beta2=args.adam_beta2,
        adam_eps=args.adam_eps,
        clip_grad=args.clip_grad,
        bf16=args.bf16,
        use_distributed_optimizer=args.use_distributed_optimizer,
        overlap_grad_reduce=args.overlap_grad_reduce,
        overlap_param_gather=args.overlap_param_gather,
        grad_reduce_in_bf16=args.grad_reduce_in_bf16,
    )
    validate_ddp_flags(optim)
    if args.min_lr > args.lr:
        raise UserError(f"--min-lr {args.min_lr} is larger than --lr {args.lr}")
    sched = ScheduleSettings(
        train_iters=batch.train_iters,
        lr_warmup_iters=warmup,
        lr_warmup_init=args.lr_warmup_init,
        lr_decay_iters=args.lr_decay_iters,
        lr_decay_style=args.lr_decay_style,
        lr_wsd_decay_iters=args.lr_wsd_decay_iters,
        lr_wsd_decay_style=args.lr_wsd_decay_style,
    )
    sched.validate()
    data = DataSettings(
        data_path=list(args.data_path),
        split=args.split,
        valid_data_path=list(args.valid_data_path),
        data_cache_path=args.data_cache_path,
        seq_length=args.seq_length,
        seed=args.seed,
        eod_mask_loss=args.eod_mask_loss,
        reset_position_ids=args.reset_position_ids,
        reset_attention_mask=args.reset_attention_mask,
        num_workers=args.num_workers,
    )
    return dict(
        arch=arch,
        arch_source=arch_source,
        build=build,
        batch=batch,
        optim=optim,
        sched=sched,
        data=data,
        tokenizer=tokenizer,
        ckpt=checkpoint_settings(args),
        log=logging_settings(args),
    )


def _loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Megatron-LM's token-weighted loss: (sum, tokens, report) so micro-batches and DP ranks
    with different numbers of unmasked tokens average correctly."""
    losses = output_tensor.float().view(-1)
    mask = loss_mask.float().view(-1)
    loss_sum = torch.sum(losses * mask)
    num_tokens = mask.sum().to(torch.int)
    report = torch.stack([loss_sum.detach().clone(), num_tokens.detach().float()])
    return loss_sum, num_tokens, {"lm loss": report}


def _forward_step(data_iterator, model):
    dev = platform.device()
    batch = {
        k: v.to(dev, non_blocking=True)
        for k, v in next(data_iterator).items()
        if k in context_parallel.BATCH_KEYS and v is not None
    }
    batch = context_parallel.split_batch(batch)  # this CP rank's chunks (identity at CP=1)
    loss_mask = batch["loss_mask"]
    output = model(
        batch["tokens"], batch["position_ids"], batch.get("attention_mask"), labels=batch["labels"]
    )
    return output, partial(_loss_func, loss_mask)


class Trainer:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.s = build_settings(args)  # every config error surfaces here, before compute
        self.arch: LlamaArch = self.s["arch"]
        self.batch: BatchSettings = self.s["batch"]
        self.iteration = 0
        self.consumed_samples = 0
        self.skipped_total = 0
        self.nan_streak = 0
        self.logger: MetricsLogger | None = None
        self.start_mode = "random-init"

    # ---------------------------------------------------------------- setup
    def setup(self) -> Trainer:
        from megatron.core import parallel_state as ps

        build: ModelBuildConfig = self.s["build"]
        platform.init_distributed()
        platform.initialize_model_parallel(
            build.tensor_parallel, build.pipeline_parallel, build.context_parallel
        )
        platform.set_seed(self.args.seed)
        self.rank = dist.get_rank()
        self.dp_rank = ps.get_data_parallel_rank()
        self.dp_size = ps.get_data_parallel_world_size()
        assert self.dp_size == self.batch.data_parallel_size

        self.config = build_transformer_config(self.arch, build)
        # Megatron-LM's --calculate-per-token-loss: grads scaled by the global loss-token count.
        self.config.calculate_per_token_loss = bool(self.args.calculate_per_token_loss)
        self.fusions = platform.enable_cuda_fusions(
            self.config, cross_entropy=bool(self.args.cross_entropy_loss_fusion)
        )
        self.padded_vocab = padded_vocab_size(
            self.arch.vocab_size, build.tensor_parallel, build.make_vocab_size_divisible_by
        )
        chunks = build_model_chunks(self.arch, self.config, build=build)
        if build.bf16:
            from megatron.core.transformer.module import Float16Module

            chunks = [Float16Module(self.config, c) for c in chunks]
        optim: OptimizerSettings = self.s["optim"]
        self.model = wrap_ddp(chunks, self.config, optim)
        self.optimizer = build_optimizer(self.model, optim)
        self.overlap = OverlapControl(
            self.model,
            self.config,
            overlap_grad_reduce=optim.overlap_grad_reduce,
            param_hooks=optim.use_distributed_optimizer and optim.overlap_param_gather,
        )
        self.scheduler = build_scheduler(self.optimizer, self.s["optim"], self.s["sched"])

        from megatron.core.distributed import finalize_model_grads

        self.config.finalize_model_grads_func = finalize_model_grads
        self.config.grad_scale_func = self.optimizer.scale_loss

        log = self.s["log"]
        self.logger = MetricsLogger(
            log.run_dir,
            log.tensorboard_dir,
            enabled=(self.rank == 0),
            train_iters=self.batch.train_iters,
        )
        for line in platform.precision_notes(build.bf16, self.fusions):
            self.logger.message(line)
        self._load()
        valid_samples = log.eval_iters * self.batch.global_batch_size
        self.datasets = build_datasets(
            self.s["data"],
            self.s["tokenizer"],
            train_samples=self.batch.train_samples,
            valid_samples=valid_samples if log.eval_interval else 0,
        )
        self.train_iter = MicroBatches(
            self.datasets.train,
            self.consumed_samples,
            self.batch.micro_batch_size,
            self.dp_rank,
            self.dp_size,
            wrap=True,
        )
        from megatron.core.pipeline_parallel import get_forward_backward_func

        self.fwd_bwd = get_forward_backward_func()
        return self

    def _load(self) -> None:
        ck = self.s["ckpt"]
        resume_dir = None
        for candidate in (ck.save, ck.load):
            if candidate and checkpointing.latest_iteration(candidate) is not None:
                resume_dir = candidate
                break
        if resume_dir is not None:
            state = checkpointing.load_checkpoint(
                resume_dir, self.model, self.optimizer, self.scheduler
            )
            self.iteration = state["iteration"]
            self.consumed_samples = int(state.get("consumed_samples", 0))
            self.skipped_total = int(state.get("skipped_iters", 0))
            self.start_mode = f"resumed from {resume_dir} at iteration {self.iteration}"
            # The schedule follows the current flags at the restored step count.
            self.scheduler.num_steps = int(state.get("scheduler_steps", self.iteration))
            self.scheduler.step(0)
        elif ck.pretrained_checkpoint:
            checkpointing.load_checkpoint(ck.pretrained_checkpoint, self.model, weights_only=True)
            # Megatron's optimizer keeps fp32 master copies for bf16; refresh them from weights.
            if hasattr(self.optimizer, "reload_model_params"):
                self.optimizer.reload_model_params()
            self.start_mode = f"CPT start from {ck.pretrained_checkpoint} (weights only)"
        if self.logger:
            self.logger.message(f"> {self.start_mode}")

    # ---------------------------------------------------------------- steps
    def _reduce_loss(self, losses_reduced: list[dict]) -> float:
        """Token-weighted mean over micro-batches and DP ranks, made known on every rank."""
        from megatron.core import parallel_state as ps

        total = torch.zeros(2, dtype=torch.float64, device=platform.device())
        for item in losses_reduced:
            total += item["lm loss"].to(total)
        # Only the last pipeline stage has losses; summing over the pipeline group spreads them.
        if ps.get_pipeline_model_parallel_world_size() > 1:
            dist.all_reduce(total, group=ps.get_pipeline_model_parallel_group())
        # Each DP rank has its own samples, each CP rank its chunks of them: sum over both.
        context_parallel.reduce_loss_sum_and_tokens(total)
        return float(total[0] / total[1].clamp(min=1))

    def train_step(self) -> StepResult:
        for chunk in self.model:
            chunk.train()
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        losses = self.fwd_bwd(
            forward_step_func=_forward_step,
            data_iterator=self.train_iter,
            model=self.model,
            num_microbatches=self.batch.num_microbatches,
            seq_length=self.batch.seq_length,
            micro_batch_size=self.batch.micro_batch_size,
            forward_only=False,
        )
        loss = self._reduce_loss(losses)
        if os.environ.get(PAUSE_ENV) == str(self.iteration + 1):
            self._pause()
        lr = current_lr(self.optimizer)
        grad_norm, skipped = optimizer_step(self.optimizer, math.isfinite(loss))
        if not skipped:
            self.scheduler.step(1)
        self.overlap.after_step()
        self.iteration += 1
        self.consumed_samples += self.batch.global_batch_size
        return StepResult(loss=loss, grad_norm=grad_norm, skipped=skipped, lr=lr)

    def _pause(self) -> None:
        marker = Path(self.s["log"].run_dir) / f"paused_at_iteration_{self.iteration + 1}"
        if self.rank == 0:
            marker.write_text(str(os.getpid()))
        while True:  # wait for the test's SIGKILL
            time.sleep(1)

    def evaluate(self) -> dict[str, float]:
        """Loss on each named validation set (the same samples every time, so that evaluations
        at different iterations are comparable)."""
        with self.overlap.params_whole():
            return self._evaluate()

    def _evaluate(self) -> dict[str, float]:
        results = {}
        for chunk in self.model:
            chunk.eval()
        for name, dataset in self.datasets.valid.items():
            it = MicroBatches(
                dataset, 0, self.batch.micro_batch_size, self.dp_rank, self.dp_size, wrap=True
            )
            total = []
            with torch.no_grad():
                for _ in range(self.s["log"].eval_iters):
                    total += self.fwd_bwd(
                        forward_step_func=_forward_step,
                        data_iterator=it,
                        model=self.model,
                        num_microbatches=self.batch.num_microbatches,
                        seq_length=self.batch.seq_length,
                        micro_batch_size=self.batch.micro_batch_size,
                        forward_only=True,
                    )
            results[name] = self._reduce_loss(total)
        for chunk in self.model:
            chunk.train()
        return results

    def time_steps(self, n: int) -> dict:
        """Run ``n`` optimizer steps and time them (for benchmarks): seconds, tokens/s."""
        platform.synchronize()
        start = time.perf_counter()
        losses = [self.train_step().loss for _ in range(n)]
        platform.synchronize()
        seconds = time.perf_counter() - start
        tokens = n * self.batch.global_batch_size * self.batch.seq_length
        return {"seconds": seconds, "tokens_per_s": tokens / seconds, "losses": losses}

    # ---------------------------------------------------------------- checkpoints
    def save(self) -> None:
        with self.overlap.params_whole():
            self._save()

    def _save(self) -> None:
        ck = self.s["ckpt"]
        checkpointing.save_checkpoint(
            ck.save,
            self.iteration,
            self.model,
            optimizer=None if ck.no_save_optim else self.optimizer,
            scheduler=self.scheduler,
            state={
                "consumed_samples": self.consumed_samples,
                "skipped_iters": self.skipped_total,
                "scheduler_steps": self.scheduler.num_steps,
                "data_path": list(self.args.data_path),
                "seq_length": self.batch.seq_length,
                "global_batch_size": self.batch.global_batch_size,
            },
            arch=self.arch,
            keep_last=ck.keep_last,
            args={k: v for k, v in vars(self.args).items()},
            padded_vocab_size=self.padded_vocab,
        )
        self.logger.message(f"> saved checkpoint at iteration {self.iteration} to {ck.save}")

    # ---------------------------------------------------------------- loop
    def _flops_per_iteration(self) -> float:
        """Exact Llama training FLOPs (``megatron_cpt.flops``, the bench's formula too)."""
        b = self.batch
        return training_flops_per_step(
            self.arch, b.seq_length, b.global_batch_size, self.padded_vocab
        )

    def train(self) -> dict:
        from megatron.core import parallel_state as ps

        log = self.s["log"]
        ck = self.s["ckpt"]
        start = time.time()
        if log.eval_interval and self.iteration == 0 and self.datasets.valid:
            for name, loss in self.evaluate().items():
                self.logger.valid(0, name, loss)
        interval_losses: list[float] = []
        interval_start = time.perf_counter()
        interval_iters = 0
        peak = platform.peak_flops_per_device(
            torch.bfloat16 if self.s["build"].bf16 else torch.float32
        )
        last: StepResult | None = None
        while self.iteration < self.batch.train_iters:
            last = self.train_step()
            interval_iters += 1
            if last.skipped:
                self.skipped_total += 1
                self.nan_streak += 1
            else:
                self.nan_streak = 0
                interval_losses.append(last.loss)
            stop = self.nan_streak >= log.max_nan_skips
            if (
                self.iteration % log.log_interval == 0
                or self.iteration == self.batch.train_iters
                or stop
            ):
                platform.synchronize()
                seconds = time.perf_counter() - interval_start
                tokens = interval_iters * self.batch.global_batch_size * self.batch.seq_length
                tflops = mfu = None
                if platform.has_cuda():
                    tflops = (
                        self._flops_per_iteration() * interval_iters / seconds / 1e12
                    ) / dist.get_world_size()
                    mfu = tflops * 1e12 / peak if peak else None
                mean = sum(interval_losses) / len(interval_losses) if interval_losses else last.loss
                self.logger.train(
                    TrainRecord(
                        iteration=self.iteration,
                        consumed_samples=self.consumed_samples,
                        lm_loss=mean,
                        lr=last.lr,
                        grad_norm=last.grad_norm,
                        tokens_per_s=tokens / seconds,
                        skipped_iters=self.skipped_total,
                        elapsed_s=time.time() - start,
                        tflops_per_device=tflops,
                        mfu=mfu,
                    )
                )
                interval_losses, interval_iters = [], 0
                interval_start = time.perf_counter()
            if stop:
                raise UserError(
                    f"stopping at iteration {self.iteration}: {self.nan_streak} iterations in "
                    f"a row had a NaN/Inf loss or grad norm (last loss {last.loss}, grad norm "
                    f"{last.grad_norm}); lower --lr or check the data"
                )
            evaluated = False
            if log.eval_interval and self.iteration % log.eval_interval == 0:
                for name, loss in self.evaluate().items():
                    self.logger.valid(self.iteration, name, loss)
                evaluated = True
            if ck.save and ck.save_interval and self.iteration % ck.save_interval == 0:
                self.save()
            if evaluated or (ck.save and ck.save_interval):
                interval_start = time.perf_counter()  # keep eval/save out of tokens/s
        if log.eval_interval and self.datasets.valid and self.iteration % log.eval_interval:
            for name, loss in self.evaluate().items():
                self.logger.valid(self.iteration, name, loss)
        self.overlap.finish()  # every parameter gathered before the final save
        if ck.save and checkpointing.latest_iteration(ck.save) != self.iteration:
            self.save()
        summary = {
            "iteration": self.iteration,
            "consumed_samples": self.consumed_samples,
            "skipped_iters": self.skipped_total,
            "start": self.start_mode,
            "arch": self.arch.to_hf_config(),
            "padded_vocab_size": self.padded_vocab,
            "parallel": {
                "tensor": ps.get_tensor_model_parallel_world_size(),
                "pipeline": ps.get_pipeline_model_parallel_world_size(),
                "data": self.dp_size,
                "world": dist.get_world_size(),
            },
            "realized_blend": realized_blend(
                self.datasets.train, self.consumed_samples, self.datasets.train_prefixes
            ),
            "elapsed_s": round(time.time() - start, 3),
        }
        self.logger.write_json("run_summary.json", summary)
        return summary

    def close(self) -> None:
        if self.logger:
            self.logger.close()


def pretrain(args: argparse.Namespace) -> dict:
    trainer = Trainer(args)
    try:
        trainer.setup()
        return trainer.train()
    finally:
        trainer.close()
