"""Streaming JSONL input shared by preprocessing, data selection and evaluation.

Inputs may be plain ``.jsonl``, ``.jsonl.gz`` or ``.jsonl.zst``, given as files, globs or
several of each. Lines are read as bytes and decoded strictly, so undecodable bytes are reported
with their line number instead of being silently replaced. Every problem is a
:class:`~megatron_cpt.errors.BadInputError` (``file:line: problem``) unless the caller asked to
skip, in which case it is counted under a short reason key.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from megatron_cpt.errors import BadInputError, UserError

# Skip-counter keys, stable names for summaries.
INVALID_JSON = "invalid_json"
NOT_AN_OBJECT = "not_an_object"
MISSING_KEY = "missing_key"
NON_STRING_KEY = "non_string_key"
UNDECODABLE = "undecodable_bytes"
EMPTY_DOCUMENT = "empty_document"


def expand_inputs(specs: str | Sequence[str]) -> list[Path]:
    """Expand files, globs and comma-free lists of either into an ordered, de-duplicated list."""
    if isinstance(specs, str | os.PathLike):
        specs = [str(specs)]
    paths: list[Path] = []
    for spec in specs:
        matches = sorted(glob.glob(os.path.expanduser(str(spec)), recursive=True))
        if not matches:
            raise UserError(f"--input {spec}: no such file (or the glob matched nothing)")
        for match in matches:
            if os.path.isdir(match):
                raise UserError(f"--input {match}: is a directory; give files or a glob")
            paths.append(Path(match))
    seen: set[Path] = set()
    return [p for p in paths if not (p in seen or seen.add(p))]


def open_binary(path: str | Path) -> IO[bytes]:
    """Open a possibly compressed file as a binary stream (decompressing on the fly)."""
    path = str(path)
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.endswith(".zst") or path.endswith(".zstd"):
        import zstandard

        raw = open(path, "rb")
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True))
    return open(path, "rb")


@dataclass(frozen=True)
class JsonlRecord:
    path: str
    line: int  # 1-based
    obj: dict
    nbytes: int  # raw line size, for MB/s progress


def zstd_blocks(path: Path, size: int) -> Iterator[bytes]:
    """Decompressed blocks of a (multi-frame) .zst file.

    zstandard's stream reader ends silently at a truncated frame (an interrupted download would
    lose its tail unnoticed), so frames are followed explicitly and an unfinished one is an error.
    """
    import zstandard

    dctx = zstandard.ZstdDecompressor()
    dobj, in_frame, leftover = dctx.decompressobj(), False, b""
    with open(path, "rb") as raw:
        while data := leftover or raw.read(size):
            leftover = b""
            try:
                out = dobj.decompress(data)
            except zstandard.ZstdError as exc:
                raise UserError(f"{path}: corrupt or truncated compressed data ({exc})") from None
            in_frame = True
            if out:
                yield out
            if dobj.eof:
                leftover, dobj, in_frame = dobj.unused_data, dctx.decompressobj(), False
    if in_frame:
        raise UserError(
            f"{path}: corrupt or truncated compressed data (the last zstd frame is cut)"
        )


def read_blocks(path: Path, size: int) -> Iterator[bytes]:
    """Raw blocks of a (possibly compressed) file; an unreadable or corrupt file is one line."""
    if str(path).endswith((".zst", ".zstd")):
        try:
            yield from zstd_blocks(path, size)
        except OSError as exc:
            raise UserError(f"{path}: cannot read ({exc.strerror or exc})") from None
        return
    try:
        fh = open_binary(path)
    except OSError as exc:
        raise UserError(f"{path}: cannot open ({exc.strerror or exc})") from None
    with fh:
        while True:
            try:
                block = fh.read(size)
            except Exception as exc:  # gzip/zstd/OS errors have no common base class
                kind = (
                    "corrupt or truncated compressed data"
                    if str(path).endswith((".gz", ".zst", ".zstd"))
                    else "read error"
                )
                raise UserError(f"{path}: {kind} ({type(exc).__name__}: {exc})") from None
            if not block:
                return
            yield block


def iter_raw_lines(path: str | Path, block_size: int = 1 << 20) -> Iterator[tuple[int, bytes]]:
    """Yield ``(line_number, raw_bytes)`` for each non-blank line (via :func:`read_blocks`, so a
    corrupt or truncated compressed file is an error, never a silently shortened input)."""
    number, pending = 0, b""
    for block in read_blocks(Path(path), block_size):
        lines = (pending + block).split(b"\n")
        pending = lines.pop()
        for raw in lines:
            number += 1
            if raw.strip():
                yield number, raw
    if pending.strip():
        yield number + 1, pending


def parse_line(path: str, number: int, raw: bytes) -> dict:
    """Decode and parse one JSONL line, raising :class:`BadInputError` with its location."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadInputError(
            path, number, f"undecodable bytes (not UTF-8) at byte {exc.start}", UNDECODABLE
        ) from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadInputError(path, number, f"invalid JSON ({exc.msg})", INVALID_JSON) from None
    if not isinstance(obj, dict):
        raise BadInputError(
            path, number, f"expected a JSON object, got {type(obj).__name__}", NOT_AN_OBJECT
        )
    return obj


def get_text(record: JsonlRecord, key: str) -> str:
    """The string field ``key`` of a record, or :class:`BadInputError` naming the field."""
    if key not in record.obj:
        raise BadInputError(record.path, record.line, f"missing key {key!r}", MISSING_KEY)
    value = record.obj[key]
    if not isinstance(value, str):
        raise BadInputError(
            record.path,
            record.line,
            f"key {key!r} is {type(value).__name__}, expected a string",
            NON_STRING_KEY,
        )
    return value


def iter_jsonl(
    paths: Iterable[str | Path],
    *,
    skip_bad_lines: bool = False,
    skipped: Counter | None = None,
) -> Iterator[JsonlRecord]:
    """Stream records from several JSONL files in order.

    Bad lines raise unless ``skip_bad_lines``; skipped lines are counted in ``skipped`` by reason.
    """
    for path in paths:
        name = str(path)
        for number, raw in iter_raw_lines(path):
            try:
                obj = parse_line(name, number, raw)
            except BadInputError as err:
                if not skip_bad_lines:
                    raise
                if skipped is not None:
                    skipped[err.reason] += 1
                continue
            yield JsonlRecord(name, number, obj, len(raw))


def read_texts(
    paths: str | Sequence[str],
    key: str = "text",
    *,
    skip_bad_lines: bool = False,
    skipped: Counter | None = None,
) -> Iterator[tuple[JsonlRecord, str]]:
    """Stream ``(record, text)`` pairs for a text key, with the same error/skip policy."""
    for record in iter_jsonl(expand_inputs(paths), skip_bad_lines=skip_bad_lines, skipped=skipped):
        try:
            text = get_text(record, key)
        except BadInputError as err:
            if not skip_bad_lines:
                raise
            if skipped is not None:
                skipped[err.reason] += 1
            continue
        yield record, text
