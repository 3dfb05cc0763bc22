"""The report's "instruction & tasks" section: table, deltas, noise-aware reading, chart; and the
group summary row that appears only for groups of more than one set."""

from __future__ import annotations

import json
import math

import pytest
from PIL import Image

from megatron_cpt.evaluation.report import ReportConfig, build_report, comparison_rows
from megatron_cpt.evaluation.report_tasks import axis_rows, noise, reading
from megatron_cpt.evaluation.results import write_json_atomic


def chat(acc_ll, acc_gen, invalid, nll, n=200):
    return {"acc_ll": acc_ll, "f1_ll": acc_ll - 0.1, "acc_gen": acc_gen, "f1_gen": acc_gen - 0.1,
            "invalid_rate": invalid, "chat_nll": nll, "chat_ppl": math.exp(nll), "samples": n}  # fmt: skip


def result(model, fpb, tatqa_em, sets=("annual_reports",)):
    ppl = {}
    for i, s in enumerate(sets):
        nll = math.log(10 + i) * 1000
        ppl[s] = {"docs": 5, "tokens": 1000, "bytes": 4000, "nll": nll, "ppl": 10.0 + i,
                  "bpb": nll / math.log(2) / 4000}  # fmt: skip
    return {
        "model": model,
        "perplexity": ppl,
        "tasks": {},
        "instruct": {"fpb": fpb},
        "tatqa": {
            "em": tatqa_em,
            "f1": tatqa_em + 0.05,
            "scale_acc": 0.5,
            "samples": 100,
            "num_fewshot": 2,
            "by_type": {
                "span": {"em": tatqa_em, "f1": 0.3, "samples": 45},
                "arithmetic": {"em": 0.0, "f1": 0.0, "samples": 39},
            },
        },  # fmt: skip
    }


@pytest.fixture
def evals(tmp_path):
    # CPT forgets how to answer (invalid 0.05 -> 0.60, accuracy of answers 0.70 -> 0.30);
    # the merge brings most of it back; label likelihood moves within noise (0.60/0.62/0.61)
    models = {
        "base": result("base", chat(0.60, 0.70, 0.05, 1.20), 0.10),
        "cpt": result("cpt", chat(0.62, 0.30, 0.60, 2.00), 0.10),
        "merged": result("merged", chat(0.61, 0.62, 0.10, 1.28), 0.11),
    }
    paths = {}
    for label, obj in models.items():
        paths[label] = tmp_path / f"{label}.json"
        write_json_atomic(paths[label], obj)
    return models, paths


def test_section_table_reading_and_chart(evals, tmp_path):
    models, paths = evals
    out = tmp_path / "report"
    md = build_report(
        ReportConfig(evals=[f"{k}={v}" for k, v in paths.items()], out_dir=str(out))
    ).read_text()
    assert "## Instruction & tasks" in md
    row = "| fpb (chat, 0-shot): invalid answers (not a label) | 200 | 0.050 | 0.600 | 0.100 |"
    assert row + " +0.550 worse | +0.050 worse |" in md
    assert "| fpb (chat, 0-shot): accuracy, generated answer | 200 | 0.700 | 0.300 | 0.620 |" in md
    assert "| TAT-QA span (n=45): exact match | 45 |" in md
    reading_text = md.split("**Reading**")[1]
    restored = reading_text.split("Forgotten by cpt and restored by merged:")[1].split("\n")[0]
    # accuracy of generated answers: 0.70 -> 0.30 -> 0.62 recovers (0.62-0.30)/(0.70-0.30) = 80%
    assert "accuracy, generated answer 0.700 → 0.300 (merged: 0.620, 80% of the loss" in restored
    # invalid rate: 0.05 -> 0.60 -> 0.10 recovers 0.50/0.55 = 91%
    assert "invalid answers (not a label) 0.050 → 0.600 (merged: 0.100, 91%" in restored
    assert "chat-format answer NLL / token 1.200 → 2.000 (merged: 1.280, 90%" in restored
    assert "accuracy, label likelihood" not in reading_text  # 0.60 -> 0.62 is within noise
    assert "![Instruction following and TAT-QA](instruct_tasks.png)" in md
    with Image.open(out / "instruct_tasks.png") as im:
        assert im.format == "PNG" and im.size[0] >= 800 and im.size[1] >= 400
        assert len(im.convert("RGB").getcolors(maxcolors=1 << 16) or range(1 << 16)) > 20


def test_noise_threshold_is_two_standard_errors():
    # p = 0.5, n = 200: 2 * sqrt(2 * 0.25 / 200) = 0.1
    assert noise(0.45, 0.55, 200, True) == pytest.approx(0.1)
    assert noise(0.45, 0.55, 200, False) is None  # F1/NLL: no binomial error, any change counts
    models = [("a", result("a", chat(0.50, 0.5, 0.1, 1.0), 0.1)),
              ("b", result("b", chat(0.59, 0.5, 0.1, 1.0), 0.1))]  # fmt: skip
    text = "\n".join(reading(models, axis_rows(models)))
    assert "accuracy, label likelihood" not in text  # +0.09 < 0.1
    assert "Improved by b: fpb (chat, 0-shot): macro-F1, label likelihood 0.400 → 0.490" in text


def test_group_summary_only_for_more_than_one_set(evals):
    models, _ = evals
    one = [(k, v) for k, v in models.items()]
    labels = [label for label, _, _ in comparison_rows(one, ReportConfig())]
    assert not any("geo-mean" in x or "mean of" in x for x in labels)
    two = [(k, result(k, v["instruct"]["fpb"], 0.1, sets=("annual_reports", "sec")))
           for k, v in models.items()]  # fmt: skip
    labels = [label for label, _, _ in comparison_rows(two, ReportConfig())]
    assert "**domain bpb** (mean of 2 set(s))" in labels and "**domain ppl** (geo-mean)" in labels


def test_results_with_only_the_new_axes_load(tmp_path):
    from megatron_cpt.evaluation.results import load_results

    obj = result("x", chat(0.5, 0.5, 0.1, 1.0), 0.1)
    obj["perplexity"] = {}
    path = tmp_path / "r.json"
    path.write_text(json.dumps(obj))
    assert load_results(path)["instruct"]["fpb"]["samples"] == 200
