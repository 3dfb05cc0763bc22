"""Llama architectures and their megatron-core GPTModel."""

from megatron_cpt.model.arch import PRESETS, LlamaArch, RopeScaling, from_hf_config, get_arch
from megatron_cpt.model.builder import (
    ModelBuildConfig,
    build_model,
    build_model_chunks,
    build_transformer_config,
    layer_spec,
    padded_vocab_size,
    validate_parallelism,
)

__all__ = [
    "PRESETS",
    "LlamaArch",
    "ModelBuildConfig",
    "RopeScaling",
    "build_model",
    "build_model_chunks",
    "build_transformer_config",
    "from_hf_config",
    "get_arch",
    "layer_spec",
    "padded_vocab_size",
    "validate_parallelism",
]
