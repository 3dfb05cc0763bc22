"""Llama-layout architecture: the few numbers that define a checkpoint, and their HF spelling.

The families with the Llama layout (Llama, Mistral, Qwen2/2.5, Qwen3: see
``megatron_cpt.model.families``) share this one dataclass; ``family`` names the HF
``model_type`` and with it the family's extra tensors (Qwen2's q/k/v biases, Qwen3's per-head
q/k RMSNorm) and config keys (Mistral's sliding window).

One dataclass is the contract between the trainer, the HF <-> Megatron converter, merging and
evaluation: whatever is written into a checkpoint's metadata is ``LlamaArch.to_hf_config()``, and
whatever a user points us at (an HF ``config.json``, a ``PretrainedConfig``) goes through
``from_hf_config``. Presets are exactly the published HF configs, so a converted Meta checkpoint
and a preset-built model agree.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_cpt.errors import UserError


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3.1 "llama3" RoPE frequency scaling (long context); HF ``rope_type: llama3``."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class LlamaArch:
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    vocab_size: int
    max_position_embeddings: int = 8192
    rope_theta: float = 500000.0
    rope_scaling: RopeScaling | None = None
    norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    family: str = "llama"  # the HF model_type: a module of megatron_cpt.model.families
    sliding_window: int | None = None  # Mistral: sequences longer than this are refused
    # Megatron-LM's other architecture choices (a flags-only model, e.g. from-scratch domain
    # pretraining with a GPT-2-style net). Defaults are Llama's; anything else trains with
    # megatron-core but has no HF mapping (``megatron_only_fields``).
    normalization: str = "RMSNorm"  # "RMSNorm" | "LayerNorm"
    swiglu: bool = True  # False: GeLU MLP (one fc1 projection)
    position_embedding_type: str = "rope"  # "rope" | "learned_absolute"
    rotary_percent: float = 1.0
    add_bias_linear: bool = False
    extra: dict = field(default_factory=dict, compare=False, hash=False)  # bos/eos ids etc.

    @property
    def kv_channels(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def family_module(self):
        from megatron_cpt.model.families import get_family

        return get_family(self.family, "model architecture")

    @property
    def qkv_bias(self) -> bool:
        """Biases on q/k/v (Qwen2): megatron-core ``add_qkv_bias``."""
        return self.family_module.QKV_BIAS

    @property
    def qk_norm(self) -> bool:
        """RMSNorm per query/key head (Qwen3): megatron-core ``qk_layernorm``."""
        return self.family_module.QK_NORM

    def check_sequence_length(self, length: int, flag: str) -> None:
        """One line when ``length`` tokens would exceed what this model attends over: its
        position range, or Mistral's sliding window (beyond which HF attends to a window and
        megatron-core's causal attention would not; up to it the two are identical)."""
        if length > self.max_position_embeddings:
            raise UserError(
                f"{flag} {length} exceeds the model's max_position_embeddings "
                f"({self.max_position_embeddings})"
            )
        if self.sliding_window is not None and length > self.sliding_window:
            raise UserError(
                f"{flag} {length} exceeds the model's sliding_window ({self.sliding_window}): "
                "sliding-window attention is not implemented; use at most the window"
            )

    def validate(self) -> LlamaArch:
        def bad(msg: str):
            raise UserError(f"model architecture: {msg}")

        for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads"):
            if getattr(self, name) <= 0:
                bad(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_query_groups <= 0 or self.num_attention_heads % self.num_query_groups:
            bad(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_query_groups ({self.num_query_groups})"
            )
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            bad(
                f"hidden_size ({self.hidden_size}) is not divisible by num_attention_heads "
                f"({self.num_attention_heads}); give head_dim explicitly"
            )
        if self.normalization not in ("RMSNorm", "LayerNorm"):
            bad(f"normalization must be RMSNorm or LayerNorm, got {self.normalization!r}")
        if self.position_embedding_type not in ("rope", "learned_absolute"):
            bad(
                "position_embedding_type must be rope or learned_absolute, got "
                f"{self.position_embedding_type!r}"
            )
        if not 0.0 < self.rotary_percent <= 1.0:
            bad(f"rotary_percent must be in (0, 1], got {self.rotary_percent}")
        if self.rope_scaling is not None and self.position_embedding_type != "rope":
            bad("rope_scaling needs position_embedding_type rope")
        if self.position_embedding_type == "rope":
            if int(self.kv_channels * self.rotary_percent) % 2:
                bad(
                    f"head_dim ({self.kv_channels}) x rotary_percent ({self.rotary_percent}) "
                    "must be even for RoPE"
                )
        self.family_module  # noqa: B018 -- an unknown family fails here, naming the field
        if self.sliding_window is not None and not self.family_module.SLIDING_WINDOW:
            bad(f"family {self.family} has no sliding_window")
        return self

    _LLAMA_CHOICES = (
        ("normalization", "RMSNorm"),
        ("swiglu", True),
        ("position_embedding_type", "rope"),
        ("rotary_percent", 1.0),
        ("add_bias_linear", False),
    )

    def megatron_only_fields(self) -> list[str]:
        """Fields set to a value no HF family expresses (``"swiglu=False"``, ...): such a
        model trains and checkpoints here, but has no HF conversion."""
        return [
            f"{name}={getattr(self, name)}"
            for name, llama in self._LLAMA_CHOICES
            if getattr(self, name) != llama
        ]

    def replace(self, **changes: Any) -> LlamaArch:
        """A copy with some fields changed (``--num-layers`` etc. overrides on a preset)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def differences(self, other: LlamaArch) -> list[str]:
        """Fields that differ (floats compared to float32 precision, since GGUF and bf16
        checkpoints round e.g. ``rms_norm_eps``); ``extra`` (token ids) is ignored."""
        out = []
        fields = sorted(dataclasses.fields(self), key=lambda f: f.name != "family")  # first
        for f in fields:
            if f.name == "extra":
                continue
            a, b = getattr(self, f.name), getattr(other, f.name)
            if f.name == "head_dim":
                a, b = self.kv_channels, other.kv_channels
            if isinstance(a, float) and isinstance(b, float):
                if abs(a - b) <= 1e-6 * max(abs(a), abs(b)):
                    continue
            elif a == b:
                continue
            out.append(f"{f.name}: {a} vs {b}")
        return out

    def num_parameters(self, padded_vocab: int | None = None) -> int:
        """Parameter count (for MFU and logs); untied output layer counted once more."""
        vocab = padded_vocab or self.vocab_size
        h, f, d = self.hidden_size, self.ffn_hidden_size, self.kv_channels
        attn = h * self.num_attention_heads * d * 2 + h * self.num_query_groups * d * 2
        if self.qkv_bias:
            attn += (self.num_attention_heads + 2 * self.num_query_groups) * d
        if self.qk_norm:
            attn += 2 * d
        mlp = (3 if self.swiglu else 2) * h * f
        norm = h if self.normalization == "RMSNorm" else 2 * h  # LayerNorm has a bias
        per_layer = attn + mlp + 2 * norm
        if self.add_bias_linear:
            q, kv = self.num_attention_heads * d, self.num_query_groups * d
            per_layer += q + 2 * kv + h + (2 * f if self.swiglu else f) + h
        emb = vocab * h * (1 if self.tie_word_embeddings else 2)
        if self.position_embedding_type == "learned_absolute":
            emb += self.max_position_embeddings * h
        return self.num_layers * per_layer + emb + norm

    # ---- HF config.json ------------------------------------------------------------------

    def to_hf_config(self) -> dict:
        """This family's ``config.json`` dict (transformers 4.x and 5.x both read these keys)."""
        cfg = self.family_module.hf_config(self)
        # Non-Llama choices are written under our own key (a family's config stays
        # byte-identical); ``from_hf_config(..., megatron_only=True)`` reads them back from
        # checkpoint metadata.
        custom = {
            n: getattr(self, n) for n, llama in self._LLAMA_CHOICES if getattr(self, n) != llama
        }
        if custom:
            cfg[MEGATRON_ONLY_KEY] = custom
        cfg.update(self.extra)
        return cfg


MEGATRON_ONLY_KEY = "megatron_cpt_architecture"
_EXTRA_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "torch_dtype")


def from_hf_config(
    config: dict | str | os.PathLike | Any, megatron_only: bool = False, source: str = "config"
) -> LlamaArch:
    """Build a ``LlamaArch`` from an HF config of a supported family (dict, ``config.json``
    path or directory, or a ``PretrainedConfig``). Handles transformers 4
    (``rope_theta``/``rope_scaling``) and 5 (``rope_parameters``) spellings; a key the file
    leaves out takes the family's transformers default (e.g. Qwen3's ``head_dim`` 128).
    ``megatron_only=True`` (checkpoint metadata) also accepts the non-Llama choices
    ``to_hf_config`` stores under ``MEGATRON_ONLY_KEY``; a user's HF config carrying them is
    refused, since no HF model reads them."""
    from megatron_cpt.model.families import get_family

    if isinstance(config, (str, os.PathLike)):
        path = Path(config)
        if path.is_dir():
            path = path / "config.json"
        source = str(path)
        try:
            config = json.loads(path.read_text())
        except FileNotFoundError:
            raise UserError(f"{path}: HF config not found") from None
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from None
    elif not isinstance(config, dict):
        config = config.to_dict()

    family = get_family(config.get("model_type", "llama"), source)

    def get(key: str, default=None):
        value = config.get(key)
        return family.DEFAULTS.get(key, default) if value is None else value

    def need(key: str):
        if config.get(key) is None:
            raise UserError(f"{source}: missing field '{key}' (not a {family.MODEL_TYPE} config?)")
        return config[key]

    if get("hidden_act", "silu") != "silu":
        raise UserError(f"{source}: field 'hidden_act' must be 'silu'")
    family_fields = family.arch_fields(config, source)

    rope = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or (rope if rope.get("rope_type") == "llama3" else None)
    theta = config.get("rope_theta") or rope.get("rope_theta") or 10000.0
    rope_scaling = None
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind in (None, "default"):
            rope_scaling = None
        elif kind != "llama3":
            raise UserError(f"{source}: field 'rope_scaling' type {kind!r} unsupported (llama3)")
        else:
            rope_scaling = RopeScaling(
                factor=float(scaling["factor"]),
                low_freq_factor=float(scaling["low_freq_factor"]),
                high_freq_factor=float(scaling["high_freq_factor"]),
                original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
            )
    heads = int(need("num_attention_heads"))
    hidden = int(need("hidden_size"))
    head_dim = get("head_dim")
    custom = config.get(MEGATRON_ONLY_KEY) or {}
    if custom and not megatron_only:
        raise UserError(
            f"{source}: field '{MEGATRON_ONLY_KEY}' ({', '.join(custom)}) describes a model "
            "that no HF family expresses; HF models cannot load it"
        )
    known = {name for name, _ in LlamaArch._LLAMA_CHOICES}
    for key in custom:
        if key not in known:
            raise UserError(f"{source}: field '{MEGATRON_ONLY_KEY}.{key}' is unknown")
    return LlamaArch(
        num_layers=int(need("num_hidden_layers")),
        hidden_size=hidden,
        ffn_hidden_size=int(need("intermediate_size")),
        num_attention_heads=heads,
        num_query_groups=int(config.get("num_key_value_heads") or heads),
        vocab_size=int(need("vocab_size")),
        max_position_embeddings=int(get("max_position_embeddings", 2048)),
        rope_theta=float(theta),
        rope_scaling=rope_scaling,
        norm_eps=float(get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        head_dim=None if head_dim in (None, hidden // heads) else int(head_dim),
        family=family.MODEL_TYPE,
        extra={k: config[k] for k in _EXTRA_KEYS if config.get(k) is not None},
        **family_fields,
        **custom,
    ).validate()


def _presets() -> dict[str, LlamaArch]:
    """Every family's presets (published ``config.json`` values) as architectures."""
    from megatron_cpt.model.families import FAMILIES

    return {
        name: from_hf_config(dict(config), source=f"preset {name}")
        for family in FAMILIES.values()
        for name, config in family.PRESETS.items()
    }


PRESETS: dict[str, LlamaArch] = _presets()


def get_arch(name_or_path: str) -> LlamaArch:
    """A preset name, or a path to an HF ``config.json`` / model directory."""
    if name_or_path in PRESETS:
        return PRESETS[name_or_path]
    if os.path.exists(name_or_path):
        return from_hf_config(name_or_path)
    raise UserError(
        f"unknown model {name_or_path!r}: use a preset ({', '.join(PRESETS)}) or a path to an "
        "HF config.json"
    )
