"""LlamaArch -> megatron-core ``TransformerConfig`` + layer spec -> ``GPTModel``.

The mapping is the whole of "what makes a GPTModel a Llama": RMSNorm, SwiGLU (gated linear unit
with SiLU), no biases, grouped-query attention, RoPE with the checkpoint's base (and Llama-3.1
frequency scaling), and tied or untied output embeddings. A flags-only Megatron-LM model may
choose otherwise (LayerNorm, GeLU MLP, biases, learned absolute positions, partial RoPE); each
``LlamaArch`` choice maps onto the megatron-core option of the same name. The layer spec is
Transformer Engine's on a GPU when TE imports (fused kernels, FP8), megatron-core's local one
otherwise, with PyTorch SDPA as its core attention by default (``sdpa_attention.py``); all
produce the same parameter names for dist_checkpointing, so checkpoints move between them.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from megatron_cpt import platform
from megatron_cpt.errors import UserError
from megatron_cpt.model.arch import LlamaArch


def padded_vocab_size(vocab_size: int, tp: int = 1, divisible_by: int = 128) -> int:
    """Megatron-LM's vocab padding: a multiple of ``divisible_by * tp`` so every TP shard of the
    embedding has the same, GEMM-friendly width. Extra rows are never the target of a label."""
    multiple = divisible_by * tp
    return ((vocab_size + multiple - 1) // multiple) * multiple


@dataclass
class ModelBuildConfig:
    """How (not what) to build: parallelism, precision and memory trade-offs."""

    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    context_parallel: int = 1
    sequence_parallel: bool = False
    bf16: bool = False
    fp8_format: str | None = None  # "e4m3" | "hybrid", Transformer Engine only
    recompute_activations: bool = False  # = recompute_granularity "selective"
    recompute_granularity: str | None = None  # "full" | "selective"
    recompute_method: str | None = None  # "uniform" | "block" (full only)
    recompute_num_layers: int | None = None
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0
    fp8_recipe: str | None = None  # TE only, like fp8_format
    fp8_amax_history_len: int | None = None
    fp8_amax_compute_algo: str | None = None
    init_method_std: float = 0.02
    make_vocab_size_divisible_by: int = 128
    use_transformer_engine: bool | None = None  # None: when it imports (GPU only)
    pipeline_dtype: torch.dtype | None = None
    # Megatron-LM's --attention-backend (megatron-core's AttnBackend names); see core_attention.
    attention_backend: str = "auto"
    # Megatron-LM's --calculate-per-token-loss (grads scaled by the global loss-token count) and
    # --cross-entropy-loss-fusion (megatron-core's native fused cross entropy; CUDA only).
    calculate_per_token_loss: bool = False
    cross_entropy_loss_fusion: bool = False


ATTENTION_BACKENDS = ("auto", "flash", "fused", "unfused", "local")


def validate_parallelism(arch: LlamaArch, build: ModelBuildConfig, world_size: int) -> None:
    """Config errors that megatron-core would only hit as an assert deep in model construction."""
    tp, pp, cp = build.tensor_parallel, build.pipeline_parallel, build.context_parallel
    for name, value in (("tensor", tp), ("pipeline", pp), ("context", cp)):
        if value < 1:
            raise UserError(f"--{name}-model-parallel-size must be >= 1, got {value}")
    if world_size % (tp * pp * cp):
        raise UserError(f"world size {world_size} is not divisible by TP*PP*CP = {tp}*{pp}*{cp}")
    if arch.num_attention_heads % tp:
        raise UserError(
            f"--tensor-model-parallel-size {tp} does not divide num_attention_heads "
            f"({arch.num_attention_heads})"
        )
    if arch.num_query_groups % tp:
        raise UserError(
            f"--tensor-model-parallel-size {tp} does not divide num_query_groups "
            f"({arch.num_query_groups})"
        )
    if arch.ffn_hidden_size % tp:
        raise UserError(
            f"--tensor-model-parallel-size {tp} does not divide ffn_hidden_size "
            f"({arch.ffn_hidden_size})"
        )
    if arch.num_layers % pp:
        raise UserError(
            f"--pipeline-model-parallel-size {pp} does not divide num_layers ({arch.num_layers})"
        )
    if build.sequence_parallel and not use_te(build):
        raise UserError("--sequence-parallel needs Transformer Engine (a GPU with TE installed)")
    if build.fp8_format and not use_te(build):
        raise UserError("--fp8-format needs Transformer Engine (a GPU with TE installed)")
    if build.attention_backend not in ATTENTION_BACKENDS:
        raise UserError(
            f"--attention-backend must be one of {', '.join(ATTENTION_BACKENDS)}, "
            f"got {build.attention_backend!r}"
        )
    if (
        build.attention_backend == "flash"
        and not build.bf16
        and not use_te(build)
        and platform.sdpa_kernel_dtypes_restricted()
    ):
        raise UserError("--attention-backend flash needs --bf16 (flash kernels are bf16/fp16 only)")
    if build.fp8_format not in (None, "e4m3", "hybrid"):
        raise UserError(f"--fp8-format must be e4m3 or hybrid, got {build.fp8_format!r}")


def use_te(build: ModelBuildConfig) -> bool:
    if build.use_transformer_engine is None:
        return platform.have_transformer_engine()
    if build.use_transformer_engine and not platform.have_transformer_engine():
        raise UserError("Transformer Engine was requested but does not import (needs a GPU)")
    return build.use_transformer_engine


def build_transformer_config(arch: LlamaArch, build: ModelBuildConfig | None = None, **overrides):
    """megatron-core ``TransformerConfig`` for a Llama. ``overrides`` go straight through."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    build = build or ModelBuildConfig()
    arch.validate()
    dtype = torch.bfloat16 if build.bf16 else torch.float32
    kwargs = dict(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_query_groups,
        kv_channels=arch.kv_channels,
        layernorm_epsilon=arch.norm_eps,
        normalization=arch.normalization,
        gated_linear_unit=arch.swiglu,
        activation_func=F.silu if arch.swiglu else F.gelu,
        add_bias_linear=arch.add_bias_linear,
        add_qkv_bias=arch.add_bias_linear or arch.qkv_bias,  # Qwen2: q/k/v biases only
        qk_layernorm=arch.qk_norm,  # Qwen3: the spec's norm over each q/k head
        hidden_dropout=build.hidden_dropout,
        attention_dropout=build.attention_dropout,
        init_method_std=build.init_method_std,
        tensor_model_parallel_size=build.tensor_parallel,
        pipeline_model_parallel_size=build.pipeline_parallel,
        context_parallel_size=build.context_parallel,
        sequence_parallel=build.sequence_parallel,
        params_dtype=dtype,
        bf16=build.bf16,
        pipeline_dtype=build.pipeline_dtype or dtype,
        attention_softmax_in_fp32=True,
        apply_query_key_layer_scaling=False,
        variable_seq_lengths=False,
    )
    granularity = build.recompute_granularity or (
        "selective" if build.recompute_activations else None
    )
    if granularity:
        kwargs.update(recompute_granularity=granularity)
    if granularity == "full":
        kwargs.update(
            recompute_method=build.recompute_method or "uniform",
            recompute_num_layers=build.recompute_num_layers or 1,
        )
    if build.fp8_format:
        kwargs.update(fp8=build.fp8_format)
        if build.fp8_recipe:
            kwargs.update(fp8_recipe=build.fp8_recipe)
        if build.fp8_amax_history_len:
            kwargs.update(fp8_amax_history_len=build.fp8_amax_history_len)
        if build.fp8_amax_compute_algo:
            kwargs.update(fp8_amax_compute_algo=build.fp8_amax_compute_algo)
    if use_te(build):
        # TE reads the choice from the config (it sets NVTE_* accordingly). Without TE the value
        # stays "auto": the choice is made in the layer spec, and megatron-core asserts that
        # NVTE_* never change within a process, which building both kinds (tests) would do.
        from megatron.core.transformer.enums import AttnBackend

        kwargs.update(attention_backend=AttnBackend[build.attention_backend])
    kwargs.update(platform.model_config_overrides())
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def core_attention(build: ModelBuildConfig) -> type | None:
    """The core-attention module for ``--attention-backend``, or None to keep the spec's own.

    With TE: its attention, which picks flash / fused (cuDNN) / unfused from the config;
    ``local`` is megatron-core's own unfused ``DotProductAttention``, as in Megatron-LM.
    Without TE: ``auto`` is ``SDPAttention`` (PyTorch's choice of kernel), ``flash`` and
    ``fused`` restrict it to the flash resp. cuDNN / memory-efficient kernels (on a GPU; a
    CPU has one fused kernel), and ``unfused`` / ``local`` are ``DotProductAttention``.
    """
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    name = build.attention_backend
    if use_te(build):
        return DotProductAttention if name == "local" else None
    if name in ("unfused", "local"):
        return DotProductAttention
    from torch.nn.attention import SDPBackend

    from megatron_cpt.model.sdpa_attention import SDPAttention

    kernels = {
        "auto": None,
        "flash": (SDPBackend.FLASH_ATTENTION,),
        "fused": (SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION),
    }[name]
    return SDPAttention.with_kernels(kernels)


def layer_spec(build: ModelBuildConfig, arch: LlamaArch | None = None):
    """Transformer Engine's spec when TE is used, else megatron-core's local one with the
    arch's norm; ``arch.qk_norm`` adds a per-head norm on queries and keys before RoPE (Qwen3);
    the core attention follows ``--attention-backend`` (``core_attention``)."""
    from megatron.core.models.gpt import gpt_layer_specs

    qk_norm = arch.qk_norm if arch is not None else False
    if use_te(build):
        spec = gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_norm)
    else:
        normalization = arch.normalization if arch is not None else "RMSNorm"
        spec = gpt_layer_specs.get_gpt_layer_local_spec(
            normalization=normalization, qk_layernorm=qk_norm
        )
    attention = core_attention(build)
    if attention is not None:  # the spec objects are built fresh per call: safe to edit
        spec.submodules.self_attention.submodules.core_attention = attention
    return spec


def build_model(
    arch: LlamaArch,
    config,
    pre_process: bool | None = None,
    post_process: bool | None = None,
    build: ModelBuildConfig | None = None,
    vocab_size: int | None = None,
    max_sequence_length: int | None = None,
    meta: bool = False,
):
    """A megatron-core ``GPTModel`` shaped like ``arch`` for this rank's pipeline stage.

    ``pre_process``/``post_process`` default to whether this rank holds the first/last stage.
    ``meta=True`` builds the parameters on the meta device: shapes and sharding metadata without
    memory, for a converter that streams tensors straight into a checkpoint (needs
    ``use_cpu_initialization``, else megatron-core places parameters on an explicit device).
    Llama-3.1 RoPE scaling is applied with all four HF parameters (megatron-core's GPTModel
    only forwards ``factor`` and hard-codes the others), so logits match HF exactly.
    """
    from megatron.core import parallel_state

    platform.apply_cpu_patches()
    build = build or ModelBuildConfig(
        tensor_parallel=config.tensor_model_parallel_size,
        pipeline_parallel=config.pipeline_model_parallel_size,
        bf16=config.bf16,
    )
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=True)
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
    if vocab_size is None:
        vocab_size = padded_vocab_size(
            arch.vocab_size, config.tensor_model_parallel_size, build.make_vocab_size_divisible_by
        )
    if meta and not config.use_cpu_initialization:
        raise ValueError("build_model(meta=True) needs TransformerConfig.use_cpu_initialization")
    with torch.device("meta") if meta else contextlib.nullcontext():
        model = _gpt_model(
            arch, config, build, pre_process, post_process, vocab_size, max_sequence_length
        )
    if not meta:
        model.to(platform.device())  # this rank's GPU; a no-op on CPU
    return model


def _gpt_model(arch, config, build, pre_process, post_process, vocab_size, max_sequence_length):
    from megatron.core.models.gpt import GPTModel

    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(build, arch),
        vocab_size=vocab_size,
        max_sequence_length=max_sequence_length or arch.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=arch.tie_word_embeddings,
        position_embedding_type=arch.position_embedding_type,
        rotary_percent=arch.rotary_percent,
        rotary_base=arch.rope_theta,
    )
    if arch.rope_scaling is not None:
        rope = model.rotary_pos_emb
        dim = int(arch.kv_channels * arch.rotary_percent)
        base = 1.0 / (
            arch.rope_theta
            ** (torch.arange(0, dim, 2, dtype=torch.float32, device=rope.inv_freq.device) / dim)
        )
        rope.inv_freq = rope._apply_scaling(
            base,
            factor=arch.rope_scaling.factor,
            low_freq_factor=arch.rope_scaling.low_freq_factor,
            high_freq_factor=arch.rope_scaling.high_freq_factor,
            original_max_position_embeddings=arch.rope_scaling.original_max_position_embeddings,
        )
    return model


def build_model_chunks(arch: LlamaArch, config, build: ModelBuildConfig | None = None, **kwargs):
    """The list of model chunks megatron-core's schedules and dist_checkpointing expect
    (one chunk per rank; virtual pipeline stages are not used)."""
    return [build_model(arch, config, build=build, **kwargs)]
