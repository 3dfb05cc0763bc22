"""Core attention on ``torch.nn.functional.scaled_dot_product_attention`` for the local spec.

megatron-core 0.16.1 offers two core-attention modules: Transformer Engine's (fused kernels,
GPU only) and its own unfused ``DotProductAttention``, which materialises the full
``[b, heads, s, s]`` score matrix, a softmax copy of it in fp32 and a dropout copy, and keeps
them for the backward pass (about 48 GiB of activations for a 1B Llama at sequence 4096).
Without TE (our CPU runs, and any GPU where TE is not installed) that unfused module was the
only choice. This module fills the same slot of ``get_gpt_layer_local_spec`` with PyTorch's
SDPA, which dispatches to flash / cuDNN / memory-efficient kernels on a GPU and to the fused
(flash-style, tiled) kernel on a CPU; none of them keeps the score matrix.

It is a drop-in replacement: the constructor takes the same arguments as
``DotProductAttention``, ``forward`` takes ``[s, b, heads, head_dim]`` query/key/value (key and
value with ``num_query_groups`` heads) and returns ``[s, b, heads * head_dim]``, and it has no
parameters (the unfused module has none either, with the default "vanilla" softmax), so
checkpoints are interchangeable. Masks follow megatron-core's convention (boolean, ``True`` =
masked out); without an explicit mask the causal mask is applied by the kernel itself.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.utils import is_layer_window_attention
from megatron.core.utils import divide

from megatron_cpt import platform


class SDPAttention(MegatronModule):
    """``DotProductAttention``'s contract on ``F.scaled_dot_product_attention``.

    ``kernels`` is the list of ``torch.nn.attention.SDPBackend`` members the kernel choice is
    restricted to (``--attention-backend flash`` / ``fused`` on a GPU), or None for PyTorch's
    own choice. It is set on the class by the spec builder (``with_kernels``), because
    megatron-core constructs core attention with a fixed set of keyword arguments.
    """

    kernels: tuple | None = None

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection: ProcessGroupCollection | None = None,
    ):
        super().__init__(config=config)
        # The unfused module's own limits, plus the features it has that SDPA's masks do not
        # express; each refused here, at construction, rather than computed differently.
        if config.context_parallel_size != 1:
            raise ValueError("context parallelism needs Transformer Engine's attention")
        if config.softmax_type != "vanilla":
            raise ValueError(f"softmax_type {config.softmax_type!r} needs the unfused attention")
        if is_layer_window_attention(
            config.window_size, config.window_attn_skip_freq, layer_number
        ):
            raise ValueError("sliding-window attention needs the unfused attention")
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
        self.pg_collection = pg_collection
        self.tp_group = pg_collection.tp
        tp = pg_collection.tp.size()
        projection_size = config.kv_channels * config.num_attention_heads
        self.hidden_size_per_partition = divide(projection_size, tp)
        self.hidden_size_per_attention_head = divide(projection_size, config.num_attention_heads)
        self.num_attention_heads_per_partition = divide(config.num_attention_heads, tp)
        self.num_query_groups_per_partition = divide(config.num_query_groups, tp)
        # ``apply_query_key_layer_scaling`` divides the scores by the layer number before an fp32
        # softmax and multiplies them back inside it: a net no-op that only guards fp16 range.
        # SDPA's kernels accumulate in fp32, so the plain scale is the same maths.
        self.softmax_scale = (
            1.0 / math.sqrt(self.hidden_size_per_attention_head)
            if softmax_scale is None
            else softmax_scale
        )
        self.dropout_p = (
            config.attention_dropout if attention_dropout is None else attention_dropout
        )
        self.softmax_offset = None  # what ``Attention`` may read for the vanilla softmax

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        if packed_seq_params is not None:
            raise ValueError("packed sequences need Transformer Engine's attention")
        if attention_bias is not None:
            raise ValueError("an attention bias is not supported by the local spec's attention")
        sq, b = query.shape[0], query.shape[1]
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        mask, is_causal = None, False
        if attention_mask is not None:
            # megatron-core: True = masked out; SDPA's boolean mask: True = attend.
            mask = ~attention_mask.to(torch.bool)
        elif mask_type == AttnMaskType.causal and sq > 1:
            if sq != key.shape[0]:
                raise ValueError("the implicit causal mask is only for self-attention")
            is_causal = True
        # [s, b, heads, d] -> [b, heads, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        dropout_p = self.dropout_p if self.training else 0.0
        with platform.sdpa_kernels(self.kernels):
            if dropout_p > 0.0 and not self.config.sequence_parallel:
                # Same RNG stream as the unfused module's dropout (differs per TP rank).
                with tensor_parallel.get_cuda_rng_tracker().fork():
                    out = self._sdpa(q, k, v, mask, dropout_p, is_causal)
            else:
                out = self._sdpa(q, k, v, mask, dropout_p, is_causal)
        # [b, heads, s, d] -> [s, b, heads * d]
        return out.permute(2, 0, 1, 3).reshape(sq, b, self.hidden_size_per_partition)

    def _sdpa(self, q, k, v, mask, dropout_p, is_causal):
        return F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=dropout_p,
            is_causal=is_causal,
            scale=self.softmax_scale,
            enable_gqa=self.num_attention_heads_per_partition
            != self.num_query_groups_per_partition,
        )

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """No parameters, hence nothing to checkpoint (as the unfused module, vanilla softmax)."""
        return {}

    @classmethod
    def with_kernels(cls, kernels: tuple | None) -> type:
        """This class, or a subclass whose SDPA calls are restricted to ``kernels``."""
        if not kernels:
            return cls
        return type(cls.__name__, (cls,), {"kernels": tuple(kernels)})
