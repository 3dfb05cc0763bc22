"""HF <-> megatron-core conversion, proven on logits: random-init tiny HF Llamas (tied/untied,
GQA/MHA, llama3 RoPE scaling, odd vocab) and the real SmolLM2-135M-Instruct (slow)."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_cpt.convert import mapping
from megatron_cpt.convert.atomic_directory import AtomicDirectory
from megatron_cpt.convert.exporter import ExportConfig, export_hf
from megatron_cpt.convert.importer import ImportConfig, import_hf
from megatron_cpt.convert.loading import load_megatron_model, megatron_logits
from megatron_cpt.errors import UserError

REPO = Path(__file__).resolve().parent.parent
TOL = 1e-4

TINY = {
    # GQA, untied, odd vocab (padded 1001 -> 1024), llama3 RoPE scaling with non-default
    # low/high/original values so a builder that hard-codes Llama-3.1's numbers fails.
    "gqa-untied-llama3": dict(
        vocab_size=1001,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
        max_position_embeddings=256,
        rope_theta=10000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 4.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
    ),
    # MHA, tied embeddings (SmolLM2-style), odd vocab (515 -> 640 at TP=1, 768 at TP=2).
    "mha-tied": dict(
        vocab_size=515,
        hidden_size=64,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        tie_word_embeddings=True,
        max_position_embeddings=128,
        rope_theta=500000.0,
        rms_norm_eps=1e-6,
    ),
}


def make_tiny_hf(
    name: str, out: Path, dtype: torch.dtype = torch.float32, seed: int = 0, **overrides
):
    """A random HF Llama saved by transformers itself. Weights are drawn wider than HF's init
    (std 0.02 gives near-zero logits that hide layout errors) and norms are not all ones, so a
    swapped norm, a wrong head order or a wrong RoPE frequency moves logits far beyond 1e-4."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**dict(TINY[name], **overrides), initializer_range=0.2)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    model = model.to(dtype)
    model.save_pretrained(out)
    return model


def hf_logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


def sample_ids(vocab: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (2, 48), generator=g)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """name -> (hf_dir, hf_model, megatron_dir); each converted once per module."""
    out = {}
    for name in TINY:
        root = tmp_path_factory.mktemp(name)
        model = make_tiny_hf(name, root / "hf")
        import_hf(ImportConfig(str(root / "hf"), str(root / "mcore")))
        out[name] = (root / "hf", model, root / "mcore")
    return out


@pytest.mark.parametrize("name", list(TINY))
def test_logits_parity_tp1(tiny, name):
    hf_dir, model, mc_dir = tiny[name]
    mc_model, arch = load_megatron_model(mc_dir)
    ids = sample_ids(arch.vocab_size)
    diff = (megatron_logits(mc_model, ids, arch.vocab_size) - hf_logits(model, ids)).abs().max()
    print(f"{name} TP=1 max |logits diff| {diff:.3g}")
    assert hf_logits(model, ids).abs().max() > 1.0  # logits large enough to expose errors
    assert diff <= TOL, f"{name}: max |logits diff| {diff:.3g}"


@pytest.mark.parametrize("name", list(TINY))
def test_round_trip_is_bit_identical(tiny, tmp_path, name):
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_dir, _, mc_dir = tiny[name]
    # a small shard limit forces several shards + index: the streaming writer path
    export_hf(ExportConfig(str(mc_dir), str(tmp_path / "out"), max_shard_bytes=200_000))
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    original = load_file(hf_dir / "model.safetensors")
    exported = {}
    for shard in set(index["weight_map"].values()):
        exported.update(load_file(tmp_path / "out" / shard))
    assert exported.keys() == original.keys()
    for key, tensor in original.items():
        assert exported[key].dtype == tensor.dtype and torch.equal(exported[key], tensor), key
    config_out = AutoConfig.from_pretrained(tmp_path / "out").to_dict()
    config_in = AutoConfig.from_pretrained(hf_dir).to_dict()
    config_out.pop("_name_or_path"), config_in.pop("_name_or_path")  # where each was read from
    assert config_out == config_in
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert (tmp_path / "out" / "generation_config.json").exists()
    assert torch.equal(reloaded.model.embed_tokens.weight, original["model.embed_tokens.weight"])


def test_bf16_checkpoint_stays_bf16_and_bit_identical(tmp_path):
    from safetensors.torch import load_file

    make_tiny_hf("gqa-untied-llama3", tmp_path / "hf", dtype=torch.bfloat16)
    import_hf(ImportConfig(str(tmp_path / "hf"), str(tmp_path / "mc")))
    meta = json.loads((tmp_path / "mc" / "iter_0000000" / "megatron_cpt.json").read_text())
    assert meta["args"]["dtype"] == "bfloat16"
    export_hf(ExportConfig(str(tmp_path / "mc"), str(tmp_path / "out")))
    a = load_file(tmp_path / "hf" / "model.safetensors")
    b = load_file(tmp_path / "out" / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(b[k].dtype == torch.bfloat16 and torch.equal(a[k], b[k]) for k in a)


# ---- the tests above can fail: the same checks catch deliberately wrong conversions --------


def test_parity_detects_missing_rope_scaling(tiny, tmp_path):
    hf_dir, model, _ = tiny["gqa-untied-llama3"]
    shutil.copytree(hf_dir, tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg.pop("rope_scaling", None)
    cfg["rope_parameters"] = {
        "rope_type": "default",
        "rope_theta": cfg["rope_parameters"]["rope_theta"],
    }
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    import_hf(ImportConfig(str(tmp_path / "hf"), str(tmp_path / "mc")))
    mc_model, arch = load_megatron_model(tmp_path / "mc")
    ids = sample_ids(arch.vocab_size)
    diff = (megatron_logits(mc_model, ids, arch.vocab_size) - hf_logits(model, ids)).abs().max()
    assert diff > 100 * TOL


def test_parity_detects_wrong_qkv_layout(tiny, tmp_path, monkeypatch):
    hf_dir, model, _ = tiny["gqa-untied-llama3"]
    # [all q; all k; all v] is the layout a naive converter writes (Megatron-LM issue #1365)
    monkeypatch.setattr(mapping, "fuse_qkv", lambda q, k, v, lay: torch.cat([q, k, v]))
    import_hf(ImportConfig(str(hf_dir), str(tmp_path / "mc")))
    mc_model, arch = load_megatron_model(tmp_path / "mc")
    ids = sample_ids(arch.vocab_size)
    diff = (megatron_logits(mc_model, ids, arch.vocab_size) - hf_logits(model, ids)).abs().max()
    assert diff > 100 * TOL


# ---- bad input: one line naming the field, nothing half-written ------------------------------


def test_requested_model_mismatch_names_the_field(tiny, tmp_path):
    hf_dir, _, _ = tiny["mha-tied"]
    with pytest.raises(
        UserError, match=r"--model llama3-8b: field 'num_layers' is 32 but the checkpoint has 2"
    ):
        import_hf(ImportConfig(str(hf_dir), str(tmp_path / "mc"), model="llama3-8b"))
    assert not (tmp_path / "mc").exists()


def test_tensor_shape_disagreeing_with_config_names_tensor_and_field(tiny, tmp_path):
    hf_dir, _, _ = tiny["mha-tied"]
    shutil.copytree(hf_dir, tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg["intermediate_size"] = 64
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        UserError,
        match=r"mlp\.gate_proj\.weight has shape \[80, 64\] but config\.json \(intermediate_size/hidden_size\) implies \[64, 64\]",
    ):
        import_hf(ImportConfig(str(tmp_path / "hf"), str(tmp_path / "mc")))
    assert not (tmp_path / "mc").exists()


def test_pickled_weights_are_refused(tiny, tmp_path):
    hf_dir, _, _ = tiny["mha-tied"]
    (tmp_path / "hf").mkdir()
    shutil.copy(hf_dir / "config.json", tmp_path / "hf" / "config.json")
    torch.save({"x": torch.zeros(1)}, tmp_path / "hf" / "pytorch_model.bin")
    with pytest.raises(UserError, match="pytorch_model.bin: pickled weights are refused"):
        import_hf(ImportConfig(str(tmp_path / "hf"), str(tmp_path / "mc")))


def test_atomic_directory_leaves_nothing_on_failure(tmp_path):
    with pytest.raises(RuntimeError):
        with AtomicDirectory(tmp_path / "out") as tmp:
            (tmp / "model.safetensors.index.json").write_text("{}")
            raise RuntimeError("killed mid-write")
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.iterdir()) == []


def test_cli_round_trip_and_one_line_errors(tiny, tmp_path):
    hf_dir, model, _ = tiny["mha-tied"]
    tool = [sys.executable, str(REPO / "tools" / "convert_checkpoint.py")]
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}

    def run(*a):
        return subprocess.run([*tool, *a], capture_output=True, text=True, env=env, timeout=300)

    ok = run(
        "hf-to-mcore",
        "--hf",
        str(hf_dir),
        "--out",
        str(tmp_path / "mc"),
        "--tensor-model-parallel-size",
        "2",
    )
    assert ok.returncode == 0, ok.stderr[-3000:]
    meta = json.loads((tmp_path / "mc" / "iter_0000000" / "megatron_cpt.json").read_text())
    assert meta["padded_vocab_size"] == 768  # 515 padded to a multiple of 128 * TP=2
    ok = run("mcore-to-hf", "--load", str(tmp_path / "mc"), "--out", str(tmp_path / "hf2"))
    assert ok.returncode == 0, ok.stderr[-3000:]
    from safetensors.torch import load_file

    a = load_file(hf_dir / "model.safetensors")
    b = load_file(tmp_path / "hf2" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a) and a.keys() == b.keys()

    bad = run(
        "hf-to-mcore",
        "--hf",
        str(hf_dir),
        "--out",
        str(tmp_path / "mc3"),
        "--tensor-model-parallel-size",
        "2",
        "--model",
        "smollm2-135m",
    )
    assert bad.returncode == 2
    lines = bad.stderr.strip().splitlines()
    assert lines[-1].startswith("error: --model smollm2-135m: field 'num_layers'"), bad.stderr[
        -2000:
    ]
    assert "Traceback" not in bad.stderr


def test_bad_layout_and_missing_checkpoint_are_user_errors(tiny, tmp_path):
    hf_dir, _, _ = tiny["mha-tied"]
    with pytest.raises(
        UserError, match=r"--pipeline-model-parallel-size 4 does not divide num_layers \(2\)"
    ):
        import_hf(ImportConfig(str(hf_dir), str(tmp_path / "mc"), pipeline_parallel=4))
    with pytest.raises(UserError, match="no latest_checkpointed_iteration.txt|does not exist"):
        export_hf(ExportConfig(str(tmp_path / "nothing"), str(tmp_path / "x")))


# ---- the real model ----------------------------------------------------------------------


@pytest.fixture(scope="session")
def smollm2_converted(smollm2_gguf, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("smollm2") / "mcore"
    import_hf(ImportConfig(str(smollm2_gguf), str(out)))
    hf = AutoModelForCausalLM.from_pretrained(
        smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32
    ).eval()
    return hf, out


def real_text_ids(tokenizer, shared_data, n=2, max_tokens=64):
    path = shared_data / "domain" / "annual_reports.jsonl"
    texts = [json.loads(line)["text"] for line in path.read_text().splitlines()[:n]]
    enc = [tokenizer(t).input_ids[:max_tokens] for t in texts]
    return torch.tensor([e for e in enc if len(e) == max_tokens])


@pytest.mark.slow
def test_smollm2_logits_parity_and_export(smollm2_converted, shared_data, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf, mc_dir = smollm2_converted
    tok = AutoTokenizer.from_pretrained(mc_dir / "hf" / "tokenizer")
    ids = real_text_ids(tok, shared_data)
    mc_model, arch = load_megatron_model(mc_dir)
    diff = (megatron_logits(mc_model, ids, arch.vocab_size) - hf_logits(hf, ids)).abs().max()
    print(f"SmolLM2 TP=1 max |logits diff| {diff:.3g} on {tuple(ids.shape)} real tokens")
    assert diff <= TOL, f"SmolLM2 max |logits diff| {diff:.3g}"

    export_hf(ExportConfig(str(mc_dir), str(tmp_path / "hf")))
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    sd, sd_back = hf.state_dict(), back.state_dict()
    assert all(torch.equal(sd[k], sd_back[k]) for k in sd)
    tok_back = AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "Net revenue rose 12% to $4.2 billion."
    assert tok_back(text).input_ids == tok(text).input_ids
    assert torch.equal(back(ids).logits, hf(ids).logits)


# ---- integration: the trainer starts CPT from a converted checkpoint -----------------------


def first_loss_vs_hf(model, hf_dir: Path, smollm2_gguf: Path, shared_data: Path, tmp_path: Path):
    """Convert ``hf_dir`` (``model``'s checkpoint), run tools/pretrain.py for one iteration from
    it, and return (trainer's first-iteration lm loss, HF's loss on the same global batch)."""
    from megatron_cpt import config as train_config
    from megatron_cpt.data.preprocess import PreprocessConfig, run_preprocess
    from megatron_cpt.training.data import build_datasets
    from megatron_cpt.training.trainer import build_settings

    docs = tmp_path / "docs.jsonl"
    lines = (shared_data / "domain" / "annual_reports.jsonl").read_text().splitlines()[:40]
    docs.write_text("\n".join(lines) + "\n")
    run_preprocess(
        PreprocessConfig(
            inputs=[str(docs)],
            output_prefix=str(tmp_path / "reports"),
            tokenizer_type="HuggingFaceTokenizer",
            tokenizer_model=str(smollm2_gguf),
            append_eod=True,
            log_interval=0,
        )
    )
    import_hf(ImportConfig(str(hf_dir), str(tmp_path / "mc")))
    args = [
        "--pretrained-checkpoint", str(tmp_path / "mc"),
        "--data-path", str(tmp_path / "reports_text_document"),
        "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(smollm2_gguf),
        "--seq-length", "64", "--micro-batch-size", "2", "--global-batch-size", "4",
        "--train-iters", "1", "--split", "100,0,0", "--log-interval", "1",
        "--run-dir", str(tmp_path / "run"), "--lr", "1e-4",
    ]  # fmt: skip
    env = dict(
        __import__("os").environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO)
    )
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)  # this process's own one-rank group must not leak into the child
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "pretrain.py"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in records if r.get("kind") == "train" and r["iteration"] == 1)

    # The same first global batch, rebuilt through the trainer's own data path.
    settings = build_settings(train_config.parse_args(args))
    datasets = build_datasets(settings.data, settings.tokenizer, settings.batch.train_samples, 0)
    samples = [datasets.train[i] for i in range(4)]
    tokens = torch.stack([torch.as_tensor(s["tokens"]) for s in samples]).long()
    labels = torch.stack([torch.as_tensor(s["labels"]) for s in samples]).long()
    mask = torch.stack([torch.as_tensor(s["loss_mask"]) for s in samples]).float()
    with torch.no_grad():
        logits = model(tokens).logits
    nll = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none"
    )
    hf_loss = float((nll * mask.reshape(-1)).sum() / mask.sum())
    return first["lm_loss"], hf_loss


@pytest.mark.slow
def test_pretrain_first_loss_equals_hf_loss_on_the_same_batch(smollm2_gguf, shared_data, tmp_path):
    """tools/pretrain.py --pretrained-checkpoint on a converted tiny HF Llama: its first
    iteration's lm loss (before any update) must be HF's loss on the same samples. The vocab is
    SmolLM2's 49152 (a multiple of 128, no padding columns) so both losses see the same logits."""
    model = make_tiny_hf("gqa-untied-llama3", tmp_path / "hf", vocab_size=49152)
    trainer_loss, hf_loss = first_loss_vs_hf(
        model, tmp_path / "hf", smollm2_gguf, shared_data, tmp_path
    )
    print(f"first-iteration lm loss: trainer {trainer_loss:.8f}  HF {hf_loss:.8f}")
    assert abs(hf_loss - math.log(49152)) > 1.0  # far from uniform: weights matter
    assert abs(trainer_loss - hf_loss) <= 1e-4 * hf_loss, (trainer_loss, hf_loss)


def test_requested_model_accepts_float32_rounded_norm_eps():
    """A GGUF stores rms_norm_eps as float32 (SmolLM2: 9.99999975e-06 for 1e-5)."""
    from megatron_cpt.convert.layout import check_requested_model
    from megatron_cpt.model.arch import get_arch

    preset = get_arch("smollm2-135m")
    check_requested_model(preset, preset.replace(norm_eps=9.99999975e-06), "smollm2-135m")
    with pytest.raises(UserError, match="field 'norm_eps'"):
        check_requested_model(preset, preset.replace(norm_eps=1e-6), "smollm2-135m")
