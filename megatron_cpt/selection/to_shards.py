"""Selected documents straight to megatron-core shards (``--output-prefix``).

A 70B-token selection should not be written as JSONL only to be read, parsed and tokenized
again by ``tools/preprocess_data.py``. While the pipeline writes the selected lines, the same raw
lines are handed to the preprocessing machinery (:class:`~megatron_cpt.data.preprocess.
ChunkEncoder` in ``--shard-workers`` processes via ``map_ordered``, then
:class:`~megatron_cpt.data.indexed.IndexedWriter`), so the shards are exactly what
``tools/preprocess_data.py --json-keys <text key>`` would write from the selected JSONL: same
tokenizer, same EOD handling, same ``{prefix}_{key}_document`` naming, written under temporary
names and published only when complete.

Chunks keep the input's line numbers (unselected lines become blank lines, one byte each, which
the encoder skips), so an error in a selected line still names its ``file:line``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

from megatron_cpt.data.indexed import IndexedWriter, token_dtype
from megatron_cpt.data.preprocess import Chunk, ChunkEncoder, map_ordered
from megatron_cpt.errors import BadInputError, UserError
from megatron_cpt.tokenizers import build_tokenizer


@dataclass(frozen=True)
class ShardOutputConfig:
    output_prefix: str
    tokenizer_type: str
    tokenizer_model: str
    append_eod: bool = False
    workers: int = 1
    chunk_bytes: int = 1 << 20


class _ChunkBuilder:
    """Groups selected raw lines into ~``chunk_bytes`` chunks that keep their line numbers."""

    def __init__(self, chunk_bytes: int):
        self.chunk_bytes = chunk_bytes
        self.path: str | None = None
        self.first = self.next_line = 0
        self.parts: list[bytes] = []
        self.size = 0

    def add(self, path: str, line: int, raw: bytes) -> Chunk | None:
        done = None
        if self.parts and (path != self.path or self.size >= self.chunk_bytes):
            done = self.flush()
        if not self.parts:
            self.path, self.first, self.next_line = path, line, line
        gap = line - self.next_line  # unselected lines in between: blank, skipped by the encoder
        self.parts.append(b"\n" * gap + raw.rstrip(b"\n") + b"\n")
        self.size += gap + len(raw) + 1
        self.next_line = line + 1
        return done

    def flush(self) -> Chunk | None:
        if not self.parts:
            return None
        chunk = Chunk(self.path, self.first, b"".join(self.parts))
        self.parts, self.size = [], 0
        return chunk


class SelectedShardWriter:
    """``add(path, line, raw)`` for each selected line in input order, then ``finish()``."""

    def __init__(self, config: ShardOutputConfig, text_key: str):
        if config.workers < 1:
            raise UserError(f"--shard-workers {config.workers}: must be at least 1")
        self.config = config
        self.tokenizer = build_tokenizer(config.tokenizer_type, config.tokenizer_model)
        self.dtype = token_dtype(self.tokenizer.vocab_size)
        self.prefix = f"{config.output_prefix}_{text_key}_document"
        self.encoder = ChunkEncoder(
            self.tokenizer,
            (text_key,),
            self.dtype,
            append_eod=config.append_eod,
            skip_bad_lines=False,
        )
        self._builder = _ChunkBuilder(config.chunk_bytes)

    def run(self, selected_lines: Iterator[tuple[str, int, bytes]]) -> dict:
        """Consume ``(path, line, raw)`` of the selected documents; returns the shard summary."""
        with contextlib.ExitStack() as stack:
            try:
                writer = stack.enter_context(IndexedWriter(self.prefix, self.dtype))
            except OSError as exc:
                raise UserError(
                    f"--output-prefix {self.config.output_prefix}: cannot write ({exc})"
                ) from None
            results = stack.enter_context(
                contextlib.closing(
                    map_ordered(self.encoder, self._chunks(selected_lines), self.config.workers)
                )
            )
            for result in results:
                if result.error is not None:
                    raise BadInputError(*result.error)
                (enc,) = result.keys
                writer.add_documents(enc.tokens, enc.sequence_lengths, enc.sequences_per_document)
            writer.finalize()
        return {
            "prefix": self.prefix,
            "bin": f"{self.prefix}.bin",
            "idx": f"{self.prefix}.idx",
            "documents": writer.documents,
            "tokens": writer.tokens,
            "tokenizer": {"type": self.tokenizer.name, "model": str(self.config.tokenizer_model)},
            "append_eod": self.config.append_eod,
        }

    def _chunks(self, selected_lines) -> Iterator[Chunk]:
        for path, line, raw in selected_lines:
            chunk = self._builder.add(path, line, raw)
            if chunk is not None:
                yield chunk
        chunk = self._builder.flush()
        if chunk is not None:
            yield chunk
