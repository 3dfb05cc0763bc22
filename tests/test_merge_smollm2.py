"""Merging the real SmolLM2-135M-Instruct with a real (tiny) continued pre-training of itself on
SEC annual-report text: bit-equality with mergekit on real weights, and the merged model loads
in transformers with its tokenizer and sits between the two models on the domain text."""

from __future__ import annotations

import itertools
import json
import os

import pytest
import torch

from megatron_cpt.data.jsonl import read_texts
from megatron_cpt.merge import MergeOptions, merge_checkpoints, parse_config

pytestmark = pytest.mark.slow


def save_hf(model, out):
    """save_pretrained refuses GGUF-loaded models; the weights are plain dequantized floats, so
    write them as an ordinary HF directory (tied lm_head omitted, as transformers does)."""
    from safetensors.torch import save_file

    out.mkdir(parents=True)
    state = {
        k: v.detach().contiguous().clone()
        for k, v in model.state_dict().items()
        if not (k == "lm_head.weight" and model.config.tie_word_embeddings)
    }
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["dtype"] = "float32"
    config["architectures"] = [type(model).__name__]
    (out / "config.json").write_text(json.dumps(config, indent=2))


@pytest.fixture(scope="module")
def smollm2_pair(smollm2_gguf, shared_data, tmp_path_factory):
    """(instruct_dir, cpt_dir, domain batch): the CPT model is 3 AdamW steps on annual reports."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("smollm2")
    path = smollm2_gguf
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    )
    save_hf(model, root / "instruct")
    tok.save_pretrained(root / "instruct")
    docs = read_texts([str(shared_data / "domain" / "annual_reports.jsonl")], "text")
    texts = [text for _, text in itertools.islice(docs, 8)]
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    batch = tok(texts, return_tensors="pt", truncation=True, max_length=96, padding="max_length")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-5)
    model.train()
    for step in range(3):
        rows = slice(2 * step, 2 * step + 2)
        loss = model(
            input_ids=batch["input_ids"][rows],
            attention_mask=batch["attention_mask"][rows],
            labels=labels[rows],
        ).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    save_hf(model, root / "cpt")
    return root / "instruct", root / "cpt", (batch, labels)


def domain_loss(model_dir, batch, labels) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return float(model(**batch, labels=labels).loss)


def load(path):
    from safetensors.torch import load_file

    out = {}
    for file in sorted(path.glob("*.safetensors")):
        out |= load_file(str(file))
    return out


@pytest.mark.parametrize("method", ["ties", "task_arithmetic", "slerp"])
def test_real_smollm2_merge_equals_mergekit(smollm2_pair, tmp_path, method):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions as MKOptions
    from mergekit.merge import run_merge

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    instruct, cpt, _ = smollm2_pair
    config = {"merge_method": method, "base_model": str(instruct)}
    if method == "slerp":
        config |= {
            "models": [{"model": str(instruct)}, {"model": str(cpt)}],
            "parameters": {"t": 0.5},
        }
    else:
        config["models"] = [{"model": str(cpt), "parameters": {"weight": 1.0, "density": 0.5}}]
    merge_checkpoints(parse_config(config), tmp_path / "ours", MergeOptions(progress=False))
    run_merge(
        MergeConfiguration.model_validate(config), str(tmp_path / "mk"), MKOptions(quiet=True)
    )
    ours, theirs = load(tmp_path / "ours"), load(tmp_path / "mk")
    assert ours.keys() == theirs.keys()
    base, other = load(instruct), load(cpt)
    for name in ours:
        differ = ours[name] != theirs[name]
        if method != "ties":
            assert not differ.any(), name
            continue
        # Q4_1-dequantized weights repeat values, so deltas tie in magnitude at the TIES
        # threshold; mergekit breaks those ties by an unstable sort, we by flat index. Every
        # differing entry must be such a tie, and nothing else may differ.
        magnitude = (other[name] - base[name]).abs().float().reshape(-1)
        k = max(1, int(0.5 * magnitude.numel()))
        kth = torch.kthvalue(magnitude, magnitude.numel() - k + 1).values
        assert not (differ & (magnitude != kth).reshape(differ.shape)).any(), name


def test_ties_merge_back_sits_between_instruct_and_cpt(smollm2_pair, tmp_path):
    from transformers import AutoTokenizer

    instruct, cpt, (batch, labels) = smollm2_pair
    config = {
        "merge_method": "ties",
        "base_model": str(instruct),
        "models": [{"model": str(cpt), "parameters": {"weight": 1.0, "density": 0.5}}],
        "dtype": "float32",
        "out_dtype": "bfloat16",
    }
    merge_checkpoints(parse_config(config), tmp_path / "m", MergeOptions(progress=False))
    assert json.loads((tmp_path / "m" / "config.json").read_text())["dtype"] == "bfloat16"
    tok = AutoTokenizer.from_pretrained(tmp_path / "m")  # carried over from the base
    assert (
        tok("Net revenue increased")["input_ids"]
        == AutoTokenizer.from_pretrained(instruct)("Net revenue increased")["input_ids"]
    )
    before, after = domain_loss(instruct, batch, labels), domain_loss(cpt, batch, labels)
    merged = domain_loss(tmp_path / "m", batch, labels)
    assert after < before  # the CPT steps did learn the domain text
    assert after < merged < before, (before, merged, after)
