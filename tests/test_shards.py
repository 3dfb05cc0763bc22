"""tools/shards.py: merge equals megatron-core's add_index; inspect catches every corruption."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_preprocess import expected_documents, preprocess, read_jsonl_texts, shard_documents

from megatron_cpt.data.indexed import HEADER_SIZE, IndexedWriter, validate_pair
from megatron_cpt.data.shards import inspect_shard, merge_shards
from megatron_cpt.errors import UserError
from megatron_cpt.tokenizers import build_tokenizer

TOOL = Path(__file__).resolve().parent.parent / "tools" / "shards.py"


@pytest.fixture(scope="module")
def hf(smollm2_gguf):
    return build_tokenizer("HuggingFaceTokenizer", smollm2_gguf)


@pytest.fixture(scope="module")
def two_shards(tmp_path_factory, shared_data, hf):
    tmp = tmp_path_factory.mktemp("shards")
    sources = [
        shared_data / "domain/sec_agreements.jsonl",
        shared_data / "tasks/fiqasa_valid.jsonl",
    ]
    prefixes = [preprocess(tmp, [src], hf, name=src.stem, append_eod=True)[1] for src in sources]
    return sources, prefixes


def copy_pair(prefix: str, target: Path) -> str:
    for ext in (".bin", ".idx"):
        Path(f"{target}{ext}").write_bytes(Path(prefix + ext).read_bytes())
    return str(target)


def test_merge_matches_megatron_core_add_index(tmp_path, two_shards, hf):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    sources, prefixes = two_shards
    summary = merge_shards(prefixes, tmp_path / "merged")
    builder = IndexedDatasetBuilder(str(tmp_path / "ref.bin"), dtype=np.uint16)
    for prefix in prefixes:
        builder.add_index(prefix)
    builder.finalize(str(tmp_path / "ref.idx"))
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"merged{ext}").read_bytes() == (tmp_path / f"ref{ext}").read_bytes()
    texts = read_jsonl_texts(sources)
    assert shard_documents(str(tmp_path / "merged")) == expected_documents(
        hf, texts, append_eod=True
    )
    assert summary["documents"] == sum(validate_pair(p).documents for p in prefixes)


def test_merge_refuses_mixed_dtypes_and_leaves_nothing(tmp_path, two_shards):
    with IndexedWriter(tmp_path / "wide", np.int32) as w:
        w.add_document([70000, 1, 2])
        w.finalize()
    with pytest.raises(UserError, match="dtype int32 but .* uint16") as info:
        merge_shards([two_shards[1][0], tmp_path / "wide"], tmp_path / "out")
    assert "\n" not in str(info.value)
    assert not list(tmp_path.glob("out*"))


def test_merge_refuses_corrupt_input_and_output_as_input(tmp_path, two_shards):
    bad = copy_pair(two_shards[1][1], tmp_path / "bad")
    Path(bad + ".bin").write_bytes(Path(bad + ".bin").read_bytes()[:-2])
    with pytest.raises(UserError, match="truncated"):
        merge_shards([two_shards[1][0], bad], tmp_path / "out")
    assert not list(tmp_path.glob("out*"))
    with pytest.raises(UserError, match="also an input"):
        merge_shards([two_shards[1][0]], two_shards[1][0] + ".bin")


def test_inspect_counts_and_decoded_sample(two_shards, hf, shared_data):
    sources, prefixes = two_shards
    info = inspect_shard(prefixes[0], hf)
    texts = [t for t in read_jsonl_texts(sources[:1]) if t.strip()]
    docs = expected_documents(hf, texts, append_eod=True)
    assert info["documents"] == len(docs)
    assert info["tokens"] == sum(len(d[0]) for d in docs)
    assert info["dtype"] == "uint16"
    assert info["tokens_per_document"]["max"] == max(len(d[0]) for d in docs)
    first = info["sample"][0]
    assert first["ends_with_eod"] and first["tokens"] == len(docs[0][0])
    assert hf.decode(docs[0][0]).startswith(first["text"].rstrip("…"))
    assert info["max_token_id"] < hf.vocab_size


def corruptions():
    def truncate_bin(p):
        b = Path(p + ".bin")
        b.write_bytes(b.read_bytes()[:-1])

    def extend_bin(p):
        b = Path(p + ".bin")
        b.write_bytes(b.read_bytes() + b"\0\0")

    def truncate_idx(p):
        i = Path(p + ".idx")
        i.write_bytes(i.read_bytes()[:-8])

    def bad_magic(p):
        i = Path(p + ".idx")
        i.write_bytes(b"XXXXXXXXX" + i.read_bytes()[9:])

    def bad_dtype_code(p):
        i = Path(p + ".idx")
        raw = bytearray(i.read_bytes())
        raw[17] = 99
        i.write_bytes(bytes(raw))

    def bad_pointer(p):
        i = Path(p + ".idx")
        raw = bytearray(i.read_bytes())
        (n_seq,) = struct.unpack_from("<Q", raw, 18)
        struct.pack_into("<q", raw, HEADER_SIZE + 4 * n_seq + 8, 12345)
        i.write_bytes(bytes(raw))

    def wrong_dtype(p):  # uint16 data declared int32: sizes no longer agree
        i = Path(p + ".idx")
        raw = bytearray(i.read_bytes())
        raw[17] = 4
        i.write_bytes(bytes(raw))

    def missing_bin(p):
        Path(p + ".bin").unlink()

    return {
        f.__name__: f
        for f in (
            truncate_bin,
            extend_bin,
            truncate_idx,
            bad_magic,
            bad_dtype_code,
            bad_pointer,
            wrong_dtype,
            missing_bin,
        )
    }


@pytest.mark.parametrize("name", sorted(corruptions()))
def test_inspect_rejects_corrupt_pairs(tmp_path, two_shards, name):
    prefix = copy_pair(two_shards[1][1], tmp_path / "c")
    corruptions()[name](prefix)
    with pytest.raises(UserError) as info:
        inspect_shard(prefix)
    assert "\n" not in str(info.value) and str(tmp_path / "c") in str(info.value)


def test_cli_inspect_and_merge(tmp_path, two_shards, smollm2_gguf):
    prefixes = two_shards[1]
    merged = subprocess.run(
        [sys.executable, str(TOOL), "merge", "--output-prefix", str(tmp_path / "m"), *prefixes],
        capture_output=True,
        text=True,
    )
    assert merged.returncode == 0, merged.stderr
    assert json.loads(merged.stdout)["documents"] == sum(
        validate_pair(p).documents for p in prefixes
    )
    ok = subprocess.run(
        [
            sys.executable,
            str(TOOL),
            "inspect",
            str(tmp_path / "m"),
            "--tokenizer-type",
            "HuggingFaceTokenizer",
        ]
        + ["--tokenizer-model", str(smollm2_gguf), "--sample", "1"],
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stderr
    assert len(json.loads(ok.stdout)["sample"]) == 1
    Path(tmp_path / "m.bin").write_bytes(Path(tmp_path / "m.bin").read_bytes()[:-4])
    bad = subprocess.run(
        [sys.executable, str(TOOL), "inspect", str(tmp_path / "m")], capture_output=True, text=True
    )
    assert bad.returncode == 2
    assert (
        bad.stderr.count("\n") == 1
        and bad.stderr.startswith("error: ")
        and "truncated" in bad.stderr
    )
