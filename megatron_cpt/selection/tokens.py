"""Token counts for ``--tokens`` budgets and the summary's token totals.

A token budget only means something in the tokenizer the corpus will be trained with, so
``--tokenizer`` takes that tokenizer (an HF directory or a ``.gguf`` file). Without one, counts
are whitespace-separated words, and the summary says so (``token_unit``). Counts exclude special
tokens (BOS/EOS), which preprocessing adds per document, identically for every selection.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from megatron_cpt.errors import UserError


@dataclass(frozen=True)
class TokenCounterConfig:
    tokenizer: str | None = None  # HF tokenizer dir, .gguf file, or None for whitespace words


class TokenCounter:
    name = "tokens"

    def __init__(self, config: TokenCounterConfig):
        self.config = config
        self.calls = 0
        self._tok = None
        if config.tokenizer is None:
            self.unit = "whitespace_words"
            self.key = "tokens|whitespace"
            return
        self.path = Path(config.tokenizer).expanduser()
        if not self.path.exists():
            raise UserError(f"--tokenizer {config.tokenizer}: no such file or directory")
        self.unit = f"tokens:{self.path.name}"
        if self.path.is_file():
            self.key = f"tokens|{self.path.name}:{self.path.stat().st_size}"
        else:
            self.key = f"tokens|{self.path.resolve()}"

    def _load(self):
        if self._tok is None:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            from transformers import AutoTokenizer

            where, kwargs = self.path, {}
            if self.path.suffix == ".gguf":
                where, kwargs = self.path.parent, {"gguf_file": self.path.name}
            try:
                self._tok = AutoTokenizer.from_pretrained(where, **kwargs)
            except (OSError, ValueError) as exc:
                raise UserError(f"--tokenizer {self.path}: cannot load ({exc})") from None
        return self._tok

    def score(self, texts: list[str]) -> list[float]:
        self.calls += 1
        if self.config.tokenizer is None:
            return [float(len(t.split())) for t in texts]
        tok = self._load()
        ids = tok(texts, add_special_tokens=False)["input_ids"]
        return [float(len(x)) for x in ids]
