"""Fault injection for shards.py and select_data.py: nonsense values and unwritable outputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
from faults import assert_one_line, files_under, run_tool

from megatron_cpt.data.indexed import IndexedWriter


@pytest.fixture
def shard(tmp_path):
    prefix = tmp_path / "in" / "s"
    prefix.parent.mkdir()
    with IndexedWriter(prefix, np.uint16) as writer:
        writer.add_documents(np.arange(30, dtype=np.uint16), np.full(3, 10, np.int32),
                             np.ones(3, np.int64))  # fmt: skip
        writer.finalize()
    return prefix


def test_shards_merge_output_under_a_file_is_one_line(shard, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = run_tool("shards.py", ["merge", "--output-prefix", blocker / "all", shard])
    assert_one_line(result, "--output-prefix", "is a file")
    assert files_under(tmp_path) == ["file", "in/s.bin", "in/s.idx"]


def test_shards_inspect_negative_sample_is_refused(shard):
    assert_one_line(run_tool("shards.py", ["inspect", shard, "--sample", "-3"]), "--sample -3")


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps({"text": f"document {i} about revenue {i * 7}."}) + "\n"
                            for i in range(20)))  # fmt: skip
    return path


def _select(corpus, tmp_path, *extra):
    args = ["--input", corpus, "--metric", "random", "--no-progress", "--no-dedup"]
    return run_tool("select_data.py", [*args, *extra])


@pytest.mark.parametrize("flag", ["--documents", "--tokens"])
def test_select_zero_budget_is_refused(corpus, tmp_path, flag):
    result = _select(corpus, tmp_path, flag, "0", "--output", tmp_path / "o.jsonl",
                     "--cache-dir", tmp_path / "c")  # fmt: skip
    assert_one_line(result, flag, "positive")
    assert files_under(tmp_path) == ["in.jsonl"]


@pytest.mark.parametrize("flag", ["--output", "--cache-dir", "--scores-output"])
def test_select_unwritable_outputs_are_one_line(corpus, tmp_path, flag):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    paths = {"--output": tmp_path / "o.jsonl", "--cache-dir": tmp_path / "c"}
    paths[flag] = blocker / "sub"
    args = [a for kv in paths.items() for a in kv]
    result = _select(corpus, tmp_path, "--documents", "5", *args)
    assert_one_line(result, flag, "is a file")
    assert files_under(tmp_path) == ["file", "in.jsonl"]
