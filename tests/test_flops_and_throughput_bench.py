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


def test_throughput_bench_runs_tiny_on_cpu(tmp_path):
    pytest.importorskip("llama_models")
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    out = subprocess.run(
        [sys.executable, str(REPO / "bench/train_throughput.py"), "--model", "tiny",
         "--seq-length", "32", "--warmup", "1", "--steps", "1"],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    for side in ("hf", "ours"):
        assert result[side]["tokens_per_s"] > 0 and result[side]["mfu"] is None  # no CPU peak
    assert "ratio ours/hf:" in out.stdout
