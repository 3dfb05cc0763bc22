"""Fault injection for pretrain.py: checks before the model is built, damaged checkpoints."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from faults import assert_one_line, files_under
from test_train import TINY, check_ok, data_args, run_pretrain, shards  # noqa: F401

from megatron_cpt.data.indexed import IndexedWriter

ARGS = ["--lr", "1e-2", "--lr-warmup-iters", "1"]


def _truncate_distcp(iter_dir):
    for distcp in iter_dir.glob("*.distcp"):
        distcp.write_bytes(distcp.read_bytes()[: distcp.stat().st_size // 2])


@pytest.fixture(scope="module")
def two_checkpoints(shards, tmp_path_factory):  # noqa: F811
    """4 iterations saved at 2 and 4."""
    root = tmp_path_factory.mktemp("two_ckpts")
    args = [*TINY, *data_args(shards, (1.0, "reports")), *ARGS, "--train-iters", "4",
            "--save", str(root / "ckpt"), "--save-interval", "2", "--run-dir", str(root / "run")]  # fmt: skip
    check_ok(run_pretrain(args))
    return root / "ckpt"


def test_token_ids_beyond_vocab_refused_before_the_model_is_built(shards, tmp_path):  # noqa: F811
    prefix = tmp_path / "wide"
    with IndexedWriter(prefix, np.uint16) as writer:  # SmolLM2 has 49,152 tokens
        ids = np.arange(60000, 60000 + 400, dtype=np.uint16)
        writer.add_documents(ids, np.full(4, 100, np.int32), np.ones(4, np.int64))
        writer.finalize()
    args = [*TINY, *data_args(shards, (1.0, "reports")), *ARGS, "--train-iters", "2"]
    args[args.index(shards["reports"])] = str(prefix)
    result = run_pretrain([*args, "--run-dir", str(tmp_path / "run")])
    assert_one_line(result, "--data-path", str(prefix), "token id 60399", "49152")
    assert not (tmp_path / "run").exists()


def test_save_under_a_file_refused_before_the_model_is_built(shards, tmp_path):  # noqa: F811
    blocker = tmp_path / "file"
    blocker.write_text("x")
    args = [*TINY, *data_args(shards, (1.0, "reports")), *ARGS, "--train-iters", "2"]
    result = run_pretrain(
        [*args, "--save", str(blocker / "ckpt"), "--run-dir", str(tmp_path / "r")]
    )
    assert_one_line(result, "--save", "is a file")
    assert files_under(tmp_path) == ["file"]


@pytest.mark.slow  # its fixture is a 4-iteration training run with two saves
def test_truncated_pretrained_checkpoint_is_one_line_and_leaves_no_metrics(
    shards,  # noqa: F811
    two_checkpoints,
    tmp_path,
):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(two_checkpoints / "iter_0000004", ckpt)
    _truncate_distcp(ckpt)
    args = [*TINY, *data_args(shards, (1.0, "reports")), *ARGS, "--train-iters", "2"]
    result = run_pretrain([*args, "--pretrained-checkpoint", str(ckpt), "--run-dir",
                           str(tmp_path / "run")])  # fmt: skip
    assert_one_line(result, ".distcp", "truncated")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # not even an empty one


@pytest.mark.slow
def test_resume_falls_back_to_previous_checkpoint_when_latest_is_truncated(
    shards,  # noqa: F811
    two_checkpoints,
    tmp_path,
):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(two_checkpoints, ckpt)
    _truncate_distcp(ckpt / "iter_0000004")
    args = [*TINY, *data_args(shards, (1.0, "reports")), *ARGS, "--train-iters", "6",
            "--save", str(ckpt), "--run-dir", str(tmp_path / "run")]  # fmt: skip
    result = run_pretrain(args)
    check_ok(result)
    said = result.stdout + result.stderr
    assert (
        "iteration 4) is damaged" in said and "previous published checkpoint, iteration 2" in said
    )
    summary = json.loads((tmp_path / "run" / "run_summary.json").read_text())
    assert "at iteration 2" in summary["start"]
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "6"
