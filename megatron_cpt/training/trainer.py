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
import gc
import math
import os
import signal
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_cpt import platform
from megatron_cpt.config import BatchSettings, TrainConfig, resolve_config
from megatron_cpt.errors import UserError
from megatron_cpt.flops import training_flops_per_step
from megatron_cpt.model import (
    LlamaArch,
    ModelBuildConfig,
    build_model_chunks,
    build_transformer_config,
    padded_vocab_size,
)
from megatron_cpt.training import checkpointing, context_parallel
from megatron_cpt.training.data import (
    MicroBatches,
    build_datasets,
    realized_blend,
    worker_batches,
)
from megatron_cpt.training.logging import MetricsLogger, TrainRecord
from megatron_cpt.training.optimizer import (
    build_optimizer,
    build_scheduler,
    current_lr,
    optimizer_step,
    wrap_ddp,
)
from megatron_cpt.training.overlap import OverlapControl
from megatron_cpt.training.preflight import preflight

# Test hook (exact-resume test): pause inside this iteration, after forward/backward and before
# the optimizer step, so that a SIGKILL lands mid-iteration deterministically.
PAUSE_ENV = "MEGATRON_CPT_TEST_PAUSE_AT_ITERATION"


@dataclass
class StepResult:
    loss: float
    grad_norm: float | None
    skipped: bool
    lr: float


def build_settings(args: argparse.Namespace) -> TrainConfig:
    """The resolved, validated config (``megatron_cpt.config.resolve_config``)."""
    return resolve_config(args)


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
    def __init__(self, cfg: TrainConfig | argparse.Namespace):
        if isinstance(cfg, argparse.Namespace):
            cfg = resolve_config(cfg)  # every config error surfaces here, before compute
        preflight(cfg)  # outputs writable, shard token ids within the vocabulary
        self.cfg = cfg
        self.arch: LlamaArch = cfg.arch
        self.batch: BatchSettings = cfg.batch
        self.stop_reason: str | None = None
        self._signal_received = False
        self.iteration = 0
        self.consumed_samples = 0
        self.skipped_total = 0
        self.nan_streak = 0
        self.logger: MetricsLogger | None = None
        self.start_mode = "random-init"

    # ---------------------------------------------------------------- setup
    def setup(self) -> Trainer:
        from megatron.core import parallel_state as ps

        build: ModelBuildConfig = self.cfg.build
        platform.init_distributed(self.cfg.run.distributed_timeout_minutes)
        platform.initialize_model_parallel(
            build.tensor_parallel, build.pipeline_parallel, build.context_parallel
        )
        platform.set_seed(self.cfg.run.seed)
        self.rank = dist.get_rank()
        self.dp_rank = ps.get_data_parallel_rank()
        self.dp_size = ps.get_data_parallel_world_size()
        assert self.dp_size == self.batch.data_parallel_size

        self.config = build_transformer_config(self.arch, build)
        # Megatron-LM's --calculate-per-token-loss: grads scaled by the global loss-token count.
        # SFT always: loss masks differ per micro-batch, so gradients are summed over tokens and
        # divided by the global count (schedules + DDP + finalize_model_grads read this flag).
        self.config.calculate_per_token_loss = build.calculate_per_token_loss or self.cfg.data.sft
        self.fusions = platform.enable_cuda_fusions(
            self.config, cross_entropy=build.cross_entropy_loss_fusion
        )
        self.padded_vocab = padded_vocab_size(
            self.arch.vocab_size, build.tensor_parallel, build.make_vocab_size_divisible_by
        )
        chunks = build_model_chunks(self.arch, self.config, build=build)
        self.lora_note = None
        if self.cfg.lora is not None:  # before DDP/optimizer: frozen base gets no grads/state
            from megatron_cpt.model.lora import attach_lora

            self.lora_note = attach_lora(chunks, self.cfg)
        if build.bf16:
            from megatron.core.transformer.module import Float16Module

            chunks = [Float16Module(self.config, c) for c in chunks]
        optim = self.cfg.optim
        self.model = wrap_ddp(chunks, self.config, optim)
        self.optimizer = build_optimizer(self.model, optim)
        self.overlap = OverlapControl(
            self.model,
            self.config,
            overlap_grad_reduce=optim.overlap_grad_reduce,
            param_hooks=optim.use_distributed_optimizer and optim.overlap_param_gather,
        )
        self.scheduler = build_scheduler(self.optimizer, self.cfg.optim, self.cfg.sched)

        from megatron.core.distributed import finalize_model_grads

        self.config.finalize_model_grads_func = finalize_model_grads
        self.config.grad_scale_func = self.optimizer.scale_loss

        log = self.cfg.logging
        self.logger = MetricsLogger(
            log.run_dir,
            log.tensorboard_dir,
            enabled=(self.rank == 0),
            train_iters=self.batch.train_iters,
            wandb=log if log.wandb_project else None,
            wandb_config=self.cfg.run.record,
        )
        for note in platform.startup_notes(build.bf16, self.fusions):
            self.logger.message(note)
        if self.lora_note is not None:
            self.logger.message(f"> LoRA: {self.lora_note}")
        self._load()
        valid_samples = log.eval_iters * self.batch.global_batch_size
        self.datasets = build_datasets(
            self.cfg.data,
            self.cfg.tokenizer,
            train_samples=self.batch.train_samples,
            valid_samples=valid_samples if log.eval_interval else 0,
            test_samples=valid_samples if self.cfg.data.test_data_path else 0,
        )
        self.train_iter = worker_batches(
            MicroBatches(
                self.datasets.train,
                self.consumed_samples,
                self.batch.micro_batch_size,
                self.dp_rank,
                self.dp_size,
                wrap=True,
            ),
            self.cfg.data.num_workers,
        )
        if self.cfg.run.exit_signal is not None:
            signal.signal(self.cfg.run.exit_signal, self._on_exit_signal)
        from megatron.core.pipeline_parallel import get_forward_backward_func

        self.fwd_bwd = get_forward_backward_func()
        return self

    def _load(self) -> None:
        ck = self.cfg.checkpoint
        resume_dir = None
        # --finetune: --load holds the weights to start from, never a run to resume.
        candidates = (ck.save,) if ck.finetune else (ck.save, ck.load)
        for candidate in candidates:
            if ck.finetune and candidate == ck.load:
                continue
            if candidate and checkpointing.latest_iteration(candidate) is not None:
                resume_dir = candidate
                break
        pretrained = ck.load if ck.finetune else ck.pretrained_checkpoint
        if resume_dir is not None:
            iteration, note = checkpointing.resumable_iteration(resume_dir)
            if note and self.logger:
                self.logger.message(f"> warning: {note}")
            state = checkpointing.load_checkpoint(
                resume_dir,
                self.model,
                None if ck.no_load_optim else self.optimizer,
                None if ck.no_load_optim else self.scheduler,
                load_rng=not ck.no_load_rng,
                iteration=iteration,
            )
            if ck.no_load_optim and hasattr(self.optimizer, "reload_model_params"):
                self.optimizer.reload_model_params()
            self.iteration = state["iteration"]
            self.consumed_samples = int(state.get("consumed_samples", 0))
            self.skipped_total = int(state.get("skipped_iters", 0))
            self.start_mode = f"resumed from {resume_dir} at iteration {self.iteration}"
            if ck.no_load_optim:
                self.start_mode += " (fresh optimizer: --no-load-optim)"
            # The schedule follows the current flags at the restored step count.
            self.scheduler.num_steps = int(state.get("scheduler_steps", self.iteration))
            self.scheduler.step(0)
        elif self.lora_note is not None and self.lora_note["base_loaded"]:
            self.start_mode = f"LoRA on {pretrained} (base loaded before the adapters)"
        elif pretrained:
            checkpointing.load_checkpoint(pretrained, self.model, weights_only=True)
            # Megatron's optimizer keeps fp32 master copies for bf16; refresh them from weights.
            if hasattr(self.optimizer, "reload_model_params"):
                self.optimizer.reload_model_params()
            how = "--finetune" if ck.finetune else "CPT start"
            self.start_mode = f"{how} from {pretrained} (weights only)"
        if self.logger:
            self.logger.message(f"> {self.start_mode}")

    def _on_exit_signal(self, signum, frame) -> None:
        self._signal_received = True

    def _should_exit(self, start: float) -> str | None:
        """--exit-signal-handler / --exit-duration-in-mins, agreed on by every rank."""
        run = self.cfg.run
        if run.exit_signal is None and run.exit_duration_in_mins is None:
            return None
        flags = torch.tensor(
            [
                float(self._signal_received),
                float(
                    run.exit_duration_in_mins is not None
                    and (time.time() - start) / 60.0 >= run.exit_duration_in_mins
                ),
            ]
        )
        if dist.is_initialized() and dist.get_world_size() > 1:
            flags = flags.to(platform.device())
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        if flags[0] > 0:
            return f"signal {signal.Signals(run.exit_signal).name} received"
        if flags[1] > 0:
            return f"--exit-duration-in-mins {run.exit_duration_in_mins} reached"
        return None

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
        marker = Path(self.cfg.logging.run_dir) / f"paused_at_iteration_{self.iteration + 1}"
        if self.rank == 0:
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(str(os.getpid()))
        while True:  # wait for the test's SIGKILL
            time.sleep(1)

    def evaluate(self, sets: dict | None = None) -> dict[str, float]:
        """Loss on each named validation set (the same samples every time, so that evaluations
        at different iterations are comparable); ``sets`` defaults to the validation sets."""
        with self.overlap.params_whole():
            return self._evaluate(sets)

    def _evaluate(self, sets: dict | None) -> dict[str, float]:
        results = {}
        for chunk in self.model:
            chunk.eval()
        for name, dataset in (self.datasets.valid if sets is None else sets).items():
            it = MicroBatches(
                dataset, 0, self.batch.micro_batch_size, self.dp_rank, self.dp_size, wrap=True
            )
            total = []
            with torch.no_grad():
                for _ in range(self.cfg.logging.eval_iters):
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
        ck = self.cfg.checkpoint
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
                "data_path": list(self.cfg.data.data_path or self.cfg.data.train_data_path),
                "seq_length": self.batch.seq_length,
                "global_batch_size": self.batch.global_batch_size,
            },
            arch=self.arch,
            keep_last=ck.keep_last,
            args=self.cfg.run.record,
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

        log = self.cfg.logging
        ck = self.cfg.checkpoint
        start = time.time()
        if log.eval_interval and self.iteration == 0 and self.datasets.valid:
            for name, loss in self.evaluate().items():
                self.logger.valid(0, name, loss)
        interval_losses: list[float] = []
        interval_start = time.perf_counter()
        interval_iters = 0
        peak = platform.peak_flops_per_device(
            torch.bfloat16 if self.cfg.build.bf16 else torch.float32
        )
        last: StepResult | None = None
        if self.cfg.run.manual_gc:  # Megatron-LM's --manual-gc: no GC pauses inside steps
            gc.disable()
            gc.collect()
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
            if self.cfg.run.manual_gc and (evaluated or (ck.save and ck.save_interval)):
                gc.collect()
            if evaluated or (ck.save and ck.save_interval):
                interval_start = time.perf_counter()  # keep eval/save out of tokens/s
            self.stop_reason = self._should_exit(start)
            if self.stop_reason:
                self.logger.message(f"> stopping at iteration {self.iteration}: {self.stop_reason}")
                break
        if log.eval_interval and self.datasets.valid and self.iteration % log.eval_interval:
            for name, loss in self.evaluate().items():
                self.logger.valid(self.iteration, name, loss)
        if self.datasets.test and not self.stop_reason:
            for name, loss in self.evaluate(self.datasets.test).items():
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
            "stopped_early": self.stop_reason,
        }
        self.logger.write_json("run_summary.json", summary)
        if self.cfg.run.manual_gc:
            gc.enable()
        return summary

    def close(self) -> None:
        if self.logger:
            self.logger.close()


def pretrain(cfg: TrainConfig | argparse.Namespace) -> dict:
    trainer = Trainer(cfg)
    try:
        trainer.setup()
        return trainer.train()
    finally:
        trainer.close()
