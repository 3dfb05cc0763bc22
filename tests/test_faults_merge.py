"""Fault injection for merge_models.py: NaN/zero weights, tokenizer_source, stale temp dirs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml
from faults import assert_one_line, files_under, run_tool
from test_merge import VOCAB, ckpts  # noqa: F401

from megatron_cpt.temp_dirs import temp_prefix


def linear(ckpts, w_a, w_b, **extra):  # noqa: F811
    return {
        "merge_method": "linear",
        "models": [
            {"model": str(ckpts["a_f32"]), "parameters": {"weight": w_a}},
            {"model": str(ckpts["b_f32"]), "parameters": {"weight": w_b}},
        ],
        **extra,
    }


def merge(tmp_path, config, out="out"):
    path = tmp_path / "merge.yml"
    path.write_text(config if isinstance(config, str) else yaml.safe_dump(config))
    return run_tool("merge_models.py", [path, tmp_path / out, "--no-progress"])


def tokenizer_json(directory, size):
    directory.mkdir(parents=True, exist_ok=True)
    vocab = {f"t{i}": i for i in range(size)}
    (directory / "tokenizer.json").write_text(json.dumps({"model": {"vocab": vocab}}))
    return directory


def outputs(tmp_path):
    return [n for n in files_under(tmp_path) if n != "merge.yml" and not n.startswith("tok")]


def test_nan_weight_is_one_line_and_writes_nothing(ckpts, tmp_path):  # noqa: F811
    text = yaml.safe_dump(linear(ckpts, 0.5, 0.5)).replace("weight: 0.5", "weight: .nan", 1)
    assert_one_line(merge(tmp_path, text), "weight", "finite", "nan")
    assert outputs(tmp_path) == []


def test_linear_weights_summing_to_zero_are_one_line(ckpts, tmp_path):  # noqa: F811
    assert_one_line(merge(tmp_path, linear(ckpts, 0.0, 0.0)), "sum to 0")
    assert outputs(tmp_path) == []
    # weights that cancel are just as NaN-making
    assert_one_line(merge(tmp_path, linear(ckpts, 1.0, -1.0)), "sum to 0")
    assert outputs(tmp_path) == []


def test_tokenizer_source_with_another_vocabulary_is_refused(ckpts, tmp_path):  # noqa: F811
    other = tokenizer_json(tmp_path / "tok_big", 49152)
    result = merge(tmp_path, linear(ckpts, 0.5, 0.5, tokenizer_source=str(other)))
    assert_one_line(result, "tokenizer_source", "49152 tokens", f"{VOCAB} embedding rows")
    assert outputs(tmp_path) == []


def test_tokenizer_source_without_tokenizer_files_is_refused(ckpts, tmp_path):  # noqa: F811
    empty = tmp_path / "tok_empty"
    empty.mkdir()
    (empty / "README").write_text("no tokenizer here")
    result = merge(tmp_path, linear(ckpts, 0.5, 0.5, tokenizer_source=str(empty)))
    assert_one_line(result, "tokenizer_source", "no tokenizer files")
    assert outputs(tmp_path) == []


def test_tokenizer_symlink_is_refused_and_its_target_never_copied(ckpts, tmp_path):  # noqa: F811
    secret = tmp_path / "tok_secret.txt"
    secret.write_text("root:x:0:0:secret\n")
    linked = tmp_path / "tok_link"
    linked.mkdir()
    (linked / "tokenizer.json").symlink_to(secret)
    result = merge(tmp_path, linear(ckpts, 0.5, 0.5, tokenizer_source=str(linked)))
    assert_one_line(result, "symlink", "tokenizer.json")
    assert outputs(tmp_path) == []


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temp_dir_of_a_killed_merge_is_removed_by_the_next_run(ckpts, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    dead = temp_prefix(out).replace(f"-{os.getpid()}-", f"-{_dead_pid()}-") + "abc"
    live = temp_prefix(out) + "live"  # this (pytest) process is alive: never touched
    foreign = ".out.tmp-otherhost-1-xyz"  # another host's run on a shared filesystem
    unrelated = ".out.tmpfoo"
    for name in (dead, live, foreign, unrelated):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"partial")
    result = merge(tmp_path, linear(ckpts, 0.5, 0.5))
    assert result.returncode == 0, result.stderr
    hidden = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("."))
    assert hidden == sorted([live, foreign, unrelated])
    assert oct(out.stat().st_mode & 0o777) == oct(0o755)


@pytest.mark.parametrize("value", [".inf", "-.inf"])
def test_infinite_weight_is_one_line(ckpts, tmp_path, value):  # noqa: F811
    text = yaml.safe_dump(linear(ckpts, 0.5, 0.5)).replace("weight: 0.5", f"weight: {value}", 1)
    assert_one_line(merge(tmp_path, text), "weight", "finite")
