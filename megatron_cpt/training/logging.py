"""Run logging: a console line, TensorBoard / Weights & Biases scalars, ``RUN_DIR/metrics.jsonl``.

``metrics.jsonl`` is the machine-readable record other tools (the run report) read; one JSON
object per line, appended and flushed as it happens so a killed run keeps what it logged::

    {"kind": "train", "iteration", "consumed_samples", "lm_loss", "lr", "grad_norm",
     "tokens_per_s", "skipped_iters", "elapsed_s"}
    {"kind": "valid", "iteration", "name", "lm_loss", "ppl"}

Only rank 0 writes; every value it writes has already been reduced over all ranks.
Weights & Biases (``--wandb-project``, the optional ``wandb`` package) gets the same scalars
under Megatron-LM's names; ``WANDB_MODE=offline`` keeps the run on disk for ``wandb sync``.
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass
class TrainRecord:
    iteration: int
    consumed_samples: int
    lm_loss: float
    lr: float
    grad_norm: float | None
    tokens_per_s: float
    skipped_iters: int
    elapsed_s: float
    tflops_per_device: float | None = None
    mfu: float | None = None


def _finite_or_none(x: float | None) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


class MetricsLogger:
    def __init__(
        self,
        run_dir: str | os.PathLike,
        tensorboard_dir: str | None = None,
        enabled: bool = True,
        train_iters: int | None = None,
        stream=None,
        wandb=None,
        wandb_config: dict | None = None,
    ):
        """``wandb``: settings with ``wandb_project``, ``wandb_exp_name``, ``wandb_save_dir``
        (a ``LoggingSettings``), or None for no W&B run."""
        self.enabled = enabled
        self.train_iters = train_iters
        self.stream = stream or sys.stdout
        self.run_dir = Path(run_dir)
        self._jsonl = None
        self._tb = None
        self._wandb = None
        if not enabled:
            return
        if tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=tensorboard_dir)
        if wandb is not None and wandb.wandb_project:
            import wandb as wandb_lib

            save_dir = Path(wandb.wandb_save_dir or self.run_dir / "wandb")
            save_dir.mkdir(parents=True, exist_ok=True)
            self._wandb = wandb_lib.init(
                project=wandb.wandb_project,
                name=wandb.wandb_exp_name,
                dir=str(save_dir),
                config=_jsonable(wandb_config or {}),
            )

    def _write(self, obj: dict) -> None:
        # NaN/Inf are not JSON; a skipped iteration's loss is written as null.
        line = json.dumps(obj, allow_nan=False)
        if self._jsonl is None:  # opened at the first record: a run refused earlier leaves none
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._jsonl = open(self.run_dir / "metrics.jsonl", "a", buffering=1)
        self._jsonl.write(line + "\n")
        self._jsonl.flush()

    def train(self, rec: TrainRecord) -> None:
        if not self.enabled:
            return
        self._write(
            {
                "kind": "train",
                "iteration": rec.iteration,
                "consumed_samples": rec.consumed_samples,
                "lm_loss": _finite_or_none(rec.lm_loss),
                "lr": rec.lr,
                "grad_norm": _finite_or_none(rec.grad_norm),
                "tokens_per_s": round(rec.tokens_per_s, 3),
                "skipped_iters": rec.skipped_iters,
                "elapsed_s": round(rec.elapsed_s, 3),
            }
        )
        total = f"/{self.train_iters}" if self.train_iters else ""
        parts = [
            f"iteration {rec.iteration:>7d}{total}",
            f"consumed samples {rec.consumed_samples}",
            f"elapsed (s) {rec.elapsed_s:.1f}",
            f"lm loss {rec.lm_loss:.6E}",
            f"lr {rec.lr:.4E}",
            f"grad norm {rec.grad_norm:.4f}" if rec.grad_norm is not None else "grad norm -",
            f"tokens/s {rec.tokens_per_s:.1f}",
            f"skipped {rec.skipped_iters}",
        ]
        if rec.tflops_per_device is not None:
            parts.append(f"TFLOP/s/GPU {rec.tflops_per_device:.1f}")
        if rec.mfu is not None:
            parts.append(f"MFU {100 * rec.mfu:.1f}%")
        print(" | ".join(parts), file=self.stream, flush=True)
        if self._tb is not None:
            step = rec.iteration
            self._tb.add_scalar("lm loss", rec.lm_loss, step)
            self._tb.add_scalar("learning-rate", rec.lr, step)
            if rec.grad_norm is not None:
                self._tb.add_scalar("grad-norm", rec.grad_norm, step)
            self._tb.add_scalar("tokens-per-second", rec.tokens_per_s, step)
            self._tb.add_scalar("skipped-iterations", rec.skipped_iters, step)
            self._tb.add_scalar("lm loss vs samples", rec.lm_loss, rec.consumed_samples)
            if rec.mfu is not None:
                self._tb.add_scalar("mfu", rec.mfu, step)
            self._tb.flush()
        if self._wandb is not None:
            values = {
                "lm loss": _finite_or_none(rec.lm_loss),
                "learning-rate": rec.lr,
                "grad-norm": _finite_or_none(rec.grad_norm),
                "tokens-per-second": rec.tokens_per_s,
                "skipped-iterations": rec.skipped_iters,
                "consumed-samples": rec.consumed_samples,
            }
            if rec.mfu is not None:
                values["mfu"] = rec.mfu
            self._wandb.log({k: v for k, v in values.items() if v is not None}, step=rec.iteration)

    def valid(self, iteration: int, name: str, loss: float) -> None:
        if not self.enabled:
            return
        ppl = math.exp(min(loss, 50.0)) if math.isfinite(loss) else None
        self._write(
            {
                "kind": "valid",
                "iteration": iteration,
                "name": name,
                "lm_loss": _finite_or_none(loss),
                "ppl": ppl,
            }
        )
        print(
            f" validation '{name}' at iteration {iteration} | lm loss {loss:.6E} | "
            f"ppl {ppl if ppl is None else f'{ppl:.4f}'}",
            file=self.stream,
            flush=True,
        )
        if self._tb is not None:
            self._tb.add_scalar(f"{name} lm loss", loss, iteration)
            if ppl is not None:
                self._tb.add_scalar(f"{name} ppl", ppl, iteration)
            self._tb.flush()
        if self._wandb is not None and math.isfinite(loss):
            values = {f"{name} lm loss": loss}
            if ppl is not None:
                values[f"{name} ppl"] = ppl
            self._wandb.log(values, step=iteration)

    def message(self, text: str) -> None:
        if self.enabled:
            print(text, file=self.stream, flush=True)

    def write_json(self, name: str, obj: dict) -> None:
        """A small JSON file in the run directory, written atomically."""
        if not self.enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / name
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _jsonable(obj):
    """Flags for the W&B run config: plain JSON values only."""
    return json.loads(json.dumps(obj, default=str))
