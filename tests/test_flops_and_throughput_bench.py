"""The FLOP formula behind TFLOP/s and MFU, and the GPU throughput bench's CPU smoke run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_cpt.flops import matmul_params_per_layer, training_flops_per_token
from megatron_cpt.model.arch import from_hf_config

REPO = Path(__file__).resolve().parent.parent

CFG = dict(
    model_type="llama", vocab_size=1000, hidden_size=96, intermediate_size=200,
    num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=2,
    tie_word_embeddings=True, rope_theta=10000.0, rms_norm_eps=1e-5,
    max_position_embeddings=256,
)  # fmt: skip


def test_matmul_params_equal_the_linear_weights_of_the_hf_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(**CFG))
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    arch = from_hf_config(CFG)
    # The tied LM head is an nn.Linear sharing the embedding: it still does a matmul per token.
    assert linear == arch.num_layers * matmul_params_per_layer(arch) + 96 * 1000


def test_flops_per_token_counts_attention_over_the_full_sequence():
    arch = from_hf_config(CFG)
    f128, f256 = training_flops_per_token(arch, 128), training_flops_per_token(arch, 256)
    assert f256 - f128 == 12 * 3 * 128 * 6 * 16  # 12·L·Δs·heads·head_dim
    assert training_flops_per_token(arch, 128, padded_vocab=1024) - f128 == 6 * 96 * 24


@pytest.mark.slow
def test_gpu_check_steps_run_tiny_on_cpu(tmp_path, llama3_tokenizer_model):
    """bench/gpu_check.sh --cpu-smoke: every step of the one-shot GPU check (device report,
    5 training steps, save/resume exactness, ours vs HF throughput, SDPA vs unfused) runs in
    tiny form, and the log and the JSON of results are written."""
    out = tmp_path / "check"
    env = dict(os.environ, TOKENIZER_MODEL=str(llama3_tokenizer_model), PYTHON=sys.executable)
    proc = subprocess.run(
        ["bash", str(REPO / "bench/gpu_check.sh"), str(out), "--cpu-smoke"],
        capture_output=True, text=True, env=env, timeout=1800,
    )  # fmt: skip
    results = json.loads((out / "results.json").read_text())
    steps = {s["name"]: s for s in results["steps"]}
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-2000:], results)
    assert list(steps) == ["device", "bf16_steps", "distopt_resume", "throughput", "sdpa"]
    assert all(s["status"] == "ok" for s in steps.values())
    assert steps["device"]["result"]["megatron_core"] == "0.16.1"
    assert len(steps["bf16_steps"]["result"]["losses"]) == 5
    assert steps["distopt_resume"]["result"]["exact"]
    tp = steps["throughput"]["result"]
    for side in ("hf", "ours"):
        assert tp[side]["tokens_per_s"] > 0 and tp[side]["peak_memory_gib"] > 0
        assert tp[side]["mfu"] is None  # no CPU peak FLOP/s
    assert tp["ratio"] > 0
    (row,) = steps["sdpa"]["result"]["rows"]
    assert row["loss_diff"] <= 1e-4 and row["sdpa"]["ms"] > 0
    assert "===== step sdpa =====" in (out / "gpu_check.log").read_text()
