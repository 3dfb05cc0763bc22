"""Mistral: the Llama layout plus a sliding attention window (``sliding_window``; null in
v0.2+). The window is carried in the architecture and *refused* where a sequence would exceed
it (the trainer's ``--seq-length``, evaluation's max length): up to the window, sliding-window
attention is exactly causal attention, which is what megatron-core computes."""

from __future__ import annotations

from megatron_cpt.model.families._common import base_hf_config, llama_layer_names, refuse_true

MODEL_TYPE = "mistral"
HF_ARCHITECTURE = "MistralForCausalLM"
QKV_BIAS = False
QK_NORM = False
SLIDING_WINDOW = True  # arch.sliding_window: refused beyond it
GGUF_ARCH = None  # llama.cpp writes Mistral 7B as "llama": such a GGUF converts as llama
GGUF_ROPE_PERMUTED = True
DEFAULTS = {"rms_norm_eps": 1e-6, "max_position_embeddings": 4096 * 32, "sliding_window": 4096}

hf_layer_names = llama_layer_names


def arch_fields(config: dict, source: str) -> dict:
    refuse_true(config, source, ("attention_bias", "mlp_bias"), "Mistral has no biases")
    window = config["sliding_window"] if "sliding_window" in config else DEFAULTS["sliding_window"]
    return {"sliding_window": None if window is None else int(window)}


def hf_config(arch) -> dict:
    cfg = base_hf_config(arch, MODEL_TYPE, HF_ARCHITECTURE)
    cfg["sliding_window"] = arch.sliding_window
    return cfg


_MISTRAL_7B = {
    "model_type": "mistral",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 32000,
    "max_position_embeddings": 32768,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-5,
    "sliding_window": 4096,
    "tie_word_embeddings": False,
}

PRESETS: dict[str, dict] = {
    # mistralai/Mistral-7B-v0.1 (4096-token sliding window)
    "mistral-7b": _MISTRAL_7B,
    # mistralai/Mistral-7B-v0.3: 32768 vocabulary, rope_theta 1e6, no window
    "mistral-7b-v0.3": {
        **_MISTRAL_7B,
        "vocab_size": 32768,
        "rope_theta": 1000000.0,
        "sliding_window": None,
    },
}
