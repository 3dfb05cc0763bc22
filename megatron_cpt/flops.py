"""Training FLOPs of a Llama model, counted exactly (matmuls only), for TFLOP/s and MFU.

Per token, the forward pass does 2 FLOPs per weight of every matmul (Q, K, V, O, gate, up, down
in each layer, plus the LM head, which is a matmul even when tied to the embedding; the
embedding lookup itself is not). Attention adds QK^T and AV: 2·2·s·(heads·head_dim) per layer
per token at sequence length s, counted for the full s×s square as Megatron-LM and NeMo do (a
causal kernel skips about half; MFU figures then compare like with like). Backward costs twice
the forward, so training is 3× forward:

    F_token = 6·[L·(h·(n_q + 2·n_kv)·d + n_q·d·h + 3·h·f) + h·V] + 12·L·s·n_q·d

with L layers, hidden h, n_q query heads, n_kv KV heads, head dim d, FFN size f, vocabulary V
(padded: the LM head computes every padded row), sequence length s. A GeLU MLP (no
``--swiglu``) has 2·h·f weights instead of 3·h·f. Norms, RoPE, softmax and
the loss are O(h) per token and left out, as everywhere.
"""

from __future__ import annotations

from megatron_cpt.model.arch import LlamaArch


def matmul_params_per_layer(arch: LlamaArch) -> int:
    h, d = arch.hidden_size, arch.kv_channels
    qkv = h * (arch.num_attention_heads + 2 * arch.num_query_groups) * d
    out = arch.num_attention_heads * d * h
    mlp = (3 if arch.swiglu else 2) * h * arch.ffn_hidden_size  # gate+up+down, or fc1+fc2
    return qkv + out + mlp


def training_flops_per_token(
    arch: LlamaArch, seq_length: int, padded_vocab: int | None = None
) -> int:
    vocab = padded_vocab or arch.vocab_size
    dense = arch.num_layers * matmul_params_per_layer(arch) + arch.hidden_size * vocab
    attention = 12 * arch.num_layers * seq_length * arch.num_attention_heads * arch.kv_channels
    return 6 * dense + attention


def training_flops_per_step(
    arch: LlamaArch, seq_length: int, global_batch_size: int, padded_vocab: int | None = None
) -> int:
    return global_batch_size * seq_length * training_flops_per_token(arch, seq_length, padded_vocab)
