"""The demo's optional ``--sft`` stage: its training set never holds an evaluated item (fast),
and a shortened CPT -> SFT -> evaluate demo run reports the SFT model as a 4th model (slow)."""

from __future__ import annotations

import json

import pytest

from megatron_cpt.evaluation.instruct import INSTRUCT_TASKS, InstructConfig, load_items
from megatron_cpt.pipeline.sft_set import sft_rows, write_sft_set


def test_sft_set_excludes_the_demo_evaluation_items(shared_data):
    rows = sft_rows(400, eval_items=25)
    assert len(rows) == 400
    assert [r["source"] for r in rows[:4]] == ["fiqasa", "fpb", "fiqasa", "fpb"]
    for name in ("fiqasa", "fpb"):
        task = INSTRUCT_TASKS[name]
        evaluated = {task.instruction.format(**r) for r in
                     load_items(name, InstructConfig(tasks=[name], limit=25))}  # fmt: skip
        mine = [r for r in rows if r["source"] == name]
        assert len(mine) == 200 and not evaluated & {r["prompt"] for r in mine}
        assert {r["response"] for r in mine} == set(task.labels)
    # FiQA-SA's train file repeats some test texts: those are dropped as well
    test_texts = {json.loads(x)["text"] for x in (shared_data / "tasks/fiqasa_test.jsonl").open()}
    overlap = {INSTRUCT_TASKS["fiqasa"].instruction.format(text=t) for t in test_texts} & {
        r["prompt"] for r in sft_rows(10_000, eval_items=10_000) if r["source"] == "fiqasa"
    }
    assert not overlap
    assert sft_rows(10, eval_items=25) == rows[:10]  # seeded: the same set every run


def test_write_sft_set_is_preprocess_sft_input(tmp_path, shared_data):
    counts = write_sft_set(tmp_path / "sft.jsonl", 7, eval_items=25)
    assert counts == {"fiqasa": 4, "fpb": 3}
    lines = [json.loads(x) for x in (tmp_path / "sft.jsonl").read_text().splitlines()]
    assert len(lines) == 7 and all(set(x) == {"prompt", "response"} for x in lines)


@pytest.mark.slow
def test_demo_sft_stage_shortened(tmp_path, shared_data, smollm2_gguf):
    """CPT (2 steps) -> SFT (8 conversations) -> export -> evaluate: 'sft' is a 4th model in
    the summary and the report, its SFT loss is on the conversations' answers only."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    work = tmp_path / "demo"
    cmd = [
        sys.executable, str(repo / "examples/quickstart.py"), "--work-dir", str(work),
        "--steps", "2", "--eval-interval", "2", "--eval-docs", "2", "--eval-chars", "300",
        "--instruct-items", "3", "--tatqa-questions", "0", "--sft", "--sft-items", "8",
    ]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(repo))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((work / "summary.json").read_text())
    assert set(summary["heldout"]) == {"base", "cpt", "merged", "sft"}
    assert "fpb_acc_ll" in summary["axes"]["sft"]
    assert "sft" in summary["stage_seconds"] and "evaluate_sft" in summary["stage_seconds"]
    report = (work / "report" / "report.md").read_text()
    assert "| sft |" in report and "Δ sft vs base" in report  # a model row and column
    metrics = [json.loads(x) for x in (work / "sft" / "metrics.jsonl").read_text().splitlines()]
    train = [m for m in metrics if m["kind"] == "train"]
    assert train and all(m["lm_loss"] < 5 for m in train)  # answer tokens of an instruct model
    sft_lines = (work / "data" / "sft_train.jsonl").read_text().splitlines()
    assert len(sft_lines) == 8
