"""LoRA on megatron-core's parallel linears: B = 0 leaves the logits unchanged, only adapters
train (no grads, no optimizer state for the base), merged weights give the adapter model's
logits (fp32, <= 1e-5), adapters round-trip on their own."""

from __future__ import annotations

import pytest
import torch

from megatron_cpt import platform
from megatron_cpt.errors import UserError
from megatron_cpt.model import LlamaArch, ModelBuildConfig, build_model, build_transformer_config
from megatron_cpt.model.lora import (
    LoraSettings,
    adapter_state_dict,
    apply_lora,
    load_adapter_state_dict,
    lora_layers,
    merge_lora,
)

TOL = 1e-5
TINY = dict(num_layers=2, hidden_size=96, ffn_hidden_size=192, num_attention_heads=6,
            num_query_groups=2, vocab_size=1000)  # fmt: skip


@pytest.fixture(scope="module")
def mp():
    platform.init_distributed()
    platform.initialize_model_parallel(1, 1, 1)


def tiny():
    arch = LlamaArch(**TINY)
    build = ModelBuildConfig()
    platform.set_seed(11)
    return build_model(arch, build_transformer_config(arch, build), build=build).eval()


def tokens():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, TINY["vocab_size"], (2, 24), generator=gen)
    return ids, torch.arange(24).expand(2, -1)


def randomize_b(model, seed=5):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in lora_layers(model):
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=gen) * 0.05)


def test_zero_b_gives_the_base_logits_and_only_adapters_train(mp):
    model = tiny()
    ids, pos = tokens()
    with torch.no_grad():
        base = model(ids, pos, None)
    counts = apply_lora(model, LoraSettings(rank=4, alpha=8))
    assert counts["adapted_layers"] == 4 * TINY["num_layers"]
    with torch.no_grad():
        adapted = model(ids, pos, None)
    assert torch.equal(base, adapted)
    # frozen base: after a backward pass only adapters have gradients
    model.train()
    model(ids, pos, None).float().mean().backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    # the memory LoRA saves: Adam keeps two fp32 moments per trainable parameter
    assert counts["trainable_params"] * 20 < counts["frozen_params"]


def test_merged_weights_give_the_adapter_logits(mp):
    model = tiny()
    ids, pos = tokens()
    with torch.no_grad():
        base = model(ids, pos, None)
    apply_lora(model, LoraSettings(rank=4, alpha=16, targets=("linear_qkv", "linear_fc2")))
    randomize_b(model)
    saved = adapter_state_dict(model)
    with torch.no_grad():
        adapted = model(ids, pos, None)
    assert (adapted - base).abs().max() > 1e-3  # the adapters do something
    assert merge_lora(model) == 2 * TINY["num_layers"]
    assert not list(lora_layers(model))
    with torch.no_grad():
        merged = model(ids, pos, None)
    assert (merged - adapted).abs().max() <= TOL
    # adapters saved on their own load into a fresh adapted base and give the same logits
    fresh = tiny()
    apply_lora(fresh, LoraSettings(rank=4, alpha=16, targets=("linear_qkv", "linear_fc2")))
    load_adapter_state_dict(fresh, saved)
    with torch.no_grad():
        assert (fresh(ids, pos, None) - adapted).abs().max() <= TOL


def test_bad_settings_are_one_line_errors(mp):
    for settings, words in (
        (LoraSettings(rank=0, alpha=8), "--lora-rank 0"),
        (LoraSettings(rank=4, alpha=0), "--lora-alpha 0"),
        (LoraSettings(rank=4, alpha=8, dropout=1.0), "--lora-dropout 1.0"),
        (LoraSettings(rank=4, alpha=8, targets=("q_proj",)), "--lora-target q_proj"),
    ):
        with pytest.raises(UserError, match=words):
            settings.validate()
