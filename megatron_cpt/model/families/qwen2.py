"""Qwen2 / Qwen2.5: the Llama layout with biases on the q, k and v projections (not on o, not
in the MLP). megatron-core's ``add_qkv_bias`` gives ``linear_qkv.bias``, fused per query group
like the weight. Qwen's optional sliding window (``use_sliding_window``) is off in every
released checkpoint and refused when on."""

from __future__ import annotations

from megatron_cpt.model.families._common import base_hf_config, llama_layer_names, refuse_true

MODEL_TYPE = "qwen2"
HF_ARCHITECTURE = "Qwen2ForCausalLM"
QKV_BIAS = True
QK_NORM = False
SLIDING_WINDOW = False
GGUF_ARCH = "qwen2"
GGUF_ROPE_PERMUTED = False  # llama.cpp keeps HF's rotate-half order for qwen2
DEFAULTS = {"rms_norm_eps": 1e-6, "max_position_embeddings": 32768}  # Qwen2Config's


def hf_layer_names(i: int) -> dict[str, str]:
    p = f"model.layers.{i}.self_attn."
    return {
        **llama_layer_names(i),
        "q_bias": p + "q_proj.bias",
        "k_bias": p + "k_proj.bias",
        "v_bias": p + "v_proj.bias",
    }


def arch_fields(config: dict, source: str) -> dict:
    refuse_true(
        config, source, ("use_sliding_window",), "Qwen sliding-window attention is unsupported"
    )
    return {}


def hf_config(arch) -> dict:
    cfg = base_hf_config(arch, MODEL_TYPE, HF_ARCHITECTURE)
    cfg.update(use_sliding_window=False, sliding_window=None, max_window_layers=arch.num_layers)
    return cfg


def _qwen25(**shape) -> dict:
    return {
        "model_type": "qwen2",
        "max_position_embeddings": 131072,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "vocab_size": 152064,
        **shape,
    }


PRESETS: dict[str, dict] = {
    # Qwen/Qwen2.5-0.5B
    "qwen2.5-0.5b": _qwen25(
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        vocab_size=151936,
        max_position_embeddings=32768,
        tie_word_embeddings=True,
    ),
    # Qwen/Qwen2.5-1.5B
    "qwen2.5-1.5b": _qwen25(
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        vocab_size=151936,
        tie_word_embeddings=True,
    ),
    # Qwen/Qwen2.5-7B
    "qwen2.5-7b": _qwen25(
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
    ),
    # Qwen/Qwen2.5-72B
    "qwen2.5-72b": _qwen25(
        hidden_size=8192,
        intermediate_size=29568,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        rms_norm_eps=1e-5,
    ),
}
