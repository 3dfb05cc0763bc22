"""Shard maintenance: merge several ``.bin/.idx`` pairs into one, and inspect/validate a pair.

Merging is what megatron-core's ``IndexedDatasetBuilder.add_index`` does, but that asserts on a
dtype mismatch and trusts each pair blindly; here every input is validated first (a truncated
shard would otherwise be copied into a larger, silently corrupt one), dtypes must agree, and the
output is published atomically like every other shard we write.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megatron_cpt.data.indexed import (
    ShardIndex,
    _publish,
    _tmp,
    bin_path,
    idx_path,
    remove_temporaries,
    validate_pair,
    write_index,
)
from megatron_cpt.errors import UserError
from megatron_cpt.output_paths import check_output_prefix
from megatron_cpt.tokenizers import Tokenizer


def strip_suffix(prefix: str | Path) -> str:
    """Accept ``name``, ``name.bin`` or ``name.idx`` for a shard prefix."""
    text = str(prefix)
    for suffix in (".bin", ".idx"):
        if text.endswith(suffix):
            return text[: -len(suffix)]
    return text


def merge_shards(prefixes: list[str | Path], output_prefix: str | Path) -> dict:
    """Concatenate shards in the given order into ``output_prefix``; returns a summary."""
    if not prefixes:
        raise UserError("merge: give at least one input prefix")
    prefixes = [strip_suffix(p) for p in prefixes]
    output_prefix = strip_suffix(output_prefix)
    check_output_prefix(output_prefix, "--output-prefix")
    out_resolved = Path(output_prefix).resolve()
    if any(Path(p).resolve() == out_resolved for p in prefixes):
        raise UserError(f"merge: --output-prefix {output_prefix} is also an input")
    indices = [validate_pair(p) for p in prefixes]
    dtype = indices[0].dtype
    for index in indices[1:]:
        if index.dtype != dtype:
            raise UserError(
                f"merge: {index.prefix} has dtype {index.dtype.name} but {indices[0].prefix} has "
                f"{dtype.name}; shards from different tokenizers cannot be merged"
            )
    Path(output_prefix).parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(_tmp(bin_path(output_prefix)), "wb") as out:
            for index in indices:
                with open(bin_path(index.prefix), "rb") as src:
                    shutil.copyfileobj(src, out, 16 << 20)
        lengths = np.concatenate([i.sequence_lengths for i in indices])
        docs = [np.zeros(1, np.int64)]
        offset = 0
        for index in indices:
            docs.append(index.document_indices[1:] + offset)
            offset += index.sequences
        write_index(_tmp(idx_path(output_prefix)), dtype, lengths, np.concatenate(docs))
        _publish(output_prefix)
    except BaseException:
        remove_temporaries(output_prefix)
        raise
    merged = validate_pair(output_prefix)
    return {
        "output_prefix": output_prefix,
        "inputs": prefixes,
        "documents": merged.documents,
        "sequences": merged.sequences,
        "tokens": merged.tokens,
        "dtype": dtype.name,
    }


@dataclass(frozen=True)
class InspectConfig:
    sample: int = 3  # documents to decode
    sample_chars: int = 300  # characters shown per decoded document


def max_token_id(index: ShardIndex) -> int:
    if index.bin_bytes == 0:
        return -1
    data = np.memmap(bin_path(index.prefix), dtype=index.dtype, mode="r")
    step = 1 << 24
    return int(max(data[i : i + step].max() for i in range(0, len(data), step)))


def inspect_shard(
    prefix: str | Path, tokenizer: Tokenizer | None = None, config: InspectConfig | None = None
) -> dict:
    """Validate a pair and describe it; with a tokenizer, also check ids and decode a sample."""
    config = config or InspectConfig()
    index = validate_pair(strip_suffix(prefix))
    doc_tokens = np.zeros(index.documents, np.int64)
    if index.sequences:
        per_seq_cum = np.concatenate([[0], np.cumsum(index.sequence_lengths, dtype=np.int64)])
        doc_tokens = np.diff(per_seq_cum[index.document_indices])
    summary = {
        "prefix": index.prefix,
        "documents": index.documents,
        "sequences": index.sequences,
        "tokens": index.tokens,
        "dtype": index.dtype.name,
        "bin_bytes": index.bin_bytes,
        "idx_bytes": os.path.getsize(idx_path(index.prefix)),
        "tokens_per_document": {
            "min": int(doc_tokens.min()) if len(doc_tokens) else 0,
            "mean": round(float(doc_tokens.mean()), 1) if len(doc_tokens) else 0.0,
            "max": int(doc_tokens.max()) if len(doc_tokens) else 0,
        },
        "valid": True,
    }
    if tokenizer is None:
        return summary
    max_id = max_token_id(index)
    if max_id >= tokenizer.vocab_size:
        raise UserError(
            f"{bin_path(index.prefix)}: token id {max_id} >= vocab size {tokenizer.vocab_size} of "
            f"{tokenizer.name}; this shard was made with a different tokenizer"
        )
    summary["max_token_id"] = max_id
    data = (
        np.memmap(bin_path(index.prefix), dtype=index.dtype, mode="r") if index.bin_bytes else None
    )
    samples = []
    for doc in range(min(config.sample, index.documents)):
        first, last = index.document_indices[doc], index.document_indices[doc + 1]
        start = int(index.sequence_pointers[first]) // index.dtype.itemsize if last > first else 0
        ids = data[start : start + int(doc_tokens[doc])].tolist() if data is not None else []
        text = tokenizer.decode(ids)
        samples.append(
            {
                "document": doc,
                "sequences": int(last - first),
                "tokens": len(ids),
                "ends_with_eod": bool(ids) and ids[-1] == tokenizer.eod,
                "text": text[: config.sample_chars]
                + ("…" if len(text) > config.sample_chars else ""),
            }
        )
    summary["sample"] = samples
    return summary
