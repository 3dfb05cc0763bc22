"""Flags, YAML recipes and the config errors that must fail before any compute (in-process,
no process group or model is built)."""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron_cpt.config import parse_args
from megatron_cpt.errors import UserError
from megatron_cpt.model import ModelBuildConfig, get_arch, validate_parallelism
from megatron_cpt.training.data import parse_blend, parse_named, parse_split
from megatron_cpt.training.trainer import build_settings

REPO = Path(__file__).resolve().parent.parent
RECIPES = sorted((REPO / "examples").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipes_parse_and_fit_their_cluster(recipe):
    args = parse_args(["--config", str(recipe)])
    # The CPU recipe takes its architecture from the converted SmolLM2 checkpoint.
    arch = get_arch(args.model or "smollm2-135m")
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    # The recipe's own comment says how many GPUs it is for; 8 per node.
    nodes = 8 if "70b" in recipe.name else 1
    world = 8 * nodes if args.bf16 else 1
    validate_parallelism(arch, ModelBuildConfig(tensor_parallel=tp, pipeline_parallel=pp), world)
    arch.check_sequence_length(args.seq_length, "--seq-length")  # positions, Mistral's window
    dp = world // (tp * pp)
    assert args.global_batch_size % (args.micro_batch_size * dp) == 0
    prefixes, weights = parse_blend(args.data_path)
    assert len(prefixes) == 2 and weights[0] > 0.9  # domain + a few % replay
    assert len(parse_named(args.valid_data_path)) == 2
    assert args.lr_decay_style == "WSD" and args.lr_wsd_decay_style == "minus_sqrt"


def test_flags_override_yaml(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("lr: 1.0e-4\nseq_length: 128\ndata-path: 0.5 a 0.5 b\nbf16: true\n")
    args = parse_args(["--config", str(cfg), "--lr", "2e-4"])
    assert args.lr == 2e-4 and args.seq_length == 128 and args.bf16
    assert args.data_path == ["0.5", "a", "0.5", "b"]


def test_yaml_errors_name_file_and_line(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("lr: 1.0e-4\nlearning_rate: 3\n")
    with pytest.raises(UserError, match=r"run\.yaml:2: unknown key 'learning_rate'"):
        parse_args(["--config", str(cfg)])
    cfg.write_text("lr: 1.0e-4\nseq-length: long\n")
    with pytest.raises(UserError, match=r"run\.yaml:2: key 'seq-length' expects int"):
        parse_args(["--config", str(cfg)])
    cfg.write_text("lr: [1\n")
    with pytest.raises(UserError, match=r"run\.yaml:\d+: invalid YAML"):
        parse_args(["--config", str(cfg)])


def test_data_path_grammar():
    assert parse_blend(["a", "b"]) == (["a", "b"], None)
    assert parse_blend(["0.3", "a", "0.7", "b"]) == (["a", "b"], [0.3, 0.7])
    for bad, msg in (
        (["0.3", "a", "0.7"], "weight/prefix pairs"),
        (["0.3", "a", "b", "c"], "should be a weight"),
        (["-1", "a"], "finite number >= 0"),
        (["a", "0.5"], "mixes weights and prefixes"),
    ):
        with pytest.raises(UserError, match=msg):
            parse_blend(bad)
    with pytest.raises(UserError, match="expected NAME=PREFIX"):
        parse_named(["sec"])
    with pytest.raises(UserError, match="the train part must be > 0"):
        parse_split("0,50,50")


def _args(tmp_path, *extra, shards=None):
    base = ["--model", "smollm2-135m", "--num-layers", "2", "--hidden-size", "64",
            "--ffn-hidden-size", "128", "--num-attention-heads", "4", "--num-query-groups", "2",
            "--seq-length", "32", "--train-iters", "2"]  # fmt: skip
    return parse_args([*base, *extra])


def test_config_errors_before_compute(tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    missing = str(tmp_path / "nope")
    with pytest.raises(UserError, match=r"--data-path: .*nope\.bin does not exist"):
        build_settings(_args(tmp_path, "--data-path", "1.0", missing))
    with pytest.raises(UserError, match="--global-batch-size 6 is not divisible"):
        build_settings(_args(tmp_path, "--micro-batch-size", "4", "--global-batch-size", "6"))
    with pytest.raises(UserError, match="--load .*: no published checkpoint there"):
        build_settings(_args(tmp_path, "--load", str(tmp_path / "empty")))
    # The world size as the trainer sees it (a process group initialised by an earlier test in
    # this process would otherwise win over WORLD_SIZE).
    import megatron_cpt.config as config_module

    monkeypatch.setattr(config_module, "_world_size", lambda: 3)
    with pytest.raises(UserError, match="does not divide num_attention_heads"):
        build_settings(_args(tmp_path, "--tensor-model-parallel-size", "3"))
    monkeypatch.setattr(config_module, "_world_size", lambda: 4)
    with pytest.raises(
        UserError, match=r"--pipeline-model-parallel-size 4 does not divide num_layers \(2\)"
    ):
        build_settings(_args(tmp_path, "--pipeline-model-parallel-size", "4"))
    with pytest.raises(UserError, match="--seq-length 100000 exceeds"):
        build_settings(parse_args(["--model", "smollm2-135m", "--seq-length", "100000",
                                   "--train-iters", "1"]))  # fmt: skip


def test_tokenizer_larger_than_model_vocab(tmp_path, monkeypatch, shared_data, smollm2_gguf):
    """A real tokenizer (SmolLM2's 49,152 tokens) against a model with a smaller vocab."""
    from megatron_cpt.data.preprocess import PreprocessConfig, run_preprocess

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    run_preprocess(
        PreprocessConfig(
            inputs=[str(shared_data / "domain" / "sec_agreements.jsonl")],
            output_prefix=str(tmp_path / "sec"),
            tokenizer_type="HuggingFaceTokenizer",
            tokenizer_model=str(smollm2_gguf),
            log_interval=0,
        )
    )
    args = _args(tmp_path, "--vocab-size", "32000", "--data-path", str(tmp_path / "sec_text_document"),
                 "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(smollm2_gguf))  # fmt: skip
    with pytest.raises(UserError, match="vocabulary of 49152 tokens is larger than the model's"):
        build_settings(args)
