"""The one seam every evaluator goes through: "logits for a batch of token ids".

Perplexity, bits-per-byte and the lm-eval adapter only need next-token logits and a tokenizer,
so HF models and Megatron checkpoints (any TP/PP, loaded by ``megatron_cpt.convert.loading``)
plug in behind the same two small protocols. Keeping the seam this narrow is what lets
"HF vs Megatron perplexity agrees" be a meaningful test: the scoring code is literally shared.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from megatron_cpt.errors import UserError


@runtime_checkable
class Tokenizer(Protocol):
    """Plain text <-> ids without implicit special tokens (callers add BOS/EOS explicitly)."""

    bos_id: int | None
    eos_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


@runtime_checkable
class Backend(Protocol):
    """A causal LM seen only through its logits."""

    name: str
    tokenizer: Tokenizer
    max_length: int  # longest input the model was built for (positions)

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``[batch, seq]`` int64 -> ``[batch, seq, vocab]`` float logits (causal, no mask)."""
        ...


class HFTokenizer:
    """Adapter over a ``transformers`` tokenizer that never adds special tokens implicitly.

    HF tokenizers disagree on whether ``encode`` prepends BOS; scoring needs to know exactly
    which tokens are predicted, so special tokens are always explicit at this layer.
    """

    def __init__(self, tokenizer):
        self.hf = tokenizer
        self.bos_id = tokenizer.bos_token_id
        self.eos_id = tokenizer.eos_token_id
        # whether the tokenizer's own default encode prepends BOS (Llama-3 does, SmolLM2 not);
        # lm-eval's HF model follows that default, so the adapter does too
        probe = tokenizer.encode("a")
        self.adds_bos = bool(probe) and self.bos_id is not None and probe[0] == self.bos_id

    def encode(self, text: str) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=False))

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=False)


@dataclass
class HFBackendConfig:
    path: str  # a model directory or a single ``.gguf`` file
    dtype: str = "float32"  # float32 | bfloat16 | float16
    device: str = "cpu"
    max_length: int | None = None  # override the model's max_position_embeddings


def _torch_dtype(name: str) -> torch.dtype:
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[
            name
        ]
    except KeyError:
        raise UserError(f"--dtype {name}: expected one of float32, bfloat16, float16") from None


def _hf_location(path: str) -> tuple[str, dict]:
    """``from_pretrained`` arguments for a directory or a GGUF file (which lives in a dir)."""
    p = Path(path).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return str(p.parent), {"gguf_file": p.name}
    if p.is_dir():
        if not (p / "config.json").exists():
            raise UserError(f"{p}: not a Hugging Face model directory (no config.json)")
        return str(p), {}
    raise UserError(f"{p}: no such model directory or .gguf file")


class HFBackend:
    """A ``transformers`` causal LM (directory or GGUF file), evaluated without KV cache."""

    def __init__(self, model, tokenizer, name: str = "hf", max_length: int | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer if isinstance(tokenizer, Tokenizer) else HFTokenizer(tokenizer)
        self.name = name
        self.device = next(model.parameters()).device
        self.max_length = max_length or int(
            getattr(model.config, "max_position_embeddings", 2048) or 2048
        )

    @classmethod
    def from_config(cls, cfg: HFBackendConfig) -> HFBackend:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        location, extra = _hf_location(cfg.path)
        try:
            tokenizer = AutoTokenizer.from_pretrained(location, **extra)
            model = AutoModelForCausalLM.from_pretrained(
                location, dtype=_torch_dtype(cfg.dtype), **extra
            )
        except (OSError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"{cfg.path}: cannot load as a Hugging Face model: {first}") from None
        model.to(cfg.device)
        return cls(model, tokenizer, name=str(cfg.path), max_length=cfg.max_length)

    @torch.inference_mode()
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=input_ids.to(self.device), use_cache=False)
        return out.logits.float()


@dataclass
class BackendSpec:
    """Which model to evaluate: exactly one of ``hf`` or ``megatron``."""

    hf: str | None = None  # HF model directory or .gguf file
    megatron: str | None = None  # Megatron (torch_dist) checkpoint directory
    tokenizer: str | None = None  # Megatron only: overrides the checkpoint's recorded tokenizer
    tp: int = 1
    pp: int = 1
    dtype: str = "float32"
    max_length: int | None = None


def load_backend(spec: BackendSpec) -> Backend:
    if (spec.hf is None) == (spec.megatron is None):
        raise UserError("give exactly one model: --hf PATH or --megatron CKPT_DIR")
    if spec.hf is not None:
        if spec.tokenizer is not None:
            raise UserError("--tokenizer is for --megatron checkpoints; an HF model has its own")
        if spec.tp != 1 or spec.pp != 1:
            raise UserError("--tp/--pp apply to --megatron checkpoints only")
        return HFBackend.from_config(
            HFBackendConfig(spec.hf, dtype=spec.dtype, max_length=spec.max_length)
        )
    from megatron_cpt.evaluation.megatron_backend import MegatronBackend

    return MegatronBackend.load(
        spec.megatron,
        tokenizer=spec.tokenizer,
        tp=spec.tp,
        pp=spec.pp,
        max_length=spec.max_length,
        dtype=spec.dtype,
    )
