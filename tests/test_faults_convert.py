"""Fault injection for convert_checkpoint.py: bad flags, unsupported configs, damaged inputs,
unwritable outputs and temp directories of killed runs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from faults import assert_one_line, files_under, run_tool
from test_convert import make_tiny_hf

from megatron_cpt.temp_dirs import temp_prefix


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from megatron_cpt.convert.importer import ImportConfig, import_hf

    root = tmp_path_factory.mktemp("faults_convert")
    make_tiny_hf("mha-tied", root / "hf")
    import_hf(ImportConfig(str(root / "hf"), str(root / "mc")))
    return root


def test_make_vocab_size_divisible_by_zero_blames_the_flag(tiny, tmp_path):
    args = ["hf-to-mcore", "--hf", tiny / "hf", "--out", tmp_path / "o"]
    result = run_tool("convert_checkpoint.py", [*args, "--make-vocab-size-divisible-by", "0"])
    assert_one_line(result, "--make-vocab-size-divisible-by 0")
    assert files_under(tmp_path) == []


@pytest.mark.parametrize("value", ["0", "-1", "nan"])
def test_max_shard_size_not_positive_is_refused(tiny, tmp_path, value):
    args = ["mcore-to-hf", "--load", tiny / "mc", "--out", tmp_path / "o"]
    result = run_tool("convert_checkpoint.py", [*args, "--max-shard-size-gb", value])
    assert_one_line(result, "--max-shard-size-gb")
    assert files_under(tmp_path) == []


def test_mistral_sliding_window_is_kept_not_dropped(tiny, tmp_path):
    """Issue 15 found the window silently dropped; the Mistral family (issue 18) now carries
    it into the checkpoint, where the trainer and evaluation refuse longer sequences."""
    from megatron_cpt.training.checkpointing import read_metadata

    hf = tmp_path / "mistral"
    shutil.copytree(tiny / "hf", hf)
    config = json.loads((hf / "config.json").read_text())
    config.update(model_type="mistral", sliding_window=16, max_position_embeddings=256)
    (hf / "config.json").write_text(json.dumps(config))
    result = run_tool("convert_checkpoint.py", ["hf-to-mcore", "--hf", hf, "--out", tmp_path / "o"])
    assert result.returncode == 0, result.stderr
    arch = read_metadata(tmp_path / "o")["arch"]
    assert (arch.family, arch.sliding_window) == ("mistral", 16)
    with pytest.raises(Exception, match="sliding_window"):
        arch.check_sequence_length(17, "--seq-length")


@pytest.mark.parametrize("direction", ["hf-to-mcore", "mcore-to-hf"])
def test_out_under_a_file_is_one_line(tiny, tmp_path, direction):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    source = ["--hf", tiny / "hf"] if direction == "hf-to-mcore" else ["--load", tiny / "mc"]
    result = run_tool("convert_checkpoint.py", [direction, *source, "--out", blocker / "o"])
    assert_one_line(result, "--out", "is a file")
    assert files_under(tmp_path) == ["file"]


def test_truncated_distcp_in_mcore_to_hf_is_one_line(tiny, tmp_path):
    broken = tmp_path / "mc"
    shutil.copytree(tiny / "mc", broken)
    for distcp in broken.glob("iter_*/*.distcp"):
        distcp.write_bytes(distcp.read_bytes()[: distcp.stat().st_size // 2])
    result = run_tool("convert_checkpoint.py", ["mcore-to-hf", "--load", broken, "--out",
                                                tmp_path / "hf"])  # fmt: skip
    assert_one_line(result, ".distcp", "truncated")
    assert not (tmp_path / "hf").exists()


def test_temp_dir_of_a_killed_conversion_is_removed_by_the_next_run(tiny, tmp_path):
    out = tmp_path / "hf"
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    dead = temp_prefix(out).replace(f"-{os.getpid()}-", f"-{proc.pid}-") + "k9"
    (tmp_path / dead).mkdir()
    (tmp_path / dead / "model.safetensors").write_bytes(b"half a tensor")
    other = tmp_path / ".hf.tmp-abc"  # an old-style or foreign name: left alone
    other.mkdir()
    result = run_tool("convert_checkpoint.py", ["mcore-to-hf", "--load", tiny / "mc", "--out", out])
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hf.tmp-abc", "hf"]
