"""Megatron-LM launch flags (issue 14, part A): a model defined by flags alone with Megatron-LM's
defaults, each non-Llama choice really built by megatron-core, one-line refusals before compute,
the typed config tree, and a real Megatron-LM Llama-3 launch script's flag set run on CPU."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from megatron_cpt import platform
from megatron_cpt.config import (
    BatchSettings,
    CheckpointSettings,
    LoggingSettings,
    RunSettings,
    TrainConfig,
    parse_args,
    resolve_config,
)
from megatron_cpt.errors import UserError
from megatron_cpt.model import ModelBuildConfig, build_model, build_transformer_config
from megatron_cpt.model.builder import padded_vocab_size
from megatron_cpt.training.data import DataSettings, MicroBatches, worker_batches
from megatron_cpt.training.optimizer import OptimizerSettings, ScheduleSettings

REPO = Path(__file__).resolve().parent.parent
PRETRAIN = str(REPO / "tools" / "pretrain.py")

# A flags-only model: no --model, no checkpoint; Megatron-LM's defaults for everything else.
SHAPE = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
         "--seq-length", "32", "--max-position-embeddings", "64",
         "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "2"]  # fmt: skip
MOCK = ["--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "1000"]


def _resolve(*flags: str) -> TrainConfig:
    return resolve_config(parse_args([*SHAPE, *MOCK, *flags]))


def _env(**extra: str) -> dict:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    env.update(extra)
    return env


def _run(args: list[str], timeout: int = 300, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, PRETRAIN, *args],
        cwd=REPO,
        env=_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _train_records(run_dir: Path, kind: str = "train") -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


@pytest.fixture(autouse=True)
def _single_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)


@pytest.fixture(scope="module")
def mp():
    platform.init_distributed()
    platform.initialize_model_parallel(1, 1, 1)
    platform.set_seed(3)


# ------------------------------------------------------------------------------------------
# Flags -> architecture, with Megatron-LM's defaults
# ------------------------------------------------------------------------------------------


def test_flags_only_defaults_are_megatron_lms():
    cfg = _resolve()
    a = cfg.arch
    assert cfg.arch_source == "flags"
    assert (a.normalization, a.swiglu, a.position_embedding_type) == (
        "LayerNorm",
        False,
        "learned_absolute",
    )
    assert a.add_bias_linear and a.tie_word_embeddings
    assert a.ffn_hidden_size == 4 * 64  # GeLU: 4h
    assert a.num_query_groups == 4  # no --group-query-attention: one group per head
    assert a.rope_theta == 10000.0 and a.norm_eps == 1e-5
    assert a.vocab_size == 1001  # NullTokenizer: --vocab-size ids + EOD, as Megatron-LM
    assert cfg.build.attention_dropout == 0.1 and cfg.build.hidden_dropout == 0.1
    assert a.megatron_only_fields() == [
        "normalization=LayerNorm",
        "swiglu=False",
        "position_embedding_type=learned_absolute",
        "add_bias_linear=True",
    ]
    # --num-query-groups counts only with --group-query-attention (Megatron-LM's rule).
    assert _resolve("--num-query-groups", "2").arch.num_query_groups == 4
    assert _resolve("--group-query-attention", "--num-query-groups", "2").arch.num_query_groups == 2
    # SwiGLU's default FFN: 2/3 of 4h, rounded down to a multiple of 64.
    assert _resolve("--swiglu", "--hidden-size", "192").arch.ffn_hidden_size == 512
    llama = _resolve("--swiglu", "--normalization", "RMSNorm", "--position-embedding-type",
                     "rope", "--disable-bias-linear", "--untie-embeddings-and-output-weights",
                     "--attention-dropout", "0", "--hidden-dropout", "0").arch  # fmt: skip
    assert llama.megatron_only_fields() == [] and not llama.tie_word_embeddings


def test_preset_runs_keep_llama_choices_and_no_dropout():
    """--model presets are unchanged by the new fields (Llama defaults, dropout 0)."""
    cfg = resolve_config(parse_args(["--model", "smollm2-135m", *SHAPE, "--num-query-groups",
                                      "2", *MOCK]))  # fmt: skip
    assert cfg.arch.megatron_only_fields() == [] and cfg.arch.normalization == "RMSNorm"
    assert cfg.arch.vocab_size == 49152  # a NullTokenizer's --vocab-size sizes only it
    assert cfg.build.attention_dropout == 0.0 and cfg.build.hidden_dropout == 0.0
    hf = cfg.arch.to_hf_config()
    assert "megatron_cpt_architecture" not in hf and hf["hidden_act"] == "silu"


def _built(mp_fixture, *flags):
    cfg = _resolve(*flags)
    tc = build_transformer_config(cfg.arch, cfg.build)
    model = build_model(cfg.arch, tc, build=cfg.build)
    return cfg, tc, model


def test_each_choice_changes_the_megatron_core_model(mp):
    """Every non-Llama choice is what megatron-core builds: module types, parameter names and
    shapes, and the parameter count matches ``LlamaArch.num_parameters``."""
    cfg, tc, gpt = _built(mp)
    names = dict(gpt.named_parameters())
    layer = gpt.decoder.layers[0]
    assert type(layer.input_layernorm) is torch.nn.LayerNorm
    assert "decoder.layers.0.input_layernorm.bias" in names
    assert tc.activation_func is torch.nn.functional.gelu and not tc.gated_linear_unit
    assert layer.mlp.linear_fc1.weight.shape == (256, 64)  # one projection, not [gate; up]
    assert "decoder.layers.0.self_attention.linear_qkv.bias" in names
    assert "decoder.layers.0.mlp.linear_fc2.bias" in names
    assert "embedding.position_embeddings.weight" in names  # learned absolute positions
    assert getattr(gpt, "rotary_pos_emb", None) is None
    vocab = padded_vocab_size(cfg.arch.vocab_size, 1)
    assert sum(p.numel() for p in gpt.parameters()) == cfg.arch.num_parameters(vocab)
    assert tc.attention_dropout == 0.1 and tc.hidden_dropout == 0.1

    cfg, tc, gpt = _built(mp, "--swiglu", "--normalization", "RMSNorm", "--disable-bias-linear",
                          "--position-embedding-type", "rope", "--rotary-percent", "0.5",
                          "--rotary-base", "500000")  # fmt: skip
    names = dict(gpt.named_parameters())
    layer = gpt.decoder.layers[0]
    assert type(layer.input_layernorm) is torch.nn.RMSNorm
    assert tc.gated_linear_unit and tc.activation_func is torch.nn.functional.silu
    assert layer.mlp.linear_fc1.weight.shape == (2 * cfg.arch.ffn_hidden_size, 64)
    assert not any(n.endswith(".bias") for n in names)
    assert "embedding.position_embeddings.weight" not in names
    # Partial RoPE: 16-dim heads, half of them rotated -> 4 frequencies.
    assert gpt.rotary_pos_emb.inv_freq.numel() == 4
    assert gpt.rotary_pos_emb.inv_freq[1].item() == pytest.approx(500000.0 ** (-2 / 8))
    vocab = padded_vocab_size(cfg.arch.vocab_size, 1)
    assert sum(p.numel() for p in gpt.parameters()) == cfg.arch.num_parameters(vocab)

    # A forward pass through the GeLU/LayerNorm/learned-absolute model gives ~ln(vocab).
    cfg, tc, gpt = _built(mp, "--attention-dropout", "0", "--hidden-dropout", "0")
    gpt.eval()
    ids = torch.randint(0, 1000, (2, 16))
    loss = gpt(ids, torch.arange(16).expand(2, -1), None, labels=ids)
    assert loss.shape == (2, 16) and torch.isfinite(loss).all()


def test_recompute_flags_reach_transformer_config():
    cfg = _resolve("--recompute-granularity", "full", "--recompute-method", "block",
                   "--recompute-num-layers", "2")  # fmt: skip
    tc = build_transformer_config(cfg.arch, cfg.build)
    assert (tc.recompute_granularity, tc.recompute_method, tc.recompute_num_layers) == (
        "full",
        "block",
        2,
    )
    tc = build_transformer_config(cfg.arch, _resolve("--recompute-activations").build)
    assert tc.recompute_granularity == "selective"


def test_recompute_trains_bit_identically_with_dropout(tmp_path, mp):
    """Full recompute replays each layer's forward with the saved RNG states, so dropout masks
    (0.1, the flags-only default) repeat and two steps equal the run without recompute."""
    from megatron_cpt.training.trainer import Trainer

    losses = {}
    for name, extra in (("none", []),
                        ("full", ["--recompute-granularity", "full", "--recompute-method",
                                  "uniform", "--recompute-num-layers", "1"]),
                        ("selective", ["--recompute-granularity", "selective"])):  # fmt: skip
        t = Trainer(_resolve(*extra, "--run-dir", str(tmp_path / name))).setup()
        losses[name] = [t.train_step().loss for _ in range(2)]
        t.close()
    assert losses["full"] == losses["none"] == losses["selective"]
    assert losses["none"][1] != losses["none"][0]


# ------------------------------------------------------------------------------------------
# Refusals and config checks: one line naming the flag, before compute
# ------------------------------------------------------------------------------------------

REFUSED = [
    (["--transformer-impl", "transformer_engine"], r"^--transformer-impl transformer_engine: "),
    (["--fp8-format", "hybrid"], r"^--fp8-format needs Transformer Engine"),
    (["--fp8-recipe", "delayed"], r"^--fp8-recipe needs --fp8-format"),
    (["--fp8-amax-history-len", "1024"], r"^--fp8-amax-history-len needs --fp8-format"),
    (["--fp8-amax-compute-algo", "max"], r"^--fp8-amax-compute-algo needs --fp8-format"),
    (["--fp8-param-gather"], r"^--fp8-param-gather needs --fp8-format"),
    (["--apply-layernorm-1p"], r"^--apply-layernorm-1p: "),
    (["--decoupled-lr", "5e-4"], r"^--decoupled-lr: "),
    (["--profile"], r"^--profile: "),
    (["--lr", "-1"], r"^--lr must be >= 0, got -1"),
    (["--lr", "-1", "--min-lr", "-2"], r"^--lr must be >= 0"),
    (["--log-interval", "0"], r"^--log-interval must be >= 1, got 0"),
    (["--eval-interval", "0"], r"^--eval-interval must be >= 1, got 0"),
    (["--make-vocab-size-divisible-by", "0"], r"^--make-vocab-size-divisible-by must be >= 1"),
    (["--recompute-method", "uniform"], r"^--recompute-method needs --recompute-granularity full"),
    (
        ["--recompute-granularity", "full", "--recompute-num-layers", "3"],
        r"^--recompute-num-layers 3 exceeds the layers per pipeline stage \(2\)",
    ),  # fmt: skip
    (["--data-path", "x"], r"^--data-path and --mock-data: give only one"),
    (["--finetune"], r"^--finetune needs --load"),
    (["--attention-dropout", "1.5"], r"^--attention-dropout must be in \[0, 1\)"),
    (["--rotary-percent", "0.2", "--position-embedding-type", "rope"], r"rotary_percent"),
]


@pytest.mark.parametrize("flags,message", REFUSED, ids=lambda x: " ".join(x)[:40])
def test_refusals_are_one_line_naming_the_flag(flags, message):
    with pytest.raises(UserError, match=message) as err:
        _resolve(*flags)
    assert "\n" not in str(err.value)


def test_flags_only_needs_the_shape():
    with pytest.raises(UserError, match=r"^--num-layers is required without --model"):
        resolve_config(parse_args(["--hidden-size", "64", "--train-iters", "1", *MOCK]))


def test_wandb_refused_in_one_line_when_absent():
    try:
        import wandb  # noqa: F401
    except ImportError:
        with pytest.raises(UserError, match=r"^--wandb-project: the 'wandb' package"):
            _resolve("--wandb-project", "p")
    else:
        assert _resolve("--wandb-project", "p").logging.wandb_project == "p"


def test_refusal_through_the_cli_is_one_line_exit_2(tmp_path):
    proc = _run([*SHAPE, *MOCK, "--fp8-format", "hybrid", "--run-dir", str(tmp_path)])
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: --fp8-format needs Transformer Engine (a GPU with TE installed)"
    )
    assert "Traceback" not in proc.stderr and not (tmp_path / "metrics.jsonl").exists()


# ------------------------------------------------------------------------------------------
# The typed config tree; YAML + flags
# ------------------------------------------------------------------------------------------


def test_typed_tree_sections(tmp_path):
    cfg = _resolve("--lr-warmup-samples", "8", "--lr-decay-samples", "10", "--no-load-rng")
    for section, typ in (("build", ModelBuildConfig), ("batch", BatchSettings),
                         ("optim", OptimizerSettings), ("sched", ScheduleSettings),
                         ("data", DataSettings), ("checkpoint", CheckpointSettings),
                         ("logging", LoggingSettings), ("run", RunSettings)):  # fmt: skip
        assert isinstance(getattr(cfg, section), typ), section
    # Sample-based schedule -> iterations at the global batch of 4.
    assert cfg.sched.lr_warmup_iters == 2 and cfg.sched.lr_decay_iters == 3
    assert cfg.checkpoint.no_load_rng and cfg.data.mock
    assert cfg.run.record["num_layers"] == 2  # the flags, kept for checkpoint metadata


def test_yaml_and_flags_precedence(tmp_path):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text(
        "num-layers: 2\nhidden_size: 64\nnum-attention-heads: 4\nswiglu: true\n"
        "normalization: RMSNorm\nposition-embedding-type: rope\nattention-dropout: 0.0\n"
        "seq-length: 32\ntrain-iters: 2\nmock-data: true\ntokenizer-type: NullTokenizer\n"
        "vocab-size: 500\nno-mmap-bin-files: true\n"
    )
    cfg = resolve_config(parse_args(["--config", str(yaml_file), "--normalization", "LayerNorm",
                                     "--hidden-dropout", "0.2"]))  # fmt: skip
    a = cfg.arch
    assert a.swiglu and a.position_embedding_type == "rope"  # from YAML
    assert a.normalization == "LayerNorm"  # the flag wins
    assert cfg.build.attention_dropout == 0.0 and cfg.build.hidden_dropout == 0.2
    assert a.vocab_size == 501 and a.max_position_embeddings == 32  # defaults to --seq-length
    assert cfg.data.mmap_bin_files is False
    yaml_file.write_text("normalization: BatchNorm\n")
    with pytest.raises(UserError, match=r"run\.yaml:1: key 'normalization' must be one of"):
        parse_args(["--config", str(yaml_file)])


def test_num_workers_yield_the_same_batches():
    """--num-workers: DataLoader workers read exactly the batches the in-process sampler does."""
    cfg = _resolve()
    from megatron_cpt.training.data import build_datasets

    ds = build_datasets(cfg.data, cfg.tokenizer, train_samples=64, valid_samples=0).train
    direct = MicroBatches(ds, 6, 2, 1, 2, wrap=True)
    workers = worker_batches(MicroBatches(ds, 6, 2, 1, 2, wrap=True), 2)
    for _ in range(5):
        a, b = next(direct), next(workers)
        assert torch.equal(a["tokens"], b["tokens"]) and torch.equal(a["labels"], b["labels"])


# ------------------------------------------------------------------------------------------
# Through the real CLI
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sec_shard(tmp_path_factory, shared_data, smollm2_gguf):
    from megatron_cpt.data.preprocess import PreprocessConfig, run_preprocess

    out = tmp_path_factory.mktemp("flags_shards")
    run_preprocess(
        PreprocessConfig(
            inputs=[str(shared_data / "domain" / "sec_agreements.jsonl")],
            output_prefix=str(out / "sec"),
            tokenizer_type="HuggingFaceTokenizer",
            tokenizer_model=str(smollm2_gguf),
            append_eod=True,
            log_interval=0,
        )
    )
    return str(out / "sec_text_document"), str(smollm2_gguf)


@pytest.mark.slow
def test_flags_only_run_trains_on_real_data(sec_shard, tmp_path):
    """Issue 14's first command, Megatron-LM-style: no --model, real shards and tokenizer;
    vocabulary from the tokenizer; then the checkpoint refuses HF export in one line."""
    prefix, tokenizer = sec_shard
    run = tmp_path / "run"
    proc = _run(
        [
            *SHAPE,
            "--ffn-hidden-size",
            "172",
            "--group-query-attention",
            "--num-query-groups",
            "2",
            "--data-path",
            prefix,
            "--split",
            "90,10,0",
            "--tokenizer-type",
            "HuggingFaceTokenizer",
            "--tokenizer-model",
            tokenizer,
            "--lr",
            "1e-3",
            "--log-interval",
            "1",
            "--eval-interval",
            "2",
            "--eval-iters",
            "1",
            "--save",
            str(run),
            "--num-workers",
            "1",
        ]  # fmt: skip
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = _train_records(run)
    assert [r["iteration"] for r in recs] == [1, 2]
    assert all(r["lm_loss"] is not None for r in recs)
    assert _train_records(run, "valid")
    # Our one start-up line; none of megatron-core's repeated TE/Apex warnings.
    assert proc.stdout.count("without Transformer Engine and Apex") == 1
    assert "Transformer Engine and Apex are not installed" not in proc.stderr
    summary = json.loads((run / "run_summary.json").read_text())
    assert summary["arch"]["megatron_cpt_architecture"]["normalization"] == "LayerNorm"
    assert summary["arch"]["vocab_size"] == 49152  # the SmolLM2 tokenizer's
    from megatron_cpt.training.checkpointing import read_metadata

    assert read_metadata(run)["arch"].position_embedding_type == "learned_absolute"
    export = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "convert_checkpoint.py"),
            "mcore-to-hf",
            "--load",
            str(run),
            "--out",
            str(tmp_path / "hf"),
        ],  # fmt: skip
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert export.returncode == 2
    assert (
        export.stderr.strip()
        .splitlines()[-1]
        .startswith(
            f"error: --load {run}: architecture field normalization=LayerNorm has no HF Llama"
        )
    )
    assert not (tmp_path / "hf").exists()


def test_exit_signal_handler_saves_and_exits_cleanly(tmp_path):
    run = tmp_path / "run"
    args = [*SHAPE[:-2], "--train-iters", "100000", *MOCK, "--log-interval", "1",
            "--save", str(run), "--exit-signal-handler"]  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, PRETRAIN, *args],
        cwd=REPO,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        metrics = run / "metrics.jsonl"
        if metrics.exists() and metrics.read_text().count('"kind": "train"') >= 2:
            break
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
    summary = json.loads((run / "run_summary.json").read_text())
    assert summary["stopped_early"] == "signal SIGTERM received"
    from megatron_cpt.training.checkpointing import latest_iteration

    saved = latest_iteration(run)
    assert saved == summary["iteration"] and 2 <= saved < 100000
    assert f"stopping at iteration {saved}: signal SIGTERM received" in out


# ------------------------------------------------------------------------------------------
# A real Megatron-LM launch script: examples/llama/train_llama3_8b_h100_fp8.sh at core_v0.16.1
# (its --mock-data branch), every line in its order, with only sizes and paths shrunk.
# ------------------------------------------------------------------------------------------


def llama3_script_lines(tmp: Path) -> list[tuple[str, ...]]:
    ckpt = str(tmp / "checkpoints" / "llama3_8b_fp8")
    return [
        # MODEL_ARGS
        ("--use-mcore-models",),
        ("--num-layers", "2"),  # 32
        ("--hidden-size", "64"),  # 4096
        ("--ffn-hidden-size", "224"),  # 14336
        ("--num-attention-heads", "4"),  # 32
        ("--group-query-attention",),
        ("--num-query-groups", "2"),  # 8
        ("--kv-channels", "16"),  # 128
        ("--seq-length", "32"),  # 8192
        ("--max-position-embeddings", "32"),  # 8192
        ("--position-embedding-type", "rope"),
        ("--rotary-base", "1000000"),
        ("--rotary-percent", "1.0"),
        ("--attention-dropout", "0.0"),
        ("--hidden-dropout", "0.0"),
        ("--swiglu",),
        ("--init-method-std", "0.0134"),
        ("--attention-backend", "fused"),
        ("--apply-layernorm-1p",),
        ("--untie-embeddings-and-output-weights",),
        ("--disable-bias-linear",),
        # TRAINING_ARGS
        ("--micro-batch-size", "1"),
        ("--global-batch-size", "2"),  # 128
        ("--train-samples", "4"),  # 1953125000
        ("--lr-decay-samples", "4"),  # 1949218748
        ("--lr-warmup-samples", "2"),  # 3906252
        ("--lr", "0.00015"),
        ("--min-lr", "0.00001"),
        ("--decoupled-lr", "5.0e-4"),
        ("--decoupled-min-lr", "4.5e-5"),
        ("--lr-decay-style", "cosine"),
        ("--clip-grad", "1.0"),
        ("--weight-decay", "0.1"),
        ("--adam-beta1", "0.9"),
        ("--adam-beta2", "0.95"),
        ("--bf16",),
        ("--grad-reduce-in-bf16",),
        ("--cross-entropy-loss-fusion",),
        ("--calculate-per-token-loss",),
        ("--manual-gc",),
        ("--empty-unused-memory-level", "1"),
        ("--exit-duration-in-mins", "235"),
        # DTYPE_ARGS (fp8)
        ("--fp8-format", "hybrid"),
        ("--fp8-amax-history-len", "1024"),
        ("--fp8-amax-compute-algo", "max"),
        ("--fp8-param-gather",),
        # MODEL_PARALLEL_ARGS
        ("--tensor-model-parallel-size", "1"),
        ("--context-parallel-size", "1"),
        ("--sequence-parallel",),
        # DDP_ARGS
        ("--use-distributed-optimizer",),
        ("--overlap-grad-reduce",),
        ("--overlap-param-gather",),
        # DATA_ARGS_LIST (MOCK)
        ("--mock-data",),
        ("--tokenizer-type", "NullTokenizer"),
        ("--vocab-size", "1000"),  # 128256
        ("--data-cache-path", str(tmp / "benchmark_cache_llama3_8b_fp8")),
        ("--tiktoken-pattern", "v2"),
        ("--split", "99,1,0"),
        ("--no-create-attention-mask-in-dataloader",),
        ("--no-mmap-bin-files",),
        ("--num-workers", "1"),
        # EVAL_AND_LOGGING_ARGS
        ("--log-interval", "1"),
        ("--eval-iters", "1"),  # 32
        ("--eval-interval", "100"),
        ("--save-interval", "1000"),
        ("--log-throughput",),
        ("--profile",),
        ("--profile-step-start", "4"),
        ("--profile-step-end", "6"),
        ("--ckpt-format", "torch_dist"),
        ("--distributed-timeout-minutes", "60"),
        ("--save", ckpt),
        ("--load", ckpt),
        ("--tensorboard-dir", str(tmp / "tensorboard_logs" / "llama3_8b_fp8")),
    ]


# Lines a CPU run must drop, each refused alone in one line naming it (docs/training.md).
DROP_ON_CPU = {
    "--apply-layernorm-1p": r"^--apply-layernorm-1p: zero-centred norm weights",
    "--decoupled-lr": r"^--decoupled-lr: a separate learning rate",
    "--decoupled-min-lr": r"^--decoupled-min-lr: a separate learning rate",
    "--fp8-format": r"^--fp8-format needs Transformer Engine",
    "--fp8-amax-history-len": r"^--fp8-amax-history-len needs --fp8-format",
    "--fp8-amax-compute-algo": r"^--fp8-amax-compute-algo needs --fp8-format",
    "--fp8-param-gather": r"^--fp8-param-gather needs --fp8-format",
    "--sequence-parallel": r"^--sequence-parallel needs Transformer Engine",
    "--profile": r"^--profile: no profiler hook",
    "--profile-step-start": r"^--profile: no profiler hook",
    "--profile-step-end": r"^--profile: no profiler hook",
}


def test_megatron_lm_llama3_script_runs_on_cpu(tmp_path):
    from megatron_cpt.config import build_parser

    known = {s for a in build_parser()._actions for s in a.option_strings}
    lines = llama3_script_lines(tmp_path)
    for line in lines:
        assert line[0] in known, f"{line[0]} is not accepted"
    kept = [x for x in lines if x[0] not in DROP_ON_CPU]
    base = [a for line in kept for a in line]
    # Each dropped line, added back alone, is refused in one line naming it, before compute.
    for flag, message in DROP_ON_CPU.items():
        line = next(x for x in lines if x[0] == flag)
        with pytest.raises(UserError, match=message) as err:
            resolve_config(parse_args([*base, *line]))
        assert "\n" not in str(err.value)
    # The rest trains through the real CLI: 2 iterations (4 samples of 2), saved to --save;
    # --load is the same empty directory (Megatron-LM's auto-resume idiom), so it starts fresh.
    proc = _run(base)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "> random-init" in proc.stdout
    ckpt = tmp_path / "checkpoints" / "llama3_8b_fp8"
    recs = _train_records(ckpt)
    assert [r["iteration"] for r in recs] == [1, 2] and all(r["lm_loss"] for r in recs)
    assert any((tmp_path / "tensorboard_logs" / "llama3_8b_fp8").iterdir())
    from megatron_cpt.training.checkpointing import latest_iteration, read_metadata

    assert latest_iteration(ckpt) == 2
    arch = read_metadata(ckpt)["arch"]
    # The script gives no --normalization: Megatron-LM (and we) build LayerNorm, not RMSNorm.
    assert arch.megatron_only_fields() == ["normalization=LayerNorm"] and arch.vocab_size == 1001
    assert (arch.rope_theta, arch.kv_channels, arch.tie_word_embeddings) == (1e6, 16, False)


# ------------------------------------------------------------------------------------------
# Loading, run control, split data paths, W&B (in-process: one rank, gloo)
# ------------------------------------------------------------------------------------------


def _trainer(tmp_path: Path, *flags: str):
    from megatron_cpt.training.trainer import Trainer

    return Trainer(_resolve("--run-dir", str(tmp_path / "log"), "--log-interval", "1", *flags))


def _weights(trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model[0].module.named_parameters()}


def test_finetune_no_load_optim_and_exit_duration(tmp_path, mp):
    first = _trainer(tmp_path, "--save", str(tmp_path / "a")).setup()
    first.train()
    trained = _weights(first)
    first.close()

    # --finetune: the weights of --load, iteration 0, a fresh optimizer.
    ft = _trainer(tmp_path, "--finetune", "--load", str(tmp_path / "a")).setup()
    assert ft.iteration == 0 and ft.start_mode.startswith("--finetune from")
    assert all(torch.equal(trained[k], v) for k, v in _weights(ft).items())
    # A fresh optimizer: Adam's state exists up front (training/optimizer.py), all at step 0.
    fresh = ft.optimizer.state_dict()["state"].values()
    assert all(float(st["step"]) == 0 and not st["exp_avg"].any() for st in fresh)
    ft.close()

    # --no-load-optim: resumed position, weights loaded, optimizer state not loaded.
    nlo = _trainer(tmp_path, "--load", str(tmp_path / "a"), "--no-load-optim",
                   "--train-iters", "4").setup()  # fmt: skip
    assert nlo.iteration == 2 and "--no-load-optim" in nlo.start_mode
    # The architecture now comes from the checkpoint; the flags-only run's dropout is kept.
    assert nlo.cfg.arch_source == str(tmp_path / "a")
    assert nlo.cfg.build.attention_dropout == 0.1 and nlo.cfg.build.hidden_dropout == 0.1
    assert all(torch.equal(trained[k], v) for k, v in _weights(nlo).items())
    assert all(float(st["step"]) == 0 for st in nlo.optimizer.state_dict()["state"].values())
    nlo.close()
    full = _trainer(tmp_path, "--load", str(tmp_path / "a"), "--train-iters", "4").setup()
    # the control: a plain resume loads the saved state (two steps taken)
    assert all(float(st["step"]) == 2 for st in full.optimizer.state_dict()["state"].values())
    full.close()

    # --exit-duration-in-mins: stops after the first iteration past the limit, and saves.
    ex = _trainer(tmp_path, "--save", str(tmp_path / "b"), "--train-iters", "50",
                  "--exit-duration-in-mins", "1e-9").setup()  # fmt: skip
    summary = ex.train()
    ex.close()
    assert summary["iteration"] == 1 and summary["stopped_early"].startswith(
        "--exit-duration-in-mins"
    )
    from megatron_cpt.training.checkpointing import latest_iteration

    assert latest_iteration(tmp_path / "b") == 1


def test_megatron_lm_data_path_forms(sec_shard, tmp_path):
    """--valid-data-path in Megatron-LM's weighted form (one blended set, or one per prefix
    with --multiple-validation-sets), --train-data-path and --test-data-path."""
    from megatron_cpt.training.data import build_datasets, parse_validation_sets

    prefix, tokenizer = sec_shard
    assert parse_validation_sets(["sec=/a", "wiki=/b"]) == {
        "sec": (["/a"], None),
        "wiki": (["/b"], None),
    }
    assert parse_validation_sets(["0.3", "/x/a", "0.7", "/y/b"]) == {
        "valid": (["/x/a", "/y/b"], [0.3, 0.7])
    }
    assert parse_validation_sets(["/x/a", "/y/b"], multiple=True) == {
        "a": (["/x/a"], None),
        "b": (["/y/b"], None),
    }
    with pytest.raises(UserError, match="expected NAME=PREFIX"):
        parse_validation_sets(["sec=/a", "/b"])
    tok = ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", tokenizer]
    cfg = resolve_config(parse_args([*SHAPE, *tok, "--train-data-path", "1.0", prefix,
                                     "--valid-data-path", prefix, "--test-data-path", prefix,
                                     "--split", "50,50,0"]))  # fmt: skip
    assert cfg.data.valid_replaces_split and cfg.data.train_data_path == ["1.0", prefix]
    ds = build_datasets(cfg.data, cfg.tokenizer, 8, 4, test_samples=4)
    assert list(ds.valid) == ["valid"] and list(ds.test) == ["test"]
    assert len(ds.train) >= 8 and len(ds.valid["valid"]) >= 4
    # The whole shard feeds training (no --split carve-out) with --train-data-path.
    first = ds.train[0]["tokens"]
    assert first.shape == (32,)
    with pytest.raises(UserError, match=r"^--train-data-path: .*nope\.bin does not exist"):
        resolve_config(parse_args([*SHAPE, *tok, "--train-data-path", str(tmp_path / "nope")]))


def test_wandb_offline_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from megatron_cpt.config import LoggingSettings
    from megatron_cpt.training.logging import MetricsLogger, TrainRecord

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    settings = LoggingSettings(wandb_project="cpt", wandb_exp_name="flags", run_dir=str(tmp_path))
    log = MetricsLogger(tmp_path, wandb=settings, wandb_config={"lr": 1e-3})
    log.train(TrainRecord(1, 4, 5.0, 1e-3, 1.0, 100.0, 0, 0.1))
    log.valid(1, "sec", 4.5)
    log.close()
    runs = list((tmp_path / "wandb" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))


def test_startup_notes(monkeypatch):
    """One line for the missing TE/Apex; on a GPU without --bf16, one fp32 warning line."""
    notes = platform.startup_notes(bf16=False)
    assert len(notes) == 1 and "without Transformer Engine and Apex" in notes[0]
    monkeypatch.setattr(platform, "has_cuda", lambda: True)
    monkeypatch.setattr(platform, "have_transformer_engine", lambda: False)
    fp32 = platform.startup_notes(bf16=False)
    assert len(fp32) == 2 and fp32[1].startswith("warning: training in fp32 on a GPU (TF32")
    assert len(platform.startup_notes(bf16=True)) == 1
