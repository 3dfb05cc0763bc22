"""Fault injection for evaluate.py, report.py and the lm-eval entry point."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import stat
import subprocess
import sys

import pytest
import torch
from faults import REPO, assert_one_line, files_under, outcome, run_tool, tool_env
from test_eval_scoring import CORPUS, make_tiny_llama

from megatron_cpt.evaluation.results import write_json_atomic


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    """A tiny HF Llama, the same with NaN weights, and both as Megatron checkpoints (one intact,
    one with a truncated .distcp, one whose .metadata pickle would run code)."""
    from transformers import LlamaForCausalLM

    from megatron_cpt.convert.importer import ImportConfig, import_hf

    root = tmp_path_factory.mktemp("faults_eval")
    good = make_tiny_llama(root / "hf")
    nan = root / "hf_nan"
    shutil.copytree(good, nan)
    model = LlamaForCausalLM.from_pretrained(good)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    model.save_pretrained(nan)
    import_hf(ImportConfig(str(good), str(root / "mc")))
    truncated = root / "mc_truncated"
    shutil.copytree(root / "mc", truncated)
    for distcp in (truncated / "iter_0000000").glob("*.distcp"):
        distcp.write_bytes(distcp.read_bytes()[: distcp.stat().st_size // 2])
    evil = root / "mc_evil"
    shutil.copytree(root / "mc", evil)
    marker = root / "pwned"
    (evil / "iter_0000000" / ".metadata").write_bytes(pickle.dumps(_RunsCode(marker)))
    data = root / "set.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in CORPUS))
    return {"hf": good, "nan": nan, "mc": root / "mc", "truncated": truncated, "evil": evil,
            "marker": marker, "data": data}  # fmt: skip


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_nan_model_is_one_line_and_writes_no_results(tiny_dirs, tmp_path):
    out = tmp_path / "res" / "nan.json"
    args = ["--hf", tiny_dirs["nan"], "--data", f"set={tiny_dirs['data']}", "--output", out]
    args += ["--seq-length", "64"]
    assert_one_line(run_tool("evaluate.py", args), str(tiny_dirs["nan"]), "non-finite", "nan")
    assert files_under(tmp_path) == []


def test_output_under_a_file_is_refused_before_evaluating(tiny_dirs, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    # the NaN model would fail only after evaluating: the --output error must come first
    args = ["--hf", tiny_dirs["nan"], "--data", f"set={tiny_dirs['data']}"]
    result = run_tool("evaluate.py", [*args, "--output", blocker / "r.json"])
    assert_one_line(result, "--output", "is a file, not a directory")
    result = run_tool("evaluate.py", [*args, "--output", tmp_path])
    assert_one_line(result, "--output", "is a directory")


def test_results_json_is_world_readable_and_never_bare_nan(tmp_path):
    old = os.umask(0o022)
    try:
        write_json_atomic(tmp_path / "r.json", {"perplexity": {"a": {"ppl": 1.5}}})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "r.json").stat().st_mode) == 0o644
    with pytest.raises(ValueError):
        write_json_atomic(tmp_path / "n.json", {"ppl": float("nan")})
    assert files_under(tmp_path) == ["r.json"]


def test_truncated_distcp_in_evaluate_megatron_is_one_line(tiny_dirs, tmp_path):
    args = ["--megatron", tiny_dirs["truncated"], "--data", f"set={tiny_dirs['data']}"]
    assert_one_line(run_tool("evaluate.py", [*args, "--seq-length", "64"]), "truncated")


@pytest.mark.slow  # imports all of lm-eval in a subprocess
def test_lm_eval_entry_point_refuses_unsafe_checkpoint_in_one_line(tiny_dirs):
    cmd = [sys.executable, "-m", "megatron_cpt.evaluation.lm_eval_main", "--model", "megatron-cpt"]
    cmd += ["--model_args", f"megatron={tiny_dirs['evil']}", "--tasks", "fpb", "--limit", "2"]
    result = subprocess.run(cmd, capture_output=True, text=True, env=tool_env(), cwd=REPO)
    assert_one_line(result, "refusing to unpickle")
    assert not tiny_dirs["marker"].exists()


@pytest.mark.parametrize(
    "args, words",
    [
        (["--smooth", "-1"], ["--smooth -1"]),
        (["--smooth", "1"], ["--smooth 1"]),
        (["--out", "{blocker}/sub"], ["--out", "is a file"]),
        (["--out", "{blocker}"], ["--out", "is a file, expected a directory"]),
    ],
)
def test_report_bad_out_and_smooth_are_one_line(tmp_path, args, words):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    args = [a.replace("{blocker}", str(blocker)) for a in args]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "report")]
    result = run_tool("report.py", ["--eval", f"a={tmp_path / 'missing.json'}", *args])
    assert outcome(result) == "one-line", result.stderr
    assert_one_line(result, *words)
    assert files_under(tmp_path) == ["file"]
