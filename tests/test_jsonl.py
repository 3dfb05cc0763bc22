"""The shared JSONL reader: compressed inputs, line numbers, and the error/skip policy."""

from __future__ import annotations

import gzip
import json
from collections import Counter

import pytest
import zstandard

from megatron_cpt.data.jsonl import read_texts
from megatron_cpt.errors import BadInputError, UserError

DOCS = [{"text": f"document {i} " + "x" * (i * 37)} for i in range(200)]
RAW = "".join(json.dumps(d) + "\n" for d in DOCS).encode()


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".jsonl.zst"])
def test_all_formats_read_every_document_with_its_line_number(tmp_path, suffix):
    path = tmp_path / f"docs{suffix}"
    data = {".jsonl": RAW, ".jsonl.gz": gzip.compress(RAW),
            ".jsonl.zst": zstandard.ZstdCompressor().compress(RAW)}[suffix]  # fmt: skip
    path.write_bytes(data)
    got = [(rec.line, text) for rec, text in read_texts([str(path)])]
    assert got == [(i + 1, d["text"]) for i, d in enumerate(DOCS)]


def test_truncated_zstd_is_an_error_not_a_shorter_corpus(tmp_path):
    path = tmp_path / "cut.jsonl.zst"
    path.write_bytes(zstandard.ZstdCompressor().compress(RAW)[:-40])
    with pytest.raises(UserError, match="truncated"):
        list(read_texts([str(path)]))


def test_blank_lines_keep_numbering_and_no_final_newline(tmp_path):
    path = tmp_path / "gaps.jsonl"
    path.write_bytes(b'{"text": "a"}\n\n  \n{"text": "b"}')
    assert [(r.line, t) for r, t in read_texts([str(path)])] == [(1, "a"), (4, "b")]


def test_bad_lines_stop_with_location_or_are_counted(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{not json\n{"text": 3}\n{"other": 1}\n"\xff"\n')
    with pytest.raises(BadInputError, match=r"bad.jsonl:2: invalid JSON"):
        list(read_texts([str(path)]))
    skipped = Counter()
    assert [t for _, t in read_texts([str(path)], skip_bad_lines=True, skipped=skipped)] == ["ok"]
    assert skipped == Counter(invalid_json=1, non_string_key=1, missing_key=1,
                              undecodable_bytes=1)  # fmt: skip
