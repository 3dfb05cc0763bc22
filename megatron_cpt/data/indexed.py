"""Writing and validating megatron-core ``.bin/.idx`` shard pairs.

Why not megatron-core's ``IndexedDatasetBuilder`` directly: it takes one torch tensor per
document and keeps Python lists of every length, which costs more than tokenization itself on
large corpora, and it writes straight to the final names. This writer takes whole chunks of
documents as numpy arrays, writes the ``.bin`` incrementally under a temporary name and produces
an ``.idx`` byte-identical to the builder's (tests compare them). Readers stay megatron-core's
``IndexedDataset``; :func:`validate_pair` only checks a pair before anyone trusts it.

Crash safety: data goes to ``<prefix>.bin.tmp`` / ``<prefix>.idx.tmp``; on completion any old
``.idx`` is removed first, then ``.bin`` and ``.idx`` are renamed into place, so at no moment does
a new ``.bin`` sit beside a stale ``.idx`` that would look valid.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megatron_cpt.errors import UserError

INDEX_HEADER = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
HEADER_SIZE = len(INDEX_HEADER) + 8 + 1 + 8 + 8  # magic, version, dtype code, counts

# megatron.core.datasets.indexed_dataset.DType codes.
DTYPE_CODES = {
    np.dtype(np.uint8): 1,
    np.dtype(np.int8): 2,
    np.dtype(np.int16): 3,
    np.dtype(np.int32): 4,
    np.dtype(np.int64): 5,
    np.dtype(np.float64): 6,
    np.dtype(np.float32): 7,
    np.dtype(np.uint16): 8,
}
CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}


def token_dtype(vocab_size: int) -> type[np.number]:
    """Megatron-LM's rule: uint16 when every id fits with margin (< 65500), else int32.

    Returns the numpy scalar type (not a ``np.dtype``), which is what megatron-core's
    ``IndexedDatasetBuilder``/``DType`` expect.
    """
    return np.uint16 if vocab_size < 65500 else np.int32


def bin_path(prefix: str | Path) -> Path:
    return Path(f"{prefix}.bin")


def idx_path(prefix: str | Path) -> Path:
    return Path(f"{prefix}.idx")


def _tmp(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


def write_index(
    path: Path,
    dtype: np.dtype,
    sequence_lengths: np.ndarray,
    document_indices: np.ndarray,
) -> None:
    """Write an ``.idx`` exactly as megatron-core's ``_IndexWriter`` lays it out."""
    lengths = np.ascontiguousarray(sequence_lengths, dtype=np.int32)
    pointers = np.zeros(len(lengths), dtype=np.int64)
    if len(lengths) > 1:
        np.cumsum(lengths[:-1], dtype=np.int64, out=pointers[1:])
    pointers *= np.dtype(dtype).itemsize
    with open(path, "wb") as fh:
        fh.write(INDEX_HEADER)
        fh.write(struct.pack("<Q", INDEX_VERSION))
        fh.write(struct.pack("<B", DTYPE_CODES[np.dtype(dtype)]))
        fh.write(struct.pack("<Q", len(lengths)))
        fh.write(struct.pack("<Q", len(document_indices)))
        fh.write(lengths.tobytes(order="C"))
        fh.write(pointers.tobytes(order="C"))
        fh.write(np.ascontiguousarray(document_indices, dtype=np.int64).tobytes(order="C"))


def _publish(prefix: str | Path) -> None:
    """Move a finished temp pair into place (old index first, so no stale pair survives)."""
    final_bin, final_idx = bin_path(prefix), idx_path(prefix)
    final_idx.unlink(missing_ok=True)
    os.replace(_tmp(final_bin), final_bin)
    os.replace(_tmp(final_idx), final_idx)


def remove_temporaries(prefix: str | Path) -> None:
    for path in (_tmp(bin_path(prefix)), _tmp(idx_path(prefix))):
        path.unlink(missing_ok=True)


class IndexedWriter:
    """Streams documents into a ``.bin`` and writes the ``.idx`` on :meth:`finalize`.

    Use as a context manager: leaving it with an exception removes the temporary files.
    """

    def __init__(self, prefix: str | Path, dtype: np.dtype):
        self.prefix = str(prefix)
        self.dtype = np.dtype(dtype)
        if self.dtype not in DTYPE_CODES:
            raise ValueError(f"unsupported token dtype {self.dtype}")
        Path(self.prefix).parent.mkdir(parents=True, exist_ok=True)
        self._bin = open(_tmp(bin_path(self.prefix)), "wb")
        self._lengths: list[np.ndarray] = []
        self._docs: list[np.ndarray] = []
        self.sequences = 0
        self.documents = 0
        self.tokens = 0
        self.finalized = False

    def add_documents(
        self, tokens: np.ndarray, sequence_lengths: np.ndarray, sequences_per_document: np.ndarray
    ) -> None:
        """Append whole documents: flat tokens, each sequence's length, each document's count."""
        tokens = np.ascontiguousarray(tokens, dtype=self.dtype)
        self._bin.write(memoryview(tokens).cast("B"))
        self._lengths.append(np.asarray(sequence_lengths, dtype=np.int32))
        ends = self.sequences + np.cumsum(sequences_per_document, dtype=np.int64)
        self._docs.append(ends)
        self.sequences += int(len(sequence_lengths))
        self.documents += int(len(sequences_per_document))
        self.tokens += int(tokens.size)

    def add_document(self, ids, sequence_lengths=None) -> None:
        """One document (convenience for small producers); one sequence unless lengths given."""
        ids = np.asarray(ids, dtype=self.dtype)
        lengths = [ids.size] if sequence_lengths is None else sequence_lengths
        self.add_documents(ids, np.asarray(lengths), np.array([len(lengths)]))

    def finalize(self) -> Path:
        self._bin.close()
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, np.int32)
        docs = np.concatenate([np.zeros(1, np.int64), *self._docs])
        write_index(_tmp(idx_path(self.prefix)), self.dtype, lengths, docs)
        _publish(self.prefix)
        self.finalized = True
        return Path(self.prefix)

    def abort(self) -> None:
        if not self._bin.closed:
            self._bin.close()
        remove_temporaries(self.prefix)

    def __enter__(self) -> IndexedWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None or not self.finalized:
            self.abort()


@dataclass(frozen=True)
class ShardIndex:
    """A validated ``.idx`` (arrays are read-only views of the file)."""

    prefix: str
    dtype: np.dtype
    sequence_lengths: np.ndarray
    sequence_pointers: np.ndarray
    document_indices: np.ndarray
    bin_bytes: int

    @property
    def documents(self) -> int:
        return len(self.document_indices) - 1

    @property
    def sequences(self) -> int:
        return len(self.sequence_lengths)

    @property
    def tokens(self) -> int:
        return int(self.sequence_lengths.sum(dtype=np.int64))


def validate_pair(prefix: str | Path) -> ShardIndex:
    """Check an ``.idx`` against its ``.bin``; any inconsistency is a one-line UserError."""
    ipath, bpath = idx_path(prefix), bin_path(prefix)
    for path in (ipath, bpath):
        if not path.is_file():
            raise UserError(f"{path}: missing (a shard is a .bin/.idx pair)")
    raw = ipath.read_bytes()

    def bad(problem: str) -> UserError:
        return UserError(f"{ipath}: {problem}")

    if len(raw) < HEADER_SIZE:
        raise bad(f"truncated header ({len(raw)} bytes, need {HEADER_SIZE})")
    if raw[: len(INDEX_HEADER)] != INDEX_HEADER:
        raise bad("not a megatron-core index (bad magic)")
    offset = len(INDEX_HEADER)
    (version,) = struct.unpack_from("<Q", raw, offset)
    (code,) = struct.unpack_from("<B", raw, offset + 8)
    n_seq, n_doc = struct.unpack_from("<QQ", raw, offset + 9)
    if version != INDEX_VERSION:
        raise bad(f"unsupported index version {version}")
    if code not in CODE_DTYPES:
        raise bad(f"unknown dtype code {code}")
    dtype = CODE_DTYPES[code]
    expected = HEADER_SIZE + 12 * n_seq + 8 * n_doc
    if len(raw) not in (expected, expected + n_seq):  # + n_seq: multimodal sequence modes
        raise bad(
            f"size {len(raw)} bytes does not match {n_seq} sequences / {n_doc} document "
            f"indices (expected {expected}); truncated or corrupt"
        )
    lengths = np.frombuffer(raw, np.int32, n_seq, HEADER_SIZE)
    pointers = np.frombuffer(raw, np.int64, n_seq, HEADER_SIZE + 4 * n_seq)
    docs = np.frombuffer(raw, np.int64, n_doc, HEADER_SIZE + 12 * n_seq)
    if n_seq and lengths.min() < 0:
        raise bad(f"negative sequence length at sequence {int(np.argmin(lengths))}")
    itemsize = dtype.itemsize
    expected_ptr = np.zeros(n_seq, np.int64)
    if n_seq > 1:
        np.cumsum(lengths[:-1], dtype=np.int64, out=expected_ptr[1:])
    expected_ptr *= itemsize
    if not np.array_equal(pointers, expected_ptr):
        first = int(np.flatnonzero(pointers != expected_ptr)[0])
        raise bad(f"sequence pointer {first} is {pointers[first]}, expected {expected_ptr[first]}")
    if n_doc == 0 or docs[0] != 0:
        raise bad("document indices must start at 0")
    if np.any(np.diff(docs) < 0) or docs[-1] != n_seq:
        raise bad(f"document indices must rise from 0 to the sequence count {n_seq}")
    total = int(lengths.sum(dtype=np.int64)) * itemsize
    size = bpath.stat().st_size
    if size != total:
        raise UserError(
            f"{bpath}: {size} bytes but its index describes {total} ({dtype.name}); "
            "truncated or mismatched pair"
        )
    return ShardIndex(str(prefix), dtype, lengths, pointers, docs, size)
