"""From an architecture (and a checkpoint's real shapes) to the mapping's :class:`TensorLayout`.

Also the two config checks users hit first: a checkpoint whose tensors disagree with its own
``config.json``, and a checkpoint that is not the model the user asked for (``--model``).
Both fail with one line that names the field, instead of a shape error deep in megatron-core.
"""

from __future__ import annotations

from megatron_cpt.convert.mapping import TensorLayout, expected_hf_shapes
from megatron_cpt.errors import UserError
from megatron_cpt.model import LlamaArch


def tensor_layout(
    arch: LlamaArch, padded_vocab_size: int, fused_norms: bool = False
) -> TensorLayout:
    return TensorLayout(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_query_groups,
        head_dim=arch.kv_channels,
        ffn_hidden_size=arch.ffn_hidden_size,
        vocab_size=arch.vocab_size,
        padded_vocab_size=padded_vocab_size,
        tie_word_embeddings=arch.tie_word_embeddings,
        fused_norms=fused_norms,
        family=arch.family,
        qkv_bias=arch.qkv_bias,
        qk_norm=arch.qk_norm,
    )


# Which config field a wrong tensor shape most likely comes from, by HF tensor-name suffix.
_FIELD_OF = {
    "embed_tokens.weight": "vocab_size/hidden_size",
    "lm_head.weight": "vocab_size/hidden_size",
    "q_proj.weight": "num_attention_heads/head_dim/hidden_size",
    "q_proj.bias": "num_attention_heads/head_dim",
    "k_proj.bias": "num_key_value_heads/head_dim",
    "v_proj.bias": "num_key_value_heads/head_dim",
    "q_norm.weight": "head_dim",
    "k_norm.weight": "head_dim",
    "k_proj.weight": "num_key_value_heads/head_dim/hidden_size",
    "v_proj.weight": "num_key_value_heads/head_dim/hidden_size",
    "o_proj.weight": "num_attention_heads/head_dim/hidden_size",
    "gate_proj.weight": "intermediate_size/hidden_size",
    "up_proj.weight": "intermediate_size/hidden_size",
    "down_proj.weight": "intermediate_size/hidden_size",
    "norm.weight": "hidden_size",
    "layernorm.weight": "hidden_size",
}


def check_hf_shapes(ckpt, lay: TensorLayout) -> None:
    """Every tensor the config implies exists with the implied shape; extra layers are errors."""
    names = ckpt.names()
    expected = expected_hf_shapes(lay)
    for name, shape in expected.items():
        if name not in names:
            raise UserError(f"{ckpt.path}: tensor {name} missing ({_implied_by(name, lay)})")
        actual = ckpt.shape(name)
        if tuple(actual) != shape:
            field = next((f for s, f in _FIELD_OF.items() if name.endswith(s)), "shape")
            raise UserError(
                f"{ckpt.path}: tensor {name} has shape {list(actual)} but config.json "
                f"({field}) implies {list(shape)}"
            )
    layer_names = {n for n in names if n.startswith("model.layers.")}
    extra = sorted(layer_names - set(expected), key=lambda n: (len(n), n))
    if extra:
        raise UserError(f"{ckpt.path}: unexpected tensor {extra[0]} ({_unexpected(extra[0], lay)})")


def _implied_by(name: str, lay: TensorLayout) -> str:
    """The config field that makes a missing tensor expected."""
    if name.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")):
        return f"config.json model_type={lay.family} has q/k/v biases"
    if name.endswith(("q_norm.weight", "k_norm.weight")):
        return f"config.json model_type={lay.family} has per-head q/k norms"
    return (
        f"config.json: num_hidden_layers={lay.num_layers}, "
        f"tie_word_embeddings={lay.tie_word_embeddings}"
    )


def _unexpected(name: str, lay: TensorLayout) -> str:
    """Why a tensor the config does not imply is there: usually the wrong model_type."""
    if name.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")):
        return f"config.json model_type={lay.family} has no q/k/v biases: a qwen2 checkpoint?"
    if name.endswith(("q_norm.weight", "k_norm.weight")):
        return f"config.json model_type={lay.family} has no q/k norms: a qwen3 checkpoint?"
    return f"config.json model_type={lay.family}, num_hidden_layers={lay.num_layers}"


def check_requested_model(requested: LlamaArch, actual: LlamaArch, requested_name: str) -> None:
    """``--model NAME`` must describe the checkpoint; name the first field that differs.

    Floats compare at float32 precision (``LlamaArch.differences``): a GGUF stores
    ``rms_norm_eps`` as float32, so SmolLM2's 1e-5 reads back as 9.99999975e-06.
    """
    diffs = requested.differences(actual)
    if diffs:
        field, values = diffs[0].split(": ", 1)
        want, got = values.split(" vs ", 1)
        raise UserError(
            f"--model {requested_name}: field '{field}' is {want} but the checkpoint has {got}"
        )
