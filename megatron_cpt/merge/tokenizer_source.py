"""Checks on the tokenizer a merge copies into its output, before anything is merged.

A merged model is only usable with a tokenizer whose ids index its embedding rows. Without
these checks a ``tokenizer_source`` with another vocabulary (49,152 tokens for a 1,000-row
model) was attached silently, a directory without tokenizer files gave a model with none, and a
``tokenizer.json`` that was a symlink was followed, copying whatever it pointed at (any file the
user can read) into an output that may then be published.
"""

from __future__ import annotations

import json
from pathlib import Path

from megatron_cpt.errors import UserError
from megatron_cpt.safetensors_io import TOKENIZER_FILES

# The files that hold a vocabulary (named in the error when a directory has no tokenizer files).
_VOCABULARY_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def refuse_symlinks(directory: Path, what: str) -> None:
    """Tokenizer files are copied by content: a symlink would copy its target instead."""
    for name in TOKENIZER_FILES:
        if (directory / name).is_symlink():
            raise UserError(
                f"{what}: {directory / name} is a symlink; refusing to copy the file it points "
                "to (copy the real file there instead)"
            )


def vocabulary_size(directory: Path) -> int | None:
    """Number of token ids in ``tokenizer.json`` (base vocabulary and added tokens)."""
    file = directory / "tokenizer.json"
    if not file.is_file():
        return None
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise UserError(f"{file}: invalid JSON ({exc})") from None
    vocab = (data.get("model") or {}).get("vocab") or {}
    ids = list(vocab.values()) if isinstance(vocab, dict) else list(range(len(vocab)))
    ids += [t.get("id") for t in data.get("added_tokens") or [] if isinstance(t, dict)]
    ids = [i for i in ids if isinstance(i, int)]
    return max(ids) + 1 if ids else 0


def check_tokenizer_source(
    source_dir: Path, *, explicit: bool, vocab_rows: int | None, base_dir: Path | None
) -> None:
    """``source_dir`` holds the tokenizer the output gets (``explicit``: named by the user)."""
    what = "tokenizer_source" if explicit else "base model tokenizer"
    refuse_symlinks(source_dir, what)
    if not explicit:
        return
    if not any((source_dir / name).is_file() for name in TOKENIZER_FILES):
        raise UserError(
            f"tokenizer_source {source_dir}: no tokenizer files there (expected "
            f"{', '.join(_VOCABULARY_FILES)} and/or tokenizer_config.json)"
        )
    size = vocabulary_size(source_dir)
    if size is not None and vocab_rows is not None and size > vocab_rows:
        raise UserError(
            f"tokenizer_source {source_dir}: its vocabulary has {size} tokens but the merged "
            f"model has {vocab_rows} embedding rows; it belongs to another model"
        )
    base_size = vocabulary_size(base_dir) if base_dir is not None else None
    if size is not None and base_size is not None and size != base_size:
        raise UserError(
            f"tokenizer_source {source_dir}: {size} tokens, but the base model's tokenizer has "
            f"{base_size}; the merged embeddings follow the base's vocabulary"
        )
