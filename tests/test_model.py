"""Llama presets and their megatron-core GPTModel: the mapping must be exact, because the
converter, merging and evaluation all rely on it."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from megatron_cpt import platform
from megatron_cpt.errors import UserError
from megatron_cpt.model import (
    PRESETS,
    LlamaArch,
    ModelBuildConfig,
    RopeScaling,
    build_model,
    build_transformer_config,
    from_hf_config,
    padded_vocab_size,
    validate_parallelism,
)

TINY = dict(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
            num_query_groups=2, vocab_size=1000)  # fmt: skip


@pytest.fixture(scope="module")
def mp():
    platform.init_distributed()
    platform.initialize_model_parallel(1, 1, 1)
    platform.set_seed(3)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_round_trips_through_transformers_config(name):
    """to_hf_config() is a config transformers accepts, and reading it back (through
    transformers' own config class of the family -- LlamaConfig, Qwen2Config, ... -- which
    renames rope keys in v5) gives the same arch."""
    from transformers import CONFIG_MAPPING

    arch = PRESETS[name]
    config_class = CONFIG_MAPPING[arch.family]
    hf = config_class(**arch.to_hf_config())
    assert from_hf_config(hf) == arch
    assert from_hf_config(json.loads(json.dumps(arch.to_hf_config()))) == arch
    # Parameter count agrees with HF's own model definition (on a 1-layer copy, meta device).
    small = arch.replace(num_layers=1)
    with torch.device("meta"):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_config(config_class(**small.to_hf_config()))
    assert sum(p.numel() for p in model.parameters()) == small.num_parameters()


def test_llama3_rope_scaling_matches_hf_exactly(mp):
    """megatron-core's GPTModel passes only `factor`; we recompute inv_freq with all four
    parameters. Non-default low/high/original values prove they are honoured."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    scaling = RopeScaling(factor=16.0, low_freq_factor=2.0, high_freq_factor=8.0,
                          original_max_position_embeddings=2048)  # fmt: skip
    arch = LlamaArch(**TINY, head_dim=32, rope_theta=500000.0, rope_scaling=scaling,
                     max_position_embeddings=32768)  # fmt: skip
    model = build_model(arch, build_transformer_config(arch))
    hf_rope = LlamaRotaryEmbedding(LlamaConfig(**arch.to_hf_config()))
    assert hf_rope.rope_type == "llama3" and hf_rope.attention_scaling == 1.0
    expected = hf_rope.inv_freq
    assert model.rotary_pos_emb.inv_freq.shape == expected.shape
    assert torch.equal(model.rotary_pos_emb.inv_freq, expected.to(torch.float32))
    # And without scaling it is plain RoPE with the checkpoint's base.
    plain = dataclasses.replace(arch, rope_scaling=None)
    model = build_model(plain, build_transformer_config(plain))
    expected = LlamaRotaryEmbedding(LlamaConfig(**plain.to_hf_config())).inv_freq
    assert torch.equal(model.rotary_pos_emb.inv_freq, expected.to(torch.float32))


def test_transformer_config_and_model_shapes(mp):
    arch = LlamaArch(**TINY, norm_eps=1e-6, tie_word_embeddings=False)
    cfg = build_transformer_config(arch)
    assert cfg.gated_linear_unit and cfg.normalization == "RMSNorm"
    assert not cfg.add_bias_linear and not cfg.add_qkv_bias
    assert cfg.layernorm_epsilon == arch.norm_eps
    assert cfg.num_query_groups == arch.num_query_groups
    assert cfg.kv_channels == arch.hidden_size // arch.num_attention_heads
    assert cfg.activation_func is torch.nn.functional.silu
    model = build_model(arch, cfg)
    vocab = padded_vocab_size(arch.vocab_size, 1)
    n = sum(p.numel() for p in model.parameters())
    assert n == arch.num_parameters(vocab)
    # GQA: fused QKV rows = (heads + 2 * groups) * head_dim.
    qkv = model.decoder.layers[0].self_attention.linear_qkv.weight
    assert qkv.shape[0] == (arch.num_attention_heads + 2 * arch.num_query_groups) * arch.kv_channels
    tied = dataclasses.replace(arch, tie_word_embeddings=True)
    model = build_model(tied, build_transformer_config(tied))
    assert sum(p.numel() for p in model.parameters()) == tied.num_parameters(vocab)
    assert model.output_layer.weight is None  # shares the embedding
    # A forward pass gives per-token losses near ln(vocab) at init.
    ids = torch.randint(0, arch.vocab_size, (2, 16))
    pos = torch.arange(16).expand(2, -1)
    labels = torch.randint(0, arch.vocab_size, (2, 16))
    loss = model(ids, pos, None, labels=labels)
    assert loss.shape == (2, 16)
    assert abs(loss.mean().item() - math.log(vocab)) < 0.5


@pytest.mark.parametrize("vocab,tp", [(49152, 1), (128256, 1), (128256, 8), (1000, 2)])
def test_padded_vocab_size(vocab, tp):
    padded = padded_vocab_size(vocab, tp)
    assert padded % (128 * tp) == 0 and vocab <= padded < vocab + 128 * tp


def test_parallelism_errors_are_one_line():
    arch = PRESETS["smollm2-135m"]  # 9 heads, 3 KV groups, 30 layers
    with pytest.raises(UserError, match="does not divide num_attention_heads"):
        validate_parallelism(arch, ModelBuildConfig(tensor_parallel=2), world_size=2)
    with pytest.raises(UserError, match="does not divide num_query_groups"):
        validate_parallelism(
            arch.replace(num_attention_heads=12), ModelBuildConfig(tensor_parallel=4), 4
        )
    with pytest.raises(UserError, match="does not divide num_layers"):
        validate_parallelism(arch, ModelBuildConfig(pipeline_parallel=4), world_size=4)
    validate_parallelism(arch, ModelBuildConfig(tensor_parallel=3), world_size=3)
    with pytest.raises(UserError, match="world size 2 is not divisible"):
        validate_parallelism(arch, ModelBuildConfig(tensor_parallel=3), world_size=2)
    with pytest.raises(UserError, match="needs Transformer Engine"):
        validate_parallelism(arch, ModelBuildConfig(fp8_format="hybrid"), world_size=1)


def test_hf_config_errors_name_the_file(tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text('{"model_type": "llama",\n "hidden_size": 64,,}')
    with pytest.raises(UserError, match=r"config\.json:2: invalid JSON"):
        from_hf_config(bad)
    cfg = PRESETS["llama3-8b"].to_hf_config()
    del cfg["num_hidden_layers"]
    bad.write_text(json.dumps(cfg))
    with pytest.raises(UserError, match=r"config\.json: missing field 'num_hidden_layers'"):
        from_hf_config(tmp_path)
    cfg = PRESETS["llama3-8b"].to_hf_config() | {"model_type": "gpt2"}
    with pytest.raises(UserError, match="field 'model_type' is 'gpt2'; supported: llama, "):
        from_hf_config(cfg)


@pytest.mark.slow
def test_smollm2_preset_matches_the_shipped_gguf(smollm2_gguf):
    """The embedded real model's metadata (read straight from the GGUF header)."""
    import gguf

    fields = gguf.GGUFReader(smollm2_gguf).fields
    reader = gguf.GGUFReader(smollm2_gguf)

    def get(key):
        return fields[key].contents()

    arch = PRESETS["smollm2-135m"]
    assert arch.num_layers == get("llama.block_count")
    assert arch.hidden_size == get("llama.embedding_length")
    assert arch.ffn_hidden_size == get("llama.feed_forward_length")
    assert arch.num_attention_heads == get("llama.attention.head_count")
    assert arch.num_query_groups == get("llama.attention.head_count_kv")
    assert arch.rope_theta == get("llama.rope.freq_base")
    assert arch.max_position_embeddings == get("llama.context_length")
    assert math.isclose(arch.norm_eps, get("llama.attention.layer_norm_rms_epsilon"), rel_tol=1e-6)
    assert arch.vocab_size == len(fields["tokenizer.ggml.tokens"].data)
    assert arch.tie_word_embeddings == (not any(t.name == "output.weight" for t in reader.tensors))
