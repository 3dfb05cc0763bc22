"""What the Llama-layout families share: the HF config keys every one of them spells the same
way, and the tensor names of a Llama decoder layer (the other families add to these)."""

from __future__ import annotations

import dataclasses


def base_hf_config(arch, model_type: str, architecture: str) -> dict:
    """The keys Llama, Mistral, Qwen2 and Qwen3 configs share (transformers 4.x and 5.x)."""
    cfg = {
        "architectures": [architecture],
        "model_type": model_type,
        "hidden_size": arch.hidden_size,
        "intermediate_size": arch.ffn_hidden_size,
        "num_hidden_layers": arch.num_layers,
        "num_attention_heads": arch.num_attention_heads,
        "num_key_value_heads": arch.num_query_groups,
        "head_dim": arch.kv_channels,
        "vocab_size": arch.vocab_size,
        "max_position_embeddings": arch.max_position_embeddings,
        "rope_theta": float(arch.rope_theta),
        "rope_scaling": None,
        "rms_norm_eps": arch.norm_eps,
        "tie_word_embeddings": arch.tie_word_embeddings,
        "hidden_act": "silu",
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
    }
    if arch.rope_scaling is not None:
        cfg["rope_scaling"] = {"rope_type": "llama3", **dataclasses.asdict(arch.rope_scaling)}
    return cfg


def llama_layer_names(i: int) -> dict[str, str]:
    """Role -> HF tensor name for decoder layer ``i`` of the Llama layout."""
    p = f"model.layers.{i}."
    return {
        "input_norm": p + "input_layernorm.weight",
        "q": p + "self_attn.q_proj.weight",
        "k": p + "self_attn.k_proj.weight",
        "v": p + "self_attn.v_proj.weight",
        "o": p + "self_attn.o_proj.weight",
        "post_norm": p + "post_attention_layernorm.weight",
        "gate": p + "mlp.gate_proj.weight",
        "up": p + "mlp.up_proj.weight",
        "down": p + "mlp.down_proj.weight",
    }


def refuse_true(config: dict, source: str, keys: tuple[str, ...], why: str) -> None:
    from megatron_cpt.errors import UserError

    for key in keys:
        if config.get(key):
            raise UserError(f"{source}: field '{key}' is {config[key]!r}; {why}")
