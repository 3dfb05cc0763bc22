"""Beyond Llama: Qwen2 (q/k/v biases), Qwen3 (per-head q/k RMSNorm, head_dim != hidden/heads)
and Mistral (sliding window) through conversion, megatron-core logits, round trip, merging and
the one-line config errors. Every model is a random-initialised tiny HF model built with
transformers' own classes (``Qwen2ForCausalLM``, ``Qwen3ForCausalLM``, ``MistralForCausalLM``);
the Llama variants are covered by test_convert*.py with the same checks.

TP=2 / PP=2 parity and the trainer's first loss start subprocesses (torchrun, tools/pretrain.py)
and are marked ``multiproc`` / ``slow``.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_convert import first_loss_vs_hf, hf_logits, sample_ids

from megatron_cpt.convert.exporter import ExportConfig, export_hf
from megatron_cpt.convert.importer import ImportConfig, import_hf
from megatron_cpt.convert.loading import load_megatron_model, megatron_logits
from megatron_cpt.errors import UserError

REPO = Path(__file__).resolve().parent.parent
TOL = 1e-4

_SHAPE = dict(
    vocab_size=1001,  # odd: padded to 1024 (TP=1) / 1280... columns cut on export
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)

FAMILIES = {
    # Qwen2.5-style: q/k/v biases, untied head, rope_theta 1e6, eps 1e-6
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=False, rope_theta=1e6)),
    # Qwen3-0.6B-style: tied, head_dim 32 while hidden/heads is 16, q/k norms
    "qwen3": (
        "Qwen3Config",
        "Qwen3ForCausalLM",
        dict(tie_word_embeddings=True, head_dim=32, rope_theta=1e6),
    ),
    # Mistral-7B-v0.1-style: a sliding window (64) longer than the test sequences (48)
    "mistral": (
        "MistralConfig",
        "MistralForCausalLM",
        dict(tie_word_embeddings=False, sliding_window=64, rope_theta=10000.0),
    ),
}


def make_family_hf(family: str, out: Path | None, seed: int = 0, **overrides):
    """A random HF model of ``family`` saved by transformers itself. Weights are drawn wider
    than HF's init and biases/norms are not zeros/ones, so a dropped bias, an unapplied q/k
    norm or a wrong head order moves logits far beyond 1e-4."""
    import transformers

    config_name, model_name, extra = FAMILIES[family]
    torch.manual_seed(seed)
    config = getattr(transformers, config_name)(
        **{**_SHAPE, **extra, **overrides}, initializer_range=0.2
    )
    model = getattr(transformers, model_name)(config).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif pname.endswith(".bias"):
                p.uniform_(-0.5, 0.5)
    if out is not None:
        model.save_pretrained(out)
    return model


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """family -> (hf_dir, hf_model, megatron_dir), converted for TP=2 (so TP=1 and TP=2 load)."""
    out = {}
    for family in FAMILIES:
        root = tmp_path_factory.mktemp(family)
        model = make_family_hf(family, root / "hf")
        import_hf(ImportConfig(str(root / "hf"), str(root / "mcore"), tensor_parallel=2))
        out[family] = (root / "hf", model, root / "mcore")
    return out


# ---- architectures and presets ----------------------------------------------------------


@pytest.mark.parametrize("family", list(FAMILIES))
def test_arch_from_hf_config_and_back(converted, family):
    from megatron_cpt.model import from_hf_config
    from megatron_cpt.training.checkpointing import read_metadata

    hf_dir, model, mc_dir = converted[family]
    arch = from_hf_config(hf_dir)
    assert arch.family == family
    assert arch.qkv_bias == (family == "qwen2")
    assert arch.qk_norm == (family == "qwen3")
    assert arch.kv_channels == (32 if family == "qwen3" else 16)
    assert arch.sliding_window == (64 if family == "mistral" else None)
    # the checkpoint metadata (to_hf_config) reads back as the same architecture
    assert read_metadata(mc_dir)["arch"] == arch
    assert from_hf_config(arch.to_hf_config()) == arch
    # our parameter count is transformers' for the same config
    assert arch.num_parameters() == sum(p.numel() for p in model.parameters())


def test_presets_match_transformers_parameter_counts():
    """Each preset, instantiated by transformers' own class on the meta device, has the
    parameter count our architecture computes: the family's extra tensors (biases, q/k norms,
    head_dim) are all accounted for. The counts are the published sizes (e.g. Qwen2.5-7B
    7.62B, Qwen3-0.6B 0.60B, Llama-3.2-1B 1.24B, Mistral-7B 7.24B)."""
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM

    from megatron_cpt.model import PRESETS

    published = {
        "llama3.2-1b": 1.24e9,
        "llama3.2-3b": 3.21e9,
        "llama3.3-70b": 70.55e9,
        "qwen2.5-0.5b": 0.49e9,
        "qwen2.5-1.5b": 1.54e9,
        "qwen2.5-7b": 7.62e9,
        "qwen2.5-72b": 72.7e9,
        "qwen3-0.6b": 0.60e9,
        "qwen3-8b": 8.19e9,
        "qwen3-32b": 32.76e9,
        "mistral-7b": 7.24e9,
    }
    for name in published:
        arch = PRESETS[name]
        config = CONFIG_MAPPING[arch.family].from_dict(arch.to_hf_config())
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        assert type(model).__name__ == arch.family_module.HF_ARCHITECTURE, name
        hf_count = sum(p.numel() for p in model.parameters())
        assert arch.num_parameters() == hf_count, name
        assert abs(hf_count - published[name]) / published[name] < 0.01, (name, hf_count)


def test_unknown_family_and_unsupported_features_name_the_field(tmp_path):
    from megatron_cpt.model import from_hf_config

    base = make_family_hf("qwen2", None).config.to_dict()
    with pytest.raises(UserError, match="field 'model_type' is 'gpt2'; supported: "):
        from_hf_config({**base, "model_type": "gpt2"})
    with pytest.raises(UserError, match="field 'use_sliding_window'"):
        from_hf_config({**base, "use_sliding_window": True})
    q3 = make_family_hf("qwen3", None).config.to_dict()
    with pytest.raises(UserError, match="field 'attention_bias'"):
        from_hf_config({**q3, "attention_bias": True})
    # a config.json without head_dim takes Qwen3Config's default (128), not hidden // heads
    assert from_hf_config({k: v for k, v in q3.items() if k != "head_dim"}).kv_channels == 128


# ---- logits parity, round trip ----------------------------------------------------------


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_parity_tp1(converted, family):
    hf_dir, model, mc_dir = converted[family]
    mc_model, arch = load_megatron_model(mc_dir)
    ids = sample_ids(arch.vocab_size)
    ref = hf_logits(model, ids)
    diff = (megatron_logits(mc_model, ids, arch.vocab_size) - ref).abs().max()
    print(f"{family} TP=1 max |logits diff| {diff:.3g}")
    assert ref.abs().max() > 1.0  # logits large enough to expose errors
    assert diff <= TOL, f"{family}: max |logits diff| {diff:.3g}"


def test_parity_detects_dropped_qkv_bias_and_qk_norm(converted, tmp_path):
    """The checks above can fail: zeroing the Qwen2 biases or unit Qwen3 q/k norms (what a
    converter that ignored them would produce) moves logits far beyond the tolerance."""
    from safetensors.torch import load_file, save_file

    for family, suffixes in (("qwen2", ("_proj.bias",)), ("qwen3", ("q_norm.weight",))):
        hf_dir, model, _ = converted[family]
        broken = tmp_path / family
        broken.mkdir()
        tensors = load_file(hf_dir / "model.safetensors")
        for name, t in tensors.items():
            if name.endswith(suffixes):
                tensors[name] = torch.zeros_like(t) if "bias" in name else torch.ones_like(t)
        save_file(tensors, str(broken / "model.safetensors"), metadata={"format": "pt"})
        (broken / "config.json").write_text((hf_dir / "config.json").read_text())
        import_hf(ImportConfig(str(broken), str(tmp_path / f"{family}-mc")))
        mc_model, arch = load_megatron_model(tmp_path / f"{family}-mc")
        ids = sample_ids(arch.vocab_size)
        diff = (megatron_logits(mc_model, ids, arch.vocab_size) - hf_logits(model, ids)).abs()
        assert diff.max() > 100 * TOL, family


@pytest.mark.parametrize("family", list(FAMILIES))
def test_round_trip_is_bit_identical_config_included(converted, tmp_path, family):
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_dir, _, mc_dir = converted[family]
    export_hf(ExportConfig(str(mc_dir), str(tmp_path / "out"), max_shard_bytes=200_000))
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    original = load_file(hf_dir / "model.safetensors")
    exported = {}
    for shard in set(index["weight_map"].values()):
        exported.update(load_file(tmp_path / "out" / shard))
    assert exported.keys() == original.keys()
    for key, tensor in original.items():
        assert exported[key].dtype == tensor.dtype and torch.equal(exported[key], tensor), key
    config_out = AutoConfig.from_pretrained(tmp_path / "out").to_dict()
    config_in = AutoConfig.from_pretrained(hf_dir).to_dict()
    config_out.pop("_name_or_path"), config_in.pop("_name_or_path")
    assert config_out == config_in
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert type(reloaded).__name__ == FAMILIES[family][1]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_export_without_side_config_writes_the_family_config(converted, tmp_path, family):
    """With the saved ``hf/config.json`` gone, the config is rebuilt from the architecture
    (``to_hf_config``) in the family's own class; the model it describes gives HF's logits."""
    import shutil

    from transformers import AutoModelForCausalLM

    hf_dir, model, mc_dir = converted[family]
    bare = tmp_path / "bare"
    shutil.copytree(mc_dir, bare)
    shutil.rmtree(bare / "hf")
    export_hf(ExportConfig(str(bare), str(tmp_path / "out")))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(reloaded).__name__ == FAMILIES[family][1]
    ids = sample_ids(model.config.vocab_size)
    assert torch.equal(hf_logits(reloaded, ids), hf_logits(model, ids))


# ---- GGUF (llama.cpp's qwen2 / qwen3 files, read by transformers too) ---------------------


@pytest.mark.parametrize(
    "family,matrix_type,overrides",
    [
        ("qwen2", "Q8_0", {}),
        # transformers' GGUF config does not read head_dim for qwen3: Qwen3Config's 128 it is
        ("qwen3", "F16", {"head_dim": 128}),
    ],
)
def test_gguf_import_equals_transformers_and_logits_parity(
    tmp_path, family, matrix_type, overrides
):
    from tests.gguf_files import write_llama_gguf
    from tests.test_gguf_import import assert_reader_equals_transformers, transformers_gguf_model

    model = make_family_hf(family, None, **overrides)
    path = write_llama_gguf(
        model.config,
        model.state_dict().items(),
        tmp_path / f"{family}.gguf",
        matrix_type,
        architecture=family,
    )
    assert_reader_equals_transformers(path)  # every tensor bit for bit, config included
    import_hf(ImportConfig(str(path), str(tmp_path / "mc")))
    reference = transformers_gguf_model(path)
    mc_model, arch = load_megatron_model(tmp_path / "mc")
    assert arch.family == family
    ids = sample_ids(arch.vocab_size)
    diff = (megatron_logits(mc_model, ids, arch.vocab_size) - hf_logits(reference, ids)).abs()
    print(f"{family} GGUF ({matrix_type}) max |logits diff| {diff.max():.3g}")
    assert diff.max() <= TOL


# ---- one-line config mismatches ---------------------------------------------------------


def test_qwen_checkpoint_with_llama_settings_names_the_field(converted, tmp_path):
    hf_dir, _, _ = converted["qwen2"]
    # --model with a Llama preset / config: the first differing field is the family
    with pytest.raises(UserError, match=r"--model llama3-8b: field 'family' is llama but the checkpoint has qwen2"):  # fmt: skip
        import_hf(ImportConfig(str(hf_dir), str(tmp_path / "a"), model="llama3-8b"))
    # a Qwen2 checkpoint whose config.json claims Llama: its biases are named
    fake = tmp_path / "fake-llama"
    fake.mkdir()
    (fake / "model.safetensors").symlink_to(hf_dir / "model.safetensors")
    config = json.loads((hf_dir / "config.json").read_text())
    config.update(model_type="llama", architectures=["LlamaForCausalLM"])
    (fake / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=r"unexpected tensor model\.layers\.0\.self_attn\.[qkv]_proj\.bias \(config\.json model_type=llama has no q/k/v biases: a qwen2 checkpoint\?\)"):  # fmt: skip
        import_hf(ImportConfig(str(fake), str(tmp_path / "b")))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_missing_biases_and_wrong_head_dim_name_the_field(converted, tmp_path):
    from safetensors.torch import load_file, save_file

    hf_dir, _, _ = converted["qwen2"]
    nobias = tmp_path / "nobias"
    nobias.mkdir()
    tensors = {k: v for k, v in load_file(hf_dir / "model.safetensors").items() if "bias" not in k}
    save_file(tensors, str(nobias / "model.safetensors"), metadata={"format": "pt"})
    (nobias / "config.json").write_text((hf_dir / "config.json").read_text())
    with pytest.raises(UserError, match=r"tensor model\.layers\.0\.self_attn\.q_proj\.bias missing \(config\.json model_type=qwen2 has q/k/v biases\)"):  # fmt: skip
        import_hf(ImportConfig(str(nobias), str(tmp_path / "a")))

    hf_dir, _, _ = converted["qwen3"]
    wrong = tmp_path / "wrong-head-dim"
    wrong.mkdir()
    (wrong / "model.safetensors").symlink_to(hf_dir / "model.safetensors")
    config = json.loads((hf_dir / "config.json").read_text())
    config["head_dim"] = 16  # hidden / heads: what a Llama-minded config would say
    (wrong / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=r"tensor model\.layers\.0\.self_attn\.q_norm\.weight has shape \[32\] but config\.json \(head_dim\) implies \[16\]"):  # fmt: skip
        import_hf(ImportConfig(str(wrong), str(tmp_path / "b")))


def test_sequence_longer_than_mistral_window_is_refused_in_one_line():
    from megatron_cpt.model import PRESETS

    mistral = PRESETS["mistral-7b"]
    mistral.check_sequence_length(4096, "--seq-length")
    with pytest.raises(UserError, match=r"--seq-length 8192 exceeds the model's sliding_window \(4096\)"):  # fmt: skip
        mistral.check_sequence_length(8192, "--seq-length")
    PRESETS["mistral-7b-v0.3"].check_sequence_length(32768, "--seq-length")  # no window


def test_mistral_window_is_refused_by_the_trainer_cli(converted, tmp_path, shared_data):
    """tools/pretrain.py refuses --seq-length above the window before building anything."""
    _, _, mc_dir = converted["mistral"]
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "pretrain.py"),
            "--pretrained-checkpoint",
            str(mc_dir),
            "--seq-length",
            "128",
            "--data-path",
            str(tmp_path / "none"),
            "--micro-batch-size",
            "1",
            "--global-batch-size",
            "1",
            "--train-iters",
            "1",
        ],  # fmt: skip
        env=_child_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: --seq-length 128 exceeds the model's sliding_window (64): sliding-window "
        "attention is not implemented; use at most the window"
    )


def _child_env() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return env


# ---- merging: Megatron space equals HF space --------------------------------------------


def _write_variant(family: str, base: Path, out: Path, seed: int) -> None:
    """base + a random 'fine-tuning' delta on every tensor (biases and q/k norms included)."""
    from safetensors.torch import load_file, save_file

    g = torch.Generator().manual_seed(seed)
    tensors = load_file(base / "model.safetensors")
    out.mkdir(parents=True)
    for name, t in tensors.items():
        tensors[name] = (t + 0.3 * t.std() * torch.randn(t.shape, generator=g)).contiguous()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text((base / "config.json").read_text())


# Mistral's tensors are Llama's (test_merge_megatron.py): its run is in the slow set
@pytest.mark.parametrize(
    "family", ["qwen2", "qwen3", pytest.param("mistral", marks=pytest.mark.slow)]
)
def test_megatron_ties_merge_equals_hf_merge_after_export(converted, tmp_path, family):
    from safetensors.torch import load_file

    from megatron_cpt.merge import MergeOptions, merge_checkpoints, parse_config

    hf_base, _, mc_base = converted[family]
    paths = {"base": mc_base, "export-base": tmp_path / "export-base"}
    export_hf(ExportConfig(str(mc_base), str(paths["export-base"])))
    for i, name in enumerate(("a", "b")):
        _write_variant(family, hf_base, tmp_path / f"hf-{name}", seed=10 + i)
        import_hf(ImportConfig(str(tmp_path / f"hf-{name}"), str(tmp_path / f"mc-{name}"), tensor_parallel=2))  # fmt: skip
        export_hf(ExportConfig(str(tmp_path / f"mc-{name}"), str(tmp_path / f"export-{name}")))
        paths[name], paths[f"export-{name}"] = tmp_path / f"mc-{name}", tmp_path / f"export-{name}"

    def recipe(prefix: str) -> dict:
        return {
            "merge_method": "ties",
            "base_model": str(paths[f"{prefix}base"]),
            "models": [
                {"model": str(paths[f"{prefix}a"]), "parameters": {"weight": 0.8, "density": 0.3}},
                {"model": str(paths[f"{prefix}b"]), "parameters": {"weight": 0.6, "density": 0.6}},
            ],
            "parameters": {"lambda": 1.1},
        }

    options = MergeOptions(progress=False, random_seed=5)
    merge_checkpoints(parse_config(recipe("")), tmp_path / "mc-merged", options)
    export_hf(ExportConfig(str(tmp_path / "mc-merged"), str(tmp_path / "exported")))
    merge_checkpoints(parse_config(recipe("export-")), tmp_path / "hf-merged", options)

    def load_dir(path):
        out = {}
        for file in sorted(path.glob("*.safetensors")):
            out |= load_file(str(file))
        return out

    from_megatron, from_hf = load_dir(tmp_path / "exported"), load_dir(tmp_path / "hf-merged")
    base = load_file(hf_base / "model.safetensors")
    assert from_megatron.keys() == from_hf.keys() == base.keys()
    extra = [n for n in base if n.endswith(("_proj.bias", "q_norm.weight", "k_norm.weight"))]
    assert bool(extra) == (family != "mistral")
    for name, tensor in from_hf.items():
        assert torch.equal(from_megatron[name], tensor), name
        assert not torch.equal(tensor, base[name]), name


# ---- evaluation: the Megatron backend scores like the HF backend ---------------------------


@pytest.mark.parametrize("family", list(FAMILIES))
def test_megatron_perplexity_and_loglikelihood_match_hf(tmp_path, family):
    """Perplexity (rolling windows) and lm-eval loglikelihoods of a converted tiny model of each
    family equal the HF backend's on the same text (the acceptance bar of test_eval_scoring)."""
    from lm_eval.api.instance import Instance

    from megatron_cpt.evaluation.backend import BackendSpec, load_backend
    from megatron_cpt.evaluation.lm_eval_adapter import MegatronCPTLM
    from megatron_cpt.evaluation.perplexity import PerplexityConfig, evaluate_set
    from tests.test_eval_scoring import CORPUS, make_tiny_llama

    hf_dir = make_tiny_llama(tmp_path / "hf")  # its trained BPE tokenizer; model replaced below
    vocab = json.loads((hf_dir / "config.json").read_text())["vocab_size"]
    (hf_dir / "model.safetensors").unlink()
    make_family_hf(family, hf_dir, vocab_size=vocab)
    import_hf(ImportConfig(str(hf_dir), str(tmp_path / "mc")))
    hf = load_backend(BackendSpec(hf=str(hf_dir)))
    megatron = load_backend(BackendSpec(megatron=str(tmp_path / "mc")))
    if family == "mistral":  # its window bounds the default evaluation length
        assert megatron.max_length == 64
    data = tmp_path / "set.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in CORPUS))
    cfg = PerplexityConfig(seq_length=32, batch_size=4)
    ours, ref = (evaluate_set(b, "d", [str(data)], cfg) for b in (megatron, hf))
    assert (ours.tokens, ours.bytes) == (ref.tokens, ref.bytes)
    assert ours.bpb == pytest.approx(ref.bpb, rel=1e-5)
    pairs = [("Gold prices", " rose on Tuesday"), ("", "The Borrower shall repay")]

    def requests():
        return [
            Instance("loglikelihood", {}, arguments=pair, idx=i) for i, pair in enumerate(pairs)
        ]

    got = MegatronCPTLM(backend=megatron).loglikelihood(requests(), True)
    want = MegatronCPTLM(backend=hf).loglikelihood(requests(), True)
    assert [lp for lp, _ in got] == pytest.approx([lp for lp, _ in want], abs=1e-4)


# ---- TP=2 / PP=2 (torchrun, gloo) --------------------------------------------------------


@pytest.mark.slow  # ~1 min per family (two torchrun ranks, four model loads)
@pytest.mark.multiproc
@pytest.mark.parametrize("family", list(FAMILIES))
def test_tp2_and_pp2_logits_parity_and_shards(converted, tmp_path, family):
    from safetensors.torch import load_file
    from test_convert_parallel import LAYOUTS, check_results, run_workers

    hf_dir, model, mc_dir = converted[family]
    ids = sample_ids(model.config.vocab_size)
    torch.save({"ids": ids, "logits": hf_logits(model, ids)}, tmp_path / "ref.pt")
    out = tmp_path / "results"
    out.mkdir()
    check_results(run_workers(mc_dir, tmp_path / "ref.pt", out, LAYOUTS), LAYOUTS)
    original = load_file(hf_dir / "model.safetensors")
    for layout in LAYOUTS:  # saved by the TP=2 / PP=2 ranks, exported: the original tensors
        export_hf(ExportConfig(str(out / f"resaved-{layout}"), str(out / f"hf-{layout}")))
        exported = load_file(out / f"hf-{layout}" / "model.safetensors")
        assert exported.keys() == original.keys()
        for key, tensor in original.items():
            assert torch.equal(exported[key], tensor), f"{layout}: {key}"


# ---- the trainer starts from a converted checkpoint --------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_pretrain_first_loss_equals_hf_loss(family, smollm2_gguf, shared_data, tmp_path):
    """tools/pretrain.py --pretrained-checkpoint on a converted tiny model of each family: the
    first iteration's lm loss (before any update) equals HF's loss on the same samples (vocab
    49152, a multiple of 128: no padding columns in either softmax)."""
    model = make_family_hf(family, tmp_path / "hf", vocab_size=49152)
    trainer_loss, hf_loss = first_loss_vs_hf(
        model, tmp_path / "hf", smollm2_gguf, shared_data, tmp_path
    )
    print(f"{family} first-iteration lm loss: trainer {trainer_loss:.8f}  HF {hf_loss:.8f}")
    assert abs(hf_loss - math.log(49152)) > 1.0
    assert abs(trainer_loss - hf_loss) <= 1e-4 * hf_loss, (trainer_loss, hf_loss)
