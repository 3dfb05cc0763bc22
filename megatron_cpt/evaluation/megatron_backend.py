"""Megatron checkpoints behind the logits seam: megatron-core model + the right tokenizer.

The model comes from ``megatron_cpt.convert.loading`` (any TP/PP; at TP/PP > 1 every rank of a
``torchrun`` job builds its shard). Scoring code runs identically on every rank: the last
pipeline stage's logits are broadcast over the pipeline group, so all ranks compute the same
results and rank 0 writes them.

The tokenizer must be the one the checkpoint's data was tokenized with, or perplexity is
meaningless; it is found, in order, from ``--tokenizer``, the HF tokenizer the converter keeps
in ``CKPT/hf/tokenizer``, or the trainer's recorded ``--tokenizer-type/--tokenizer-model``.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from megatron_cpt.errors import UserError
from megatron_cpt.evaluation.backend import HFTokenizer, Tokenizer


class ProjectTokenizer:
    """Adapter over :mod:`megatron_cpt.tokenizers` (tiktoken Llama-3, SentencePiece, HF)."""

    def __init__(self, tokenizer):
        self.impl = tokenizer
        self.bos_id = tokenizer.bos
        self.eos_id = tokenizer.eod
        self.adds_bos = False

    def encode(self, text: str) -> list[int]:
        return list(self.impl.encode(text))

    def decode(self, ids: list[int]) -> str:
        return self.impl.decode(list(ids))


def _hf_tokenizer(path: Path) -> HFTokenizer:
    from transformers import AutoTokenizer

    kwargs = {}
    location = path
    if path.is_file() and path.suffix == ".gguf":
        location, kwargs = path.parent, {"gguf_file": path.name}
    elif path.is_file() and path.name.endswith(".json"):
        from transformers import PreTrainedTokenizerFast

        return HFTokenizer(PreTrainedTokenizerFast(tokenizer_file=str(path)))
    try:
        return HFTokenizer(AutoTokenizer.from_pretrained(str(location), **kwargs))
    except (OSError, ValueError) as exc:
        raise UserError(f"--tokenizer {path}: cannot load ({str(exc).splitlines()[0]})") from None


def tokenizer_from_path(path: str | Path) -> Tokenizer:
    """HF directory/``tokenizer.json``/GGUF -> transformers; a ``.model`` file -> tiktoken
    Llama-3 if it parses as one, else SentencePiece."""
    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(f"--tokenizer {path}: no such file or directory")
    if path.is_dir() or path.suffix in (".gguf", ".json"):
        return _hf_tokenizer(path)
    from megatron_cpt.tokenizers import build_tokenizer

    try:
        return ProjectTokenizer(build_tokenizer("Llama3Tokenizer", path))
    except Exception:
        return ProjectTokenizer(build_tokenizer("SentencePieceTokenizer", path))


def resolve_tokenizer(ckpt_dir: Path, override: str | None) -> Tokenizer:
    if override:
        return tokenizer_from_path(override)
    side = ckpt_dir / "hf" / "tokenizer"
    if side.is_dir():
        return _hf_tokenizer(side)
    from megatron_cpt.training.checkpointing import read_metadata

    try:
        args = read_metadata(ckpt_dir).get("args", {})
    except UserError:
        args = {}
    ttype, tmodel = args.get("tokenizer_type"), args.get("tokenizer_model")
    if ttype == "HuggingFaceTokenizer" and tmodel:
        # through transformers, exactly as the HF backend loads it: same BOS, same ids
        return tokenizer_from_path(tmodel)
    if ttype and tmodel:
        from megatron_cpt.tokenizers import build_tokenizer

        return ProjectTokenizer(build_tokenizer(ttype, tmodel))
    raise UserError(
        f"{ckpt_dir}: no tokenizer recorded in the checkpoint; pass --tokenizer "
        "(HF dir, tokenizer.json, .gguf or tokenizer.model)"
    )


class MegatronBackend:
    def __init__(self, model, arch, tokenizer: Tokenizer, name: str, max_length: int):
        self.model = model
        self.arch = arch
        self.tokenizer = tokenizer
        self.name = name
        self.max_length = max_length

    @classmethod
    def load(
        cls,
        ckpt_dir: str,
        tokenizer: str | None = None,
        tp: int = 1,
        pp: int = 1,
        max_length: int | None = None,
        dtype: str = "float32",
    ) -> MegatronBackend:
        from megatron_cpt.convert.loading import load_megatron_model

        path = Path(ckpt_dir).expanduser()
        if not path.is_dir():
            raise UserError(f"--megatron {path}: no such checkpoint directory")
        torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(dtype)
        if torch_dtype is None:
            raise UserError(f"--dtype {dtype}: Megatron evaluation supports float32 or bfloat16")
        from megatron_cpt.training.checkpointing import resolve_checkpoint_dir

        resolve_checkpoint_dir(path)  # "not a checkpoint" before any tokenizer complaint
        tok = resolve_tokenizer(path, tokenizer)
        model, arch = load_megatron_model(path, tp=tp, pp=pp, dtype=torch_dtype)
        if max_length is None:  # a Mistral window bounds what megatron-core computes exactly
            max_length = min(arch.max_position_embeddings, arch.sliding_window or math.inf)
        arch.check_sequence_length(max_length, "max_length")
        return cls(model, arch, tok, str(path), max_length)

    @torch.inference_mode()
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        from megatron.core import parallel_state

        from megatron_cpt.convert.loading import megatron_logits

        out = megatron_logits(self.model, input_ids, vocab_size=self.arch.vocab_size)
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            shape = (*input_ids.shape, self.arch.vocab_size)
            if out is None:
                out = torch.empty(shape, dtype=torch.float32, device=input_ids.device)
            out = out.contiguous()
            torch.distributed.broadcast(
                out,
                src=parallel_state.get_pipeline_model_parallel_last_rank(),
                group=parallel_state.get_pipeline_model_parallel_group(),
            )
        return out.float().cpu()
