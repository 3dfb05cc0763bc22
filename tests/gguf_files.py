"""Write an HF Llama as a GGUF file the way llama.cpp's ``convert_hf_to_gguf.py`` does, with the
``gguf`` package's own writer: llama metadata keys, q/k rows permuted into GGML's interleaved
rotary order, matrices quantized, norms kept F32, no ``output.weight`` when embeddings are tied.

Used by the GGUF import tests and by ``bench/convert_memory.py --source gguf``.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp ``LlamaModel.permute``: HF rotate-half rows -> GGML's interleaved order."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def write_llama_gguf(
    config,
    tensors: Iterable[tuple[str, torch.Tensor]],
    path: Path,
    matrix_type: str = "Q8_0",
    extra_tensors: Iterable[tuple[str, np.ndarray]] = (),
    architecture: str = "llama",
) -> Path:
    """``tensors``: (HF name, tensor) pairs of a Llama-layout model with HF ``config``; for
    ``architecture`` qwen2/qwen3 q/k rows stay in HF order, as llama.cpp writes those."""
    import gguf

    head_dim = config.hidden_size // config.num_attention_heads
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(head_dim)
    rope = getattr(config, "rope_parameters", None) or {"rope_theta": config.rope_theta}
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    qtype = gguf.GGMLQuantizationType[matrix_type]
    arch = {name: a for a, name in gguf.MODEL_ARCH_NAMES.items()}.get(architecture)
    names = gguf.get_tensor_name_map(arch or gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    permute = architecture == "llama"
    for hf_name, tensor in tensors:
        if config.tie_word_embeddings and hf_name == "lm_head.weight":
            continue
        base, suffix = hf_name.rsplit(".", 1)
        array = tensor.float().numpy()
        if permute and base.endswith("q_proj") and suffix == "weight":
            array = llama_cpp_permute(array, config.num_attention_heads)
        elif permute and base.endswith("k_proj") and suffix == "weight":
            array = llama_cpp_permute(array, config.num_key_value_heads)
        gguf_name = f"{names.get_name(base)}.{suffix}"
        if array.ndim == 2:
            writer.add_tensor(gguf_name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(gguf_name, array)
    for name, array in extra_tensors:
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
