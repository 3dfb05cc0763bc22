"""Llama (Llama 2/3.x, SmolLM2 and every other ``model_type: llama``): the base layout the
other families extend. No biases, RMSNorm, SwiGLU, GQA, RoPE with optional llama3 scaling."""

from __future__ import annotations

from megatron_cpt.model.families._common import base_hf_config, llama_layer_names, refuse_true

MODEL_TYPE = "llama"
HF_ARCHITECTURE = "LlamaForCausalLM"
QKV_BIAS = False
QK_NORM = False
SLIDING_WINDOW = False
GGUF_ARCH = "llama"  # llama.cpp's name; Mistral GGUFs use it too (and read back as llama)
GGUF_ROPE_PERMUTED = True  # llama.cpp interleaves each q/k head's rows for llama
DEFAULTS = {"rms_norm_eps": 1e-6, "max_position_embeddings": 2048}  # LlamaConfig's

hf_layer_names = llama_layer_names


def arch_fields(config: dict, source: str) -> dict:
    refuse_true(
        config,
        source,
        ("attention_bias", "mlp_bias"),
        "biased Llama variants are not supported (a Qwen2 checkpoint? its model_type is qwen2)",
    )
    return {}


def hf_config(arch) -> dict:
    cfg = base_hf_config(arch, MODEL_TYPE, HF_ARCHITECTURE)
    cfg.update(attention_bias=False, mlp_bias=False)
    return cfg


_LLAMA3 = {
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 8192,
    "rope_theta": 500000.0,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}
_LLAMA3_70B_SHAPE = {
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
}


def _llama31_rope(factor: float) -> dict:
    return {
        "max_position_embeddings": 131072,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": factor,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    }


# The architecture keys of each published config.json (token ids are not architecture).
PRESETS: dict[str, dict] = {
    # meta-llama/Meta-Llama-3-8B
    "llama3-8b": _LLAMA3,
    # meta-llama/Meta-Llama-3-70B
    "llama3-70b": {**_LLAMA3, **_LLAMA3_70B_SHAPE},
    # meta-llama/Llama-3.1-8B: same shapes, 128k context through llama3 RoPE scaling
    "llama3.1-8b": {**_LLAMA3, **_llama31_rope(8.0)},
    # meta-llama/Llama-3.1-70B
    "llama3.1-70b": {**_LLAMA3, **_LLAMA3_70B_SHAPE, **_llama31_rope(8.0)},
    # meta-llama/Llama-3.2-1B: tied embeddings, head_dim 64, RoPE factor 32
    "llama3.2-1b": {
        **_LLAMA3,
        **_llama31_rope(32.0),
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "head_dim": 64,
        "tie_word_embeddings": True,
    },
    # meta-llama/Llama-3.2-3B
    "llama3.2-3b": {
        **_LLAMA3,
        **_llama31_rope(32.0),
        "hidden_size": 3072,
        "intermediate_size": 8192,
        "num_hidden_layers": 28,
        "num_attention_heads": 24,
        "head_dim": 128,
        "tie_word_embeddings": True,
    },
    # meta-llama/Llama-3.3-70B-Instruct (the 3.3 release is instruct-only)
    "llama3.3-70b": {**_LLAMA3, **_LLAMA3_70B_SHAPE, **_llama31_rope(8.0)},
    # HuggingFaceTB/SmolLM2-135M(-Instruct)
    "smollm2-135m": {
        "model_type": "llama",
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "vocab_size": 49152,
        "max_position_embeddings": 8192,
        "rope_theta": 100000.0,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True,
    },
}
