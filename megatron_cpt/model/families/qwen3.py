"""Qwen3 (dense): the Llama layout without biases, plus an RMSNorm over each query and key
head (``q_norm``/``k_norm``, one ``head_dim`` weight shared by all heads, applied before RoPE)
and a ``head_dim`` independent of hidden/heads (Qwen3-0.6B: 16 x 128 = 2048 != 1024).
megatron-core's ``qk_layernorm`` with the spec's RMSNorm is the same computation, so the norm
weights map one to one."""

from __future__ import annotations

from megatron_cpt.model.families._common import base_hf_config, llama_layer_names, refuse_true

MODEL_TYPE = "qwen3"
HF_ARCHITECTURE = "Qwen3ForCausalLM"
QKV_BIAS = False
QK_NORM = True
SLIDING_WINDOW = False
GGUF_ARCH = "qwen3"
GGUF_ROPE_PERMUTED = False
# Qwen3Config's defaults; head_dim 128 is why a config.json without it is not hidden // heads
DEFAULTS = {"rms_norm_eps": 1e-6, "max_position_embeddings": 32768, "head_dim": 128}


def hf_layer_names(i: int) -> dict[str, str]:
    p = f"model.layers.{i}.self_attn."
    return {**llama_layer_names(i), "q_norm": p + "q_norm.weight", "k_norm": p + "k_norm.weight"}


def arch_fields(config: dict, source: str) -> dict:
    refuse_true(config, source, ("attention_bias",), "biased Qwen3 attention is unsupported")
    refuse_true(
        config, source, ("use_sliding_window",), "Qwen sliding-window attention is unsupported"
    )
    return {}


def hf_config(arch) -> dict:
    cfg = base_hf_config(arch, MODEL_TYPE, HF_ARCHITECTURE)
    cfg.update(
        attention_bias=False,
        use_sliding_window=False,
        sliding_window=None,
        max_window_layers=arch.num_layers,
    )
    return cfg


def _qwen3(**shape) -> dict:
    return {
        "model_type": "qwen3",
        "head_dim": 128,
        "num_key_value_heads": 8,
        "vocab_size": 151936,
        "max_position_embeddings": 40960,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        **shape,
    }


PRESETS: dict[str, dict] = {
    # Qwen/Qwen3-0.6B
    "qwen3-0.6b": _qwen3(
        hidden_size=1024,
        intermediate_size=3072,
        num_hidden_layers=28,
        num_attention_heads=16,
        tie_word_embeddings=True,
    ),
    # Qwen/Qwen3-8B
    "qwen3-8b": _qwen3(
        hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32
    ),
    # Qwen/Qwen3-32B
    "qwen3-32b": _qwen3(
        hidden_size=5120, intermediate_size=25600, num_hidden_layers=64, num_attention_heads=64
    ),
}
