"""Run configuration: Megatron-LM flag names, an optional YAML file, typed component configs.

Why Megatron-LM's names: CPT users arrive with Megatron-LM launch scripts; the same flags (and a
YAML file holding the same keys, dashes or underscores) work here. Flags given on the command line
win over the YAML file, which wins over defaults. Everything is validated into one-line
``UserError``s before any process group, model or dataset is built.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_cpt.errors import UserError


@dataclass
class CheckpointSettings:
    save: str | None = None
    load: str | None = None
    save_interval: int | None = None
    pretrained_checkpoint: str | None = None
    keep_last: int | None = None
    no_save_optim: bool = False


@dataclass
class LoggingSettings:
    log_interval: int = 10
    eval_interval: int | None = None
    eval_iters: int = 10
    tensorboard_dir: str | None = None
    run_dir: str | None = None
    max_nan_skips: int = 5


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model")
    g.add_argument(
        "--model",
        default=None,
        help="preset (llama3-8b, llama3-70b, llama3.1-8b, llama3.1-70b, smollm2-135m) or a path "
        "to an HF config.json / model directory; with --pretrained-checkpoint/--load the "
        "checkpoint's own architecture is used unless given explicitly",
    )
    for flag, typ in (
        ("--num-layers", int),
        ("--hidden-size", int),
        ("--ffn-hidden-size", int),
        ("--num-attention-heads", int),
        ("--num-query-groups", int),
        ("--kv-channels", int),
        ("--max-position-embeddings", int),
        ("--rotary-base", float),
        ("--norm-epsilon", float),
        ("--vocab-size", int),
    ):
        g.add_argument(flag, type=typ, default=None)
    g.add_argument("--group-query-attention", action="store_true", help="accepted for Megatron-LM")
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true", default=None)
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    g.add_argument("--init-method-std", type=float, default=0.02)


def _add_parallel_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--context-parallel-size", type=int, default=1)
    g.add_argument("--sequence-parallel", action="store_true")
    g.add_argument("--use-distributed-optimizer", action="store_true")


def _add_training_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, default=1)
    g.add_argument("--global-batch-size", type=int, default=None)
    g.add_argument("--seq-length", type=int, default=2048)
    g.add_argument("--train-iters", type=int, default=None)
    g.add_argument("--train-samples", type=int, default=None)
    g.add_argument("--lr", type=float, default=3e-5)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-warmup-fraction", type=float, default=None)
    g.add_argument("--lr-warmup-init", type=float, default=0.0)
    g.add_argument("--lr-decay-iters", type=int, default=None)
    g.add_argument(
        "--lr-decay-style",
        default="cosine",
        choices=["cosine", "linear", "constant", "WSD", "inverse-square-root"],
    )
    g.add_argument("--lr-wsd-decay-iters", type=int, default=None)
    g.add_argument(
        "--lr-wsd-decay-style",
        default="minus_sqrt",
        choices=["minus_sqrt", "linear", "cosine", "exponential"],
        help="WSD cooldown shape; minus_sqrt is (1 - sqrt(t))",
    )
    g.add_argument("--weight-decay", type=float, default=0.1)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.95)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--bf16", action="store_true")
    g.add_argument("--fp8-format", default=None, choices=["e4m3", "hybrid"])
    g.add_argument("--recompute-activations", action="store_true")
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument(
        "--max-nan-skips",
        type=int,
        default=5,
        help="stop after this many consecutive iterations with NaN/Inf loss or grad norm",
    )


def _add_data_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("data")
    g.add_argument("--data-path", nargs="+", default=None, help="W1 PREFIX1 W2 PREFIX2 ...")
    g.add_argument("--split", default="969,30,1")
    g.add_argument("--valid-data-path", nargs="+", default=[], metavar="NAME=PREFIX")
    g.add_argument("--data-cache-path", default=None)
    g.add_argument("--tokenizer-type", default=None)
    g.add_argument("--tokenizer-model", default=None)
    g.add_argument("--eod-mask-loss", action="store_true")
    g.add_argument("--reset-position-ids", action="store_true")
    g.add_argument("--reset-attention-mask", action="store_true")
    g.add_argument("--num-workers", type=int, default=0)


def _add_checkpoint_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("checkpointing")
    g.add_argument("--save", default=None)
    g.add_argument("--load", default=None)
    g.add_argument("--save-interval", type=int, default=None)
    g.add_argument(
        "--pretrained-checkpoint",
        default=None,
        help="CPT start: load weights only (fresh optimizer, iteration 0, LR re-warm) unless "
        "--save/--load already holds a checkpoint, which is then resumed",
    )
    g.add_argument("--keep-last", type=int, default=None)
    g.add_argument("--no-save-optim", action="store_true")


def _add_logging_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("logging")
    g.add_argument("--log-interval", type=int, default=10)
    g.add_argument("--eval-interval", type=int, default=None)
    g.add_argument("--eval-iters", type=int, default=10)
    g.add_argument("--tensorboard-dir", default=None)
    g.add_argument(
        "--run-dir",
        default=None,
        help="where metrics.jsonl and run_summary.json go (default: --save, else runs/pretrain)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pretrain.py",
        description="Continual pre-training of Llama-family models on megatron-core.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--config", default=None, help="YAML file with the same keys as the flags")
    _add_model_args(parser)
    _add_parallel_args(parser)
    _add_training_args(parser)
    _add_data_args(parser)
    _add_checkpoint_args(parser)
    _add_logging_args(parser)
    add_optimizer_path_args(parser)
    return parser


def _yaml_defaults(parser: argparse.ArgumentParser, path: str) -> dict[str, Any]:
    import yaml

    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise UserError(f"--config {path}: file not found") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f"{mark.line + 1}:" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UserError(f"{path}:{line} invalid YAML ({problem})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of flag names to values")
    known = {a.dest: a for a in parser._actions}
    lines = {}
    for i, raw in enumerate(text.splitlines(), 1):
        key = raw.split(":", 1)[0].strip()
        if key and not raw.startswith((" ", "#", "-")):
            lines.setdefault(key, i)
    out = {}
    for key, value in data.items():
        dest = str(key).lstrip("-").replace("-", "_")
        if dest not in known or dest in ("help", "config"):
            raise UserError(f"{path}:{lines.get(key, '?')}: unknown key '{key}'")
        action = known[dest]
        if action.nargs in ("+", "*") and value is not None and not isinstance(value, list):
            value = str(value).split()
        if action.nargs in ("+", "*") and isinstance(value, list):
            value = [str(v) for v in value]
        elif action.type is not None and value is not None:
            try:
                value = action.type(value)
            except (TypeError, ValueError):
                raise UserError(
                    f"{path}:{lines.get(key, '?')}: key '{key}' expects {action.type.__name__}, "
                    f"got {value!r}"
                ) from None
        if action.choices is not None and value is not None and value not in action.choices:
            raise UserError(
                f"{path}:{lines.get(key, '?')}: key '{key}' must be one of {list(action.choices)}"
            )
        out[dest] = value
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Flags > YAML ``--config`` > defaults."""
    parser = build_parser()
    pre, _ = parser.parse_known_args(argv)
    if pre.config:
        parser.set_defaults(**_yaml_defaults(parser, pre.config))
    return parser.parse_args(argv)


def checkpoint_settings(args: argparse.Namespace) -> CheckpointSettings:
    return CheckpointSettings(
        save=args.save,
        load=args.load,
        save_interval=args.save_interval,
        pretrained_checkpoint=args.pretrained_checkpoint,
        keep_last=args.keep_last,
        no_save_optim=args.no_save_optim,
    )


def logging_settings(args: argparse.Namespace) -> LoggingSettings:
    return LoggingSettings(
        log_interval=args.log_interval,
        eval_interval=args.eval_interval,
        eval_iters=args.eval_iters,
        tensorboard_dir=args.tensorboard_dir,
        run_dir=args.run_dir or args.save or "runs/pretrain",
        max_nan_skips=args.max_nan_skips,
    )


@dataclass
class BatchSettings:
    micro_batch_size: int
    global_batch_size: int
    data_parallel_size: int
    train_iters: int
    seq_length: int

    @property
    def num_microbatches(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.data_parallel_size)

    @property
    def train_samples(self) -> int:
        return self.train_iters * self.global_batch_size


def batch_settings(args: argparse.Namespace, data_parallel_size: int) -> BatchSettings:
    """Megatron-LM's batch arithmetic, with its config errors as one line each."""
    mbs = args.micro_batch_size
    if mbs < 1:
        raise UserError(f"--micro-batch-size must be >= 1, got {mbs}")
    gbs = args.global_batch_size or mbs * data_parallel_size
    if gbs % (mbs * data_parallel_size):
        raise UserError(
            f"--global-batch-size {gbs} is not divisible by micro-batch-size x data-parallel "
            f"size = {mbs} x {data_parallel_size}"
        )
    if args.seq_length < 1:
        raise UserError(f"--seq-length must be >= 1, got {args.seq_length}")
    if args.train_iters is not None and args.train_samples is not None:
        raise UserError("give either --train-iters or --train-samples, not both")
    if args.train_iters is None and args.train_samples is None:
        raise UserError("give --train-iters or --train-samples")
    iters = args.train_iters if args.train_iters is not None else -(-args.train_samples // gbs)
    if iters < 1:
        raise UserError(f"--train-iters must be >= 1, got {iters}")
    return BatchSettings(mbs, gbs, data_parallel_size, iters, args.seq_length)


@dataclass
class ResolvedConfig:
    """Everything the trainer needs, already validated."""

    args: argparse.Namespace
    batch: BatchSettings
    checkpoint: CheckpointSettings
    logging: LoggingSettings
    extra: dict = field(default_factory=dict)


def add_optimizer_path_args(parser: argparse.ArgumentParser) -> None:
    """Megatron-LM's flags for how gradients and parameters move (issue 14, part B)."""
    g = parser.add_argument_group("gradient reduction and overlap")
    g.add_argument(
        "--overlap-grad-reduce",
        action="store_true",
        help="reduce each gradient bucket during backward instead of after it",
    )
    g.add_argument(
        "--overlap-param-gather",
        action="store_true",
        help="with --use-distributed-optimizer: all-gather updated parameters bucket by bucket "
        "during the next forward",
    )
    g.add_argument(
        "--grad-reduce-in-bf16",
        action="store_true",
        help="reduce gradients in bf16 instead of fp32 (halves the reduce traffic)",
    )
    g.add_argument(
        "--calculate-per-token-loss",
        action="store_true",
        help="scale gradients by the global number of loss tokens instead of averaging "
        "per-micro-batch means",
    )
    g.add_argument(
        "--cross-entropy-loss-fusion",
        action="store_true",
        help="megatron-core's fused (native, TE-free) vocab-parallel cross entropy; on CPU a "
        "no-op (the fusion is a CUDA kernel)",
    )
