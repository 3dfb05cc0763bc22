"""Run configuration: Megatron-LM flag names, an optional YAML file, one typed config tree.

Why Megatron-LM's names: CPT users arrive with Megatron-LM launch scripts; the same flags (and a
YAML file holding the same keys, dashes or underscores) work here. Flags given on the command line
win over the YAML file, which wins over defaults.

Why one tree: flags, YAML and the metadata of the checkpoint a run starts from are resolved once,
here (``resolve_config``), into a ``TrainConfig`` whose sections (``arch``, ``build``, ``batch``,
``optim``, ``sched``, ``data``, ``checkpoint``, ``logging``, ``run``) are the typed settings each
training module takes; the argparse ``Namespace`` goes no further than this module. Every check
is a one-line ``UserError`` before any process group, model or dataset is built.
"""

from __future__ import annotations

import argparse
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from megatron_cpt.errors import UserError

if TYPE_CHECKING:
    from megatron_cpt.model import LlamaArch, ModelBuildConfig
    from megatron_cpt.tokenizers import Tokenizer
    from megatron_cpt.training.data import DataSettings
    from megatron_cpt.training.optimizer import OptimizerSettings, ScheduleSettings


@dataclass
class CheckpointSettings:
    save: str | None = None
    load: str | None = None
    save_interval: int | None = None
    pretrained_checkpoint: str | None = None
    keep_last: int | None = None
    no_save_optim: bool = False
    finetune: bool = False  # weights only from --load, iteration 0
    no_load_optim: bool = False  # resume without optimizer and LR-scheduler state
    no_load_rng: bool = False


@dataclass
class LoggingSettings:
    log_interval: int = 10
    eval_interval: int | None = None
    eval_iters: int = 10
    tensorboard_dir: str | None = None
    run_dir: str | None = None
    max_nan_skips: int = 5
    wandb_project: str | None = None
    wandb_exp_name: str | None = None
    wandb_save_dir: str | None = None


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group(
        "model",
        "Without --model (and no checkpoint to take it from) the architecture comes from these "
        "flags alone, with Megatron-LM's defaults: GeLU MLP unless --swiglu, LayerNorm unless "
        "--normalization RMSNorm, learned absolute positions unless --position-embedding-type "
        "rope, biases unless --disable-bias-linear, tied embeddings, dropout 0.1. With --model "
        "they override the preset's fields.",
    )
    g.add_argument(
        "--model",
        default=None,
        help="preset (llama3-8b/70b, llama3.1-8b/70b, llama3.2-1b/3b, llama3.3-70b, smollm2-135m, "
        "qwen2.5-0.5b/1.5b/7b/72b, qwen3-0.6b/8b/32b, mistral-7b, mistral-7b-v0.3) or a path "
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
    g.add_argument(
        "--group-query-attention",
        action="store_true",
        help="flags-only model: use --num-query-groups (default 1); without it, one KV group "
        "per head (Megatron-LM's rule)",
    )
    g.add_argument("--swiglu", action="store_true", help="SwiGLU MLP (default: GeLU)")
    g.add_argument("--normalization", default=None, choices=["LayerNorm", "RMSNorm"])
    g.add_argument("--position-embedding-type", default=None, choices=["learned_absolute", "rope"])
    g.add_argument("--rotary-percent", type=float, default=None)
    g.add_argument(
        "--use-rope-scaling",
        action="store_true",
        help="Llama-3.1 RoPE frequency scaling (factor --rope-scaling-factor, low 1, high 4, "
        "original 8192, as megatron-core)",
    )
    g.add_argument("--rope-scaling-factor", type=float, default=8.0)
    g.add_argument("--disable-bias-linear", action="store_true")
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true", default=None)
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    g.add_argument("--init-method-std", type=float, default=0.02)
    g.add_argument(
        "--attention-dropout",
        type=float,
        default=None,
        help="default 0.1 for a flags-only model (Megatron-LM), 0.0 for --model/checkpoint CPT",
    )
    g.add_argument("--hidden-dropout", type=float, default=None, help="as --attention-dropout")
    g.add_argument(
        "--apply-layernorm-1p",
        action="store_true",
        help="refused: zero-centred norm weights (megatron-core's torch norms refuse them)",
    )
    g.add_argument("--use-mcore-models", action="store_true", help="no-op (always mcore)")
    g.add_argument(
        "--transformer-impl",
        default=None,
        choices=["local", "transformer_engine"],
        help="default: transformer_engine when it imports, else local",
    )


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
        "--lr-warmup-samples",
        type=int,
        default=None,
        help="Megatron-LM's sample-based warmup: ceil(samples / global batch) iterations",
    )
    g.add_argument("--lr-decay-samples", type=int, default=None, help="as --lr-warmup-samples")
    g.add_argument(
        "--decoupled-lr",
        type=float,
        default=None,
        help="refused: a separate LR for embedding/output layers is not implemented",
    )
    g.add_argument(
        "--decoupled-min-lr", type=float, default=None, help="refused, as --decoupled-lr"
    )
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
    g.add_argument(
        "--fp8-recipe", default=None, choices=["delayed", "tensorwise", "mxfp8", "blockwise"]
    )
    g.add_argument("--fp8-amax-history-len", type=int, default=None)
    g.add_argument("--fp8-amax-compute-algo", default=None, choices=["max", "most_recent"])
    g.add_argument("--fp8-param-gather", action="store_true", help="refused (TE FP8 weights)")
    g.add_argument(
        "--manual-gc",
        action="store_true",
        help="Python's GC off during training, collected at evaluations and checkpoints",
    )
    g.add_argument("--empty-unused-memory-level", type=int, default=0, help="no-op")
    g.add_argument("--recompute-activations", action="store_true", help="= selective")
    g.add_argument("--recompute-granularity", default=None, choices=["full", "selective"])
    g.add_argument("--recompute-method", default=None, choices=["uniform", "block"])
    g.add_argument("--recompute-num-layers", type=int, default=None)
    g.add_argument(
        "--attention-backend",
        default="auto",
        choices=["auto", "flash", "fused", "unfused", "local"],
        help="core attention (Megatron-LM's choices). Without Transformer Engine: auto = PyTorch "
        "SDPA (flash/cuDNN kernels on a GPU, the fused kernel on a CPU), flash / fused = SDPA "
        "restricted to those GPU kernels, unfused / local = megatron-core's DotProductAttention",
    )
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument(
        "--exit-duration-in-mins",
        type=float,
        default=None,
        help="save (with --save) and exit 0 after the iteration at which this process's "
        "training loop has run this long",
    )
    g.add_argument(
        "--exit-signal-handler",
        action="store_true",
        help="on SIGTERM: finish the iteration, save (with --save) and exit 0",
    )
    g.add_argument(
        "--max-nan-skips",
        type=int,
        default=5,
        help="stop after this many consecutive iterations with NaN/Inf loss or grad norm",
    )


def _add_data_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("data")
    g.add_argument("--data-path", nargs="+", default=None, help="W1 PREFIX1 W2 PREFIX2 ...")
    g.add_argument(
        "--train-data-path",
        nargs="+",
        default=None,
        help="instead of --data-path: the training blend only (--split is then not used)",
    )
    g.add_argument("--split", default="969,30,1")
    g.add_argument(
        "--valid-data-path",
        nargs="+",
        default=[],
        metavar="NAME=PREFIX|W PREFIX",
        help="NAME=PREFIX ... adds one named validation set each; Megatron-LM's [W1] P1 [W2 "
        "P2 ...] is one blended set 'valid' replacing the --split valid part "
        "(one set per prefix with --multiple-validation-sets)",
    )
    g.add_argument("--multiple-validation-sets", action="store_true")
    g.add_argument(
        "--test-data-path",
        nargs="+",
        default=[],
        help="[W1] P1 ...: evaluated once at the end of training, logged as 'test'",
    )
    g.add_argument(
        "--mock-data",
        action="store_true",
        help="megatron-core's MockGPTDataset instead of shards (smoke runs; no --data-path)",
    )
    g.add_argument(
        "--sft",
        action="store_true",
        help="supervised fine-tuning: --data-path/--valid-data-path name PREFIX_tokens of "
        "tools/preprocess_sft.py pairs; loss on assistant tokens only, averaged per token "
        "(docs/sft.md)",
    )
    g.add_argument(
        "--lora-rank",
        type=int,
        default=0,
        help="train LoRA adapters of this rank on a frozen base (0: full fine-tuning)",
    )
    g.add_argument(
        "--lora-alpha", type=float, default=None, help="LoRA scale alpha/rank (default: rank)"
    )
    g.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the adapters' input")
    g.add_argument(
        "--lora-target",
        default="linear_qkv,linear_proj,linear_fc1,linear_fc2",
        help="comma-separated megatron-core linears that get adapters",
    )
    g.add_argument("--data-cache-path", default=None)
    g.add_argument("--tokenizer-type", default=None)
    g.add_argument("--tokenizer-model", default=None)
    g.add_argument("--eod-mask-loss", action="store_true")
    g.add_argument("--reset-position-ids", action="store_true")
    g.add_argument("--reset-attention-mask", action="store_true")
    g.add_argument(
        "--num-workers", type=int, default=0, help="DataLoader worker processes for training"
    )
    g.add_argument(
        "--no-mmap-bin-files",
        dest="mmap_bin_files",
        action="store_false",
        help="read .bin shards with file reads instead of mmap",
    )
    g.add_argument("--no-create-attention-mask-in-dataloader", action="store_true", help="no-op")
    g.add_argument("--tiktoken-pattern", default=None, choices=["v1", "v2"], help="no-op")


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
    g.add_argument(
        "--finetune",
        action="store_true",
        help="load only the weights from --load and start at iteration 0 (fresh optimizer)",
    )
    g.add_argument("--no-load-optim", action="store_true", help="resume without optimizer/LR state")
    g.add_argument("--no-load-rng", action="store_true", help="resume without RNG state")
    g.add_argument(
        "--ckpt-format", default="torch_dist", choices=["torch_dist"], help="the only format"
    )


def _add_logging_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("logging")
    g.add_argument("--log-interval", type=int, default=10)
    g.add_argument("--eval-interval", type=int, default=None)
    g.add_argument("--eval-iters", type=int, default=10)
    g.add_argument("--tensorboard-dir", default=None)
    g.add_argument("--log-throughput", action="store_true", help="no-op (always logged)")
    g.add_argument("--profile", action="store_true", help="refused (no profiler hook)")
    g.add_argument("--profile-step-start", type=int, default=None, help="refused with --profile")
    g.add_argument("--profile-step-end", type=int, default=None, help="refused with --profile")
    g.add_argument("--distributed-timeout-minutes", type=int, default=30)
    g.add_argument("--wandb-project", default=None, help="needs the 'wandb' extra")
    g.add_argument("--wandb-exp-name", default=None)
    g.add_argument("--wandb-save-dir", default=None, help="default: RUN_DIR/wandb")
    g.add_argument(
        "--run-dir",
        default=None,
        help="where metrics.jsonl and run_summary.json go (default: --save, else runs/pretrain)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pretrain.py",
        description="Continual pre-training of Llama-layout models (Llama, Mistral, Qwen2.5, Qwen3) on megatron-core.",
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
    # A negative flag (``no-mmap-bin-files: true``) is spelled by its option, not its dest.
    negated = {
        o.lstrip("-").replace("-", "_"): a
        for a in parser._actions
        if isinstance(a, argparse._StoreFalseAction)
        for o in a.option_strings
    }
    lines = {}
    for i, raw in enumerate(text.splitlines(), 1):
        key = raw.split(":", 1)[0].strip()
        if key and not raw.startswith((" ", "#", "-")):
            lines.setdefault(key, i)
    out = {}
    for key, value in data.items():
        dest = str(key).lstrip("-").replace("-", "_")
        if dest in negated:
            if not isinstance(value, bool):
                raise UserError(f"{path}:{lines.get(key, '?')}: key '{key}' expects true/false")
            out[negated[dest].dest] = not value
            continue
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


@dataclass
class RunSettings:
    """Run control: seeding and when to stop early (cluster time limits, pre-emption)."""

    seed: int = 1234
    exit_duration_in_mins: float | None = None
    exit_signal: int | None = None  # signal.SIGTERM with --exit-signal-handler
    manual_gc: bool = False
    distributed_timeout_minutes: int = 30
    record: dict = field(default_factory=dict)  # the flags as given, saved with checkpoints


@dataclass
class TrainConfig:
    """Everything the trainer needs, resolved and validated; one typed section per module."""

    arch: LlamaArch
    arch_source: str
    build: ModelBuildConfig
    batch: BatchSettings
    optim: OptimizerSettings
    sched: ScheduleSettings
    data: DataSettings
    tokenizer: Tokenizer
    checkpoint: CheckpointSettings
    logging: LoggingSettings
    run: RunSettings
    lora: object | None = None  # megatron_cpt.model.lora.LoraSettings when --lora-rank > 0


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


# ------------------------------------------------------------------------------------------
# Resolution: flags (+ YAML) + checkpoint metadata -> TrainConfig
# ------------------------------------------------------------------------------------------


def _world_size() -> int:
    import os

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def _check_flags(args: argparse.Namespace) -> None:
    """Flags we accept but cannot honour here, and plain value errors: one line each."""
    from megatron_cpt import platform

    if args.lr < 0:
        raise UserError(f"--lr must be >= 0, got {args.lr}")
    if args.min_lr < 0:
        raise UserError(f"--min-lr must be >= 0, got {args.min_lr}")
    if args.log_interval < 1:
        raise UserError(f"--log-interval must be >= 1, got {args.log_interval}")
    if args.eval_interval is not None and args.eval_interval < 1:
        raise UserError(f"--eval-interval must be >= 1, got {args.eval_interval}")
    if args.eval_iters < 1:
        raise UserError(f"--eval-iters must be >= 1, got {args.eval_iters}")
    if args.make_vocab_size_divisible_by < 1:
        raise UserError(
            f"--make-vocab-size-divisible-by must be >= 1, got {args.make_vocab_size_divisible_by}"
        )
    if args.num_workers < 0:
        raise UserError(f"--num-workers must be >= 0, got {args.num_workers}")
    if args.exit_duration_in_mins is not None and args.exit_duration_in_mins <= 0:
        raise UserError(f"--exit-duration-in-mins must be > 0, got {args.exit_duration_in_mins}")
    for flag in ("attention_dropout", "hidden_dropout"):
        value = getattr(args, flag)
        if value is not None and not 0.0 <= value < 1.0:
            raise UserError(f"--{flag.replace('_', '-')} must be in [0, 1), got {value}")
    for flag in ("decoupled_lr", "decoupled_min_lr"):
        if getattr(args, flag) is not None:
            raise UserError(
                f"--{flag.replace('_', '-')}: a separate learning rate for the embedding and "
                "output layers is not implemented; drop the flag"
            )
    if args.profile or args.profile_step_start is not None or args.profile_step_end is not None:
        raise UserError(
            "--profile: no profiler hook in this trainer; drop --profile/--profile-step-*"
        )
    if args.distributed_timeout_minutes < 1:
        raise UserError(
            f"--distributed-timeout-minutes must be >= 1, got {args.distributed_timeout_minutes}"
        )
    for flag in ("lr_warmup_samples", "lr_decay_samples"):
        value = getattr(args, flag)
        if value is not None and value < 0:
            raise UserError(f"--{flag.replace('_', '-')} must be >= 0, got {value}")
    if args.lr_warmup_samples is not None and (
        args.lr_warmup_iters or args.lr_warmup_fraction is not None
    ):
        raise UserError("give one of --lr-warmup-samples, --lr-warmup-iters, --lr-warmup-fraction")
    if args.lr_decay_samples is not None and args.lr_decay_iters is not None:
        raise UserError("give either --lr-decay-samples or --lr-decay-iters, not both")
    if args.apply_layernorm_1p:
        raise UserError(
            "--apply-layernorm-1p: zero-centred norm weights are not supported (megatron-core's "
            "local-spec torch norms refuse them and HF Llama has no equivalent); drop the flag"
        )
    te = platform.have_transformer_engine()
    if args.transformer_impl == "transformer_engine" and not te:
        raise UserError(
            "--transformer-impl transformer_engine: Transformer Engine does not import here "
            "(it needs a GPU with TE installed); use --transformer-impl local"
        )
    for flag in ("fp8_recipe", "fp8_amax_history_len", "fp8_amax_compute_algo"):
        if getattr(args, flag) is not None and not args.fp8_format:
            raise UserError(f"--{flag.replace('_', '-')} needs --fp8-format (FP8 training)")
    if args.fp8_param_gather and not args.fp8_format:
        raise UserError("--fp8-param-gather needs --fp8-format (FP8 training)")
    if args.fp8_format and (not te or args.transformer_impl == "local"):
        raise UserError("--fp8-format needs Transformer Engine (a GPU with TE installed)")
    if args.recompute_granularity != "full":
        for flag in ("recompute_method", "recompute_num_layers"):
            if getattr(args, flag) is not None:
                raise UserError(f"--{flag.replace('_', '-')} needs --recompute-granularity full")
    if args.recompute_num_layers is not None and args.recompute_num_layers < 1:
        raise UserError(f"--recompute-num-layers must be >= 1, got {args.recompute_num_layers}")
    if args.recompute_activations and args.recompute_granularity == "full":
        raise UserError(
            "--recompute-activations means --recompute-granularity selective; give one of them"
        )
    if args.wandb_project:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise UserError(
                "--wandb-project: the 'wandb' package is not installed "
                "(pip install 'megatron-cpt[wandb]')"
            ) from None
    if args.finetune and not args.load:
        raise UserError("--finetune needs --load (the checkpoint whose weights to start from)")
    if args.finetune and args.pretrained_checkpoint:
        raise UserError("give either --finetune --load DIR or --pretrained-checkpoint DIR")
    sources = [f for f in ("data_path", "train_data_path", "mock_data") if getattr(args, f)]
    if len(sources) > 1:
        names = " and ".join("--" + f.replace("_", "-") for f in sources)
        raise UserError(f"{names}: give only one source of training data")


def _ffn_default(hidden: int, swiglu: bool) -> int:
    """Megatron-LM's default FFN size: 4h, or 2/3 of it rounded down to 64 for SwiGLU."""
    return int((4 * hidden * 2 / 3) / 64) * 64 if swiglu else 4 * hidden


def _arch_from_flags(args: argparse.Namespace, vocab_size: int) -> LlamaArch:
    """A model defined by Megatron-LM flags alone, with Megatron-LM's defaults."""
    from megatron_cpt.model import LlamaArch, RopeScaling

    for flag in ("num_layers", "hidden_size", "num_attention_heads"):
        if getattr(args, flag) is None:
            raise UserError(
                f"--{flag.replace('_', '-')} is required without --model (give a preset, an HF "
                "config.json, or the full shape as Megatron-LM flags)"
            )
    heads = args.num_attention_heads
    groups = (args.num_query_groups or 1) if args.group_query_attention else heads
    rope = (args.position_embedding_type or "learned_absolute") == "rope"
    return LlamaArch(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        ffn_hidden_size=args.ffn_hidden_size or _ffn_default(args.hidden_size, args.swiglu),
        num_attention_heads=heads,
        num_query_groups=groups,
        vocab_size=vocab_size,
        max_position_embeddings=args.max_position_embeddings or args.seq_length,
        rope_theta=args.rotary_base if args.rotary_base is not None else 10000.0,
        rope_scaling=RopeScaling(factor=args.rope_scaling_factor)
        if args.use_rope_scaling
        else None,
        norm_eps=args.norm_epsilon if args.norm_epsilon is not None else 1e-5,
        tie_word_embeddings=not args.untie_embeddings_and_output_weights,
        head_dim=args.kv_channels,
        normalization=args.normalization or "LayerNorm",
        swiglu=bool(args.swiglu),
        position_embedding_type="rope" if rope else "learned_absolute",
        rotary_percent=args.rotary_percent if args.rotary_percent is not None else 1.0,
        add_bias_linear=not args.disable_bias_linear,
    ).validate()


def _apply_overrides(arch: LlamaArch, args: argparse.Namespace) -> LlamaArch:
    """Shape/architecture flags on top of a preset, HF config or checkpoint architecture.
    (Store-true flags such as --swiglu cannot turn a Llama choice off, so only the valued
    ones change it.)"""
    from megatron_cpt.model import RopeScaling

    tie = None
    if args.untie_embeddings_and_output_weights:
        tie = False
    return arch.replace(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        ffn_hidden_size=args.ffn_hidden_size,
        num_attention_heads=args.num_attention_heads,
        num_query_groups=args.num_query_groups,
        head_dim=args.kv_channels,
        max_position_embeddings=args.max_position_embeddings,
        rope_theta=args.rotary_base,
        rope_scaling=RopeScaling(factor=args.rope_scaling_factor)
        if args.use_rope_scaling
        else None,
        norm_eps=args.norm_epsilon,
        # With a NullTokenizer, --vocab-size sizes the tokenizer (Megatron-LM), not the model.
        vocab_size=None if args.tokenizer_type == "NullTokenizer" else args.vocab_size,
        tie_word_embeddings=tie,
        normalization=args.normalization,
        position_embedding_type=args.position_embedding_type,
        rotary_percent=args.rotary_percent,
        add_bias_linear=False if args.disable_bias_linear else None,
    ).validate()


def resolve_arch(args: argparse.Namespace) -> tuple[LlamaArch | None, str]:
    """The architecture: ``--model``, else the checkpoint we start from, else flags alone
    (then returned as None: its vocabulary comes from the tokenizer, built later)."""
    from megatron_cpt.model import get_arch
    from megatron_cpt.training import checkpointing

    if args.model is not None:
        return _apply_overrides(get_arch(args.model), args), args.model
    for ckpt in (args.save, args.load, args.pretrained_checkpoint):
        if ckpt and (
            checkpointing.latest_iteration(ckpt) is not None
            or (Path(ckpt) / checkpointing.METADATA_FILE).exists()
        ):
            return _apply_overrides(checkpointing.read_metadata(ckpt)["arch"], args), ckpt
    return None, "flags"


def _build_tokenizer(args: argparse.Namespace) -> Tokenizer:
    from megatron_cpt.tokenizers import NullTokenizer, build_tokenizer

    if args.tokenizer_type == "NullTokenizer":
        return NullTokenizer(args.vocab_size)
    if not args.tokenizer_type or not args.tokenizer_model:
        raise UserError("--tokenizer-type and --tokenizer-model are required (the data's EOD id)")
    return build_tokenizer(args.tokenizer_type, args.tokenizer_model)


def _record(args: argparse.Namespace, build: ModelBuildConfig) -> dict:
    """The flags as given, plus the values resolved from defaults that a resume must keep."""
    record = {k: v for k, v in vars(args).items()}
    record["resolved"] = {
        "attention_dropout": build.attention_dropout,
        "hidden_dropout": build.hidden_dropout,
    }
    return record


def _saved_dropout(args: argparse.Namespace, arch_source: str) -> dict:
    """The dropout a run resumed from ``--save``/``--load`` was using (a flags-only run's 0.1
    stays 0.1 when its restart omits the shape flags and takes the checkpoint's architecture)."""
    from megatron_cpt.training import checkpointing

    if arch_source not in (args.save, args.load) or not checkpointing.checkpoint_exists(
        arch_source
    ):
        return {}
    saved = checkpointing.read_metadata(arch_source).get("args") or {}
    return saved.get("resolved") or {}


def resolve_config(args: argparse.Namespace) -> TrainConfig:
    """Every config check that needs no process group, model or data: one line, before compute."""
    from megatron_cpt import platform
    from megatron_cpt.model import ModelBuildConfig, validate_parallelism
    from megatron_cpt.training import checkpointing, context_parallel
    from megatron_cpt.training.data import (
        DataSettings,
        check_prefix,
        parse_blend,
        parse_split,
        parse_validation_sets,
    )
    from megatron_cpt.training.optimizer import (
        OptimizerSettings,
        ScheduleSettings,
        validate_ddp_flags,
    )

    _check_flags(args)
    world = _world_size()
    # --load DIR --save DIR (the same directory) is Megatron-LM's auto-resume idiom: a first
    # run finds nothing there and starts from scratch. A --load elsewhere must hold a checkpoint.
    same_as_save = args.save and Path(args.load or "").resolve() == Path(args.save).resolve()
    if (
        args.load
        and not checkpointing.checkpoint_exists(args.load)
        and not args.pretrained_checkpoint
        and not (same_as_save and not args.finetune)
    ):
        raise UserError(
            f"--load {args.load}: no published checkpoint there (give --pretrained-checkpoint "
            "for a CPT start, or drop --load to train from scratch)"
        )
    arch, arch_source = resolve_arch(args)
    flags_only = arch is None
    if flags_only:
        # Validate the shape now; the vocabulary (from the tokenizer) is filled in below.
        arch = _arch_from_flags(args, vocab_size=args.vocab_size or 1)
    # Megatron-LM's 0.1 for a flags-only model; 0.0 for CPT of a preset/HF model (Llama);
    # a resumed run keeps what it used.
    saved = {} if flags_only else _saved_dropout(args, arch_source)
    default_dropout = 0.1 if flags_only else 0.0
    use_te = {None: None, "local": False, "transformer_engine": True}[args.transformer_impl]
    build = ModelBuildConfig(
        tensor_parallel=args.tensor_model_parallel_size,
        pipeline_parallel=args.pipeline_model_parallel_size,
        context_parallel=args.context_parallel_size,
        sequence_parallel=args.sequence_parallel,
        bf16=args.bf16,
        fp8_format=args.fp8_format,
        fp8_recipe=args.fp8_recipe,
        fp8_amax_history_len=args.fp8_amax_history_len,
        fp8_amax_compute_algo=args.fp8_amax_compute_algo,
        recompute_activations=args.recompute_activations,
        recompute_granularity=args.recompute_granularity,
        recompute_method=args.recompute_method,
        recompute_num_layers=args.recompute_num_layers,
        attention_dropout=(
            args.attention_dropout
            if args.attention_dropout is not None
            else saved.get("attention_dropout", default_dropout)
        ),
        hidden_dropout=(
            args.hidden_dropout
            if args.hidden_dropout is not None
            else saved.get("hidden_dropout", default_dropout)
        ),
        init_method_std=args.init_method_std,
        make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
        attention_backend=args.attention_backend,
        calculate_per_token_loss=args.calculate_per_token_loss,
        cross_entropy_loss_fusion=args.cross_entropy_loss_fusion,
        use_transformer_engine=use_te,
    )
    context_parallel.validate(
        build.context_parallel, args.seq_length, platform.have_transformer_engine()
    )
    validate_parallelism(arch, build, world)
    if build.recompute_granularity == "full" and (build.recompute_num_layers or 1) > (
        arch.num_layers // build.pipeline_parallel
    ):
        raise UserError(
            f"--recompute-num-layers {build.recompute_num_layers} exceeds the layers per "
            f"pipeline stage ({arch.num_layers // build.pipeline_parallel})"
        )
    dp = world // (build.tensor_parallel * build.pipeline_parallel * build.context_parallel)
    batch = batch_settings(args, dp)
    arch.check_sequence_length(args.seq_length, "--seq-length")  # positions; Mistral's window
    train_flag = "--train-data-path" if args.train_data_path else "--data-path"
    train_path = args.train_data_path or args.data_path
    if not train_path and not args.mock_data:
        raise UserError(
            "--data-path: give the training shards (W1 PREFIX1 W2 PREFIX2 ...), or --mock-data"
        )
    if train_path:
        prefixes, _ = parse_blend(train_path, train_flag)
        for p in prefixes:
            check_prefix(p, train_flag)
    valid_sets = parse_validation_sets(args.valid_data_path, args.multiple_validation_sets)
    for prefixes, _ in valid_sets.values():
        for p in prefixes:
            check_prefix(p, "--valid-data-path")
    if args.test_data_path:
        for p in parse_blend(args.test_data_path, "--test-data-path")[0]:
            check_prefix(p, "--test-data-path")
    parse_split(args.split)
    tokenizer = _build_tokenizer(args)
    if flags_only:
        # Megatron-LM: the vocabulary is the tokenizer's (padded later by
        # --make-vocab-size-divisible-by x TP); --vocab-size sizes a NullTokenizer, or widens it.
        vocab = tokenizer.vocab_size
        if args.vocab_size and args.tokenizer_type != "NullTokenizer":
            vocab = args.vocab_size
        arch = arch.replace(vocab_size=vocab)
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
    if args.save_interval is not None and args.save_interval < 1:
        raise UserError("--save-interval must be >= 1")
    if args.save_interval and not args.save:
        raise UserError("--save-interval needs --save DIR")
    if args.keep_last is not None and args.keep_last < 1:
        raise UserError("--keep-last must be >= 1")
    gbs = batch.global_batch_size
    decay_iters = args.lr_decay_iters
    if args.lr_decay_samples is not None:  # Megatron-LM's sample-based schedule, constant gbs
        decay_iters = -(-args.lr_decay_samples // gbs)
    warmup = args.lr_warmup_iters
    if args.lr_warmup_samples is not None:
        warmup = -(-args.lr_warmup_samples // gbs)
    if args.lr_warmup_fraction is not None:
        warmup = int(args.lr_warmup_fraction * (decay_iters or batch.train_iters))
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
        lr_decay_iters=decay_iters,
        lr_decay_style=args.lr_decay_style,
        lr_wsd_decay_iters=args.lr_wsd_decay_iters,
        lr_wsd_decay_style=args.lr_wsd_decay_style,
    )
    sched.validate()
    data = DataSettings(
        data_path=list(args.data_path or []),
        train_data_path=list(args.train_data_path or []),
        split=args.split,
        valid_sets=valid_sets,
        valid_replaces_split=bool(valid_sets) and not _named_form(args.valid_data_path),
        test_data_path=list(args.test_data_path or []),
        mock=args.mock_data,
        data_cache_path=args.data_cache_path,
        seq_length=args.seq_length,
        seed=args.seed,
        eod_mask_loss=args.eod_mask_loss,
        reset_position_ids=args.reset_position_ids,
        reset_attention_mask=args.reset_attention_mask,
        num_workers=args.num_workers,
        mmap_bin_files=args.mmap_bin_files,
        sft=getattr(args, "sft", False),
    )
    if data.sft:
        from megatron_cpt.training.sft_data import check_sft_settings

        check_sft_settings(data)
    lora = None
    if getattr(args, "lora_rank", 0):
        from megatron_cpt.model.lora import lora_settings_from_flags

        lora = lora_settings_from_flags(args)
    return TrainConfig(
        lora=lora,
        arch=arch,
        arch_source=arch_source,
        build=build,
        batch=batch,
        optim=optim,
        sched=sched,
        data=data,
        tokenizer=tokenizer,
        checkpoint=CheckpointSettings(
            save=args.save,
            load=args.load,
            save_interval=args.save_interval,
            pretrained_checkpoint=args.pretrained_checkpoint,
            keep_last=args.keep_last,
            no_save_optim=args.no_save_optim,
            finetune=args.finetune,
            no_load_optim=args.no_load_optim,
            no_load_rng=args.no_load_rng,
        ),
        logging=LoggingSettings(
            log_interval=args.log_interval,
            eval_interval=args.eval_interval,
            eval_iters=args.eval_iters,
            tensorboard_dir=args.tensorboard_dir,
            run_dir=args.run_dir or args.save or "runs/pretrain",
            max_nan_skips=args.max_nan_skips,
            wandb_project=args.wandb_project,
            wandb_exp_name=args.wandb_exp_name,
            wandb_save_dir=args.wandb_save_dir,
        ),
        run=RunSettings(
            seed=args.seed,
            exit_duration_in_mins=args.exit_duration_in_mins,
            exit_signal=signal.SIGTERM if args.exit_signal_handler else None,
            manual_gc=args.manual_gc,
            distributed_timeout_minutes=args.distributed_timeout_minutes,
            record=_record(args, build),
        ),
    )


def _named_form(items: list[str]) -> bool:
    return bool(items) and all("=" in str(x) for x in items)


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
