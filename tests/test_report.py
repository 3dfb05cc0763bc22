"""tools/report.py on synthetic-but-realistic runs written by the trainer's own MetricsLogger.

The curves imitate a CPT run (domain validation loss falls, general replay loss creeps up, a
resume re-logs some iterations, one iteration is skipped with a NaN loss); the evaluation
JSONs have the exact shape tools/evaluate.py writes. Expected table entries are recomputed
from those inputs, not typed in.
"""

from __future__ import annotations

import json
import math
import random

import pytest
from PIL import Image

from megatron_cpt.errors import UserError
from megatron_cpt.evaluation.report import (
    ReportConfig,
    build_report,
    is_general,
    load_run,
    read_metrics_jsonl,
)
from megatron_cpt.evaluation.results import write_json_atomic
from megatron_cpt.training.logging import MetricsLogger, TrainRecord


def write_run(run_dir, iters=120, tensorboard=False, resume_at=80):
    rng = random.Random(0)
    log = MetricsLogger(run_dir, tensorboard_dir=str(run_dir / "tb") if tensorboard else None,
                        stream=open("/dev/null", "w"))  # fmt: skip

    def train(i):
        loss = 2.1 + 0.6 * math.exp(-i / 40) + rng.gauss(0, 0.03)
        if i == 57:
            loss = float("nan")  # a skipped iteration (loss logged as null)
        log.train(
            TrainRecord(i, i * 8, loss, 3e-5, 0.9, 2300.0 + rng.gauss(0, 50), int(i >= 57), i * 0.9)
        )

    def valid(i):
        log.valid(i, "sec_filings", 2.4 - 0.3 * (1 - math.exp(-i / 50)))
        log.valid(i, "wikitext", 2.9 + 0.05 * (1 - math.exp(-i / 50)))

    for i in range(1, iters + 1):
        train(i)
        if i % 20 == 0:
            valid(i)
    # a crash after iteration `iters` and a resume from the checkpoint at `resume_at`:
    # those iterations are logged again, the re-logged values must win
    for i in range(resume_at + 1, iters + 1):
        train(i)  # same curve, fresh noise: distinguishable from the first logging
    log.close()
    return run_dir


def eval_json(path, model, domain_ppl, general_ppl, fpb_acc, fpb_f1):
    def ppl_row(ppl, tokens, nbytes):
        nll = math.log(ppl) * tokens
        return {"docs": 20, "tokens": tokens, "bytes": nbytes, "nll": nll, "ppl": ppl,
                "bpb": nll / math.log(2) / nbytes, "paths": ["x.jsonl"], "name": "", "skipped": {}}  # fmt: skip

    write_json_atomic(
        path,
        {
            "model": model,
            "backend": "hf",
            "perplexity": {
                "annual_reports": ppl_row(domain_ppl, 11203, 38447),
                "wikitext2": ppl_row(general_ppl, 9000, 40000),
            },
            "tasks": {
                "fpb": {"acc": fpb_acc, "f1": fpb_f1, "num_fewshot": 5, "samples": 774},
            },
            "config": {
                "perplexity": {"seq_length": 1024, "stride": None, "max_docs": 20, "prefix": "bos"}
            },
        },
    )
    return path


@pytest.fixture
def inputs(tmp_path):
    run = write_run(tmp_path / "runs" / "cpt", tensorboard=True)
    evals = {
        "base": eval_json(tmp_path / "base.json", "smollm2", 13.6, 20.0, 0.52, 0.41),
        "cpt": eval_json(tmp_path / "cpt.json", "runs/cpt", 9.8, 21.5, 0.61, 0.55),
        "merged": eval_json(tmp_path / "merged.json", "merged", 10.9, 20.3, 0.63, 0.57),
    }
    return run, evals


def test_report_renders_plots_and_deltas(inputs, tmp_path):
    run, evals = inputs
    out = tmp_path / "report"
    path = build_report(
        ReportConfig(
            runs=[str(run)], evals=[f"{k}={v}" for k, v in evals.items()], out_dir=str(out)
        )
    )
    md = path.read_text()
    for png in ("train_loss.png", "valid_loss.png", "comparison.png"):
        assert f"]({png})" in md
        with Image.open(out / png) as im:
            assert im.format == "PNG" and im.size[0] >= 800 and im.size[1] >= 400
            # not blank: a real plot has many distinct colours
            assert len(im.convert("RGB").getcolors(maxcolors=1 << 16) or range(1 << 16)) > 20

    base = json.loads(evals["base"].read_text())["perplexity"]["annual_reports"]["ppl"]
    cpt = json.loads(evals["cpt"].read_text())["perplexity"]["annual_reports"]["ppl"]
    assert f"{100 * (cpt - base) / base:+.1f}% better" in md  # domain gain
    base_w = json.loads(evals["base"].read_text())["perplexity"]["wikitext2"]["ppl"]
    cpt_w = json.loads(evals["cpt"].read_text())["perplexity"]["wikitext2"]["ppl"]
    assert f"{100 * (cpt_w - base_w) / base_w:+.1f}% worse" in md  # general forgetting
    assert "| fpb acc (5-shot) | 0.520 | 0.610 | 0.630 | +0.090 better | +0.110 better |" in md
    assert "wikitext2 ppl (general)" in md and "annual_reports ppl (domain)" in md
    assert "| wikitext | general |" in md and "| sec_filings | domain |" in md
    assert not list(tmp_path.glob(".report.*"))  # the staging dir is gone


def test_resumed_run_keeps_the_relogged_iterations(inputs):
    run, _ = inputs
    train, valid = read_metrics_jsonl(run / "metrics.jsonl")
    iterations = [t["iteration"] for t in train]
    assert iterations == sorted(set(iterations)) == list(range(1, 121))
    assert train[56]["lm_loss"] is None  # the skipped iteration
    last_lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    relogged_last = [r for r in last_lines if r["kind"] == "train" and r["iteration"] == 120][-1]
    assert train[-1]["lm_loss"] == relogged_last["lm_loss"]
    assert set(valid) == {"sec_filings", "wikitext"}


def test_tensorboard_only_run(inputs, tmp_path):
    run, _ = inputs
    jsonl = load_run(str(run))
    (run / "metrics.jsonl").unlink()
    tb = load_run(f"cpt-tb={run}")
    assert tb.source == "tensorboard" and tb.label == "cpt-tb"
    assert set(tb.valid) == set(jsonl.valid)
    assert [p[0] for p in tb.valid["wikitext"]] == [p[0] for p in jsonl.valid["wikitext"]]
    out = tmp_path / "tb_report"
    build_report(ReportConfig(runs=[str(run)], out_dir=str(out)))
    assert (out / "train_loss.png").exists() and (out / "valid_loss.png").exists()


def test_general_patterns():
    assert is_general("wikitext", ["*wiki*"]) and is_general("RedPajama-arxiv", ["*redpajama*"])
    assert not is_general("sec_filings", ["*wiki*", "*general*"])


def test_bad_inputs_are_one_line_errors(inputs, tmp_path):
    run, evals = inputs
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write('{"kind": "valid", "iteration": 130, "lm_loss": 2.0}\n')
    n = len((run / "metrics.jsonl").read_text().splitlines())
    with pytest.raises(UserError, match=rf"metrics\.jsonl:{n}: field 'name' missing"):
        load_run(str(run))
    bad = tmp_path / "bad.json"
    bad.write_text('{"perplexity": {"x": {"tokens": 1, "bytes": 1, "nll": 1, "ppl": 1}}}')
    with pytest.raises(UserError, match=r"bad\.json: perplexity\.x\.bpb missing"):
        build_report(ReportConfig(evals=[f"b={bad}"], out_dir=str(tmp_path / "r")))
    with pytest.raises(UserError, match="no such run directory"):
        build_report(ReportConfig(runs=[str(tmp_path / "nope")], out_dir=str(tmp_path / "r")))
    with pytest.raises(UserError, match="given twice"):
        build_report(
            ReportConfig(
                evals=[f"a={evals['base']}", f"a={evals['cpt']}"], out_dir=str(tmp_path / "r")
            )
        )
    assert not (tmp_path / "r").exists()  # nothing half-written


def test_cli(inputs, tmp_path, capsys):
    from test_eval_scoring import load_tool

    main = load_tool("report").main

    run, evals = inputs
    out = tmp_path / "cli_report"
    assert (
        main(
            [str(run), "--eval", f"base={evals['base']}", f"cpt={evals['cpt']}", "--out", str(out)]
        )
        == 0
    )
    assert (out / "report.md").exists() and (out / "comparison.png").exists()


def test_unbounded_task_metrics_stay_in_the_table(inputs, tmp_path):
    from megatron_cpt.evaluation.report import comparison_rows

    _, evals = inputs
    data = json.loads(evals["base"].read_text())
    data["tasks"]["wikitext"] = {"word_perplexity": 35.2, "bits_per_byte": 0.9, "num_fewshot": 0}
    write_json_atomic(evals["base"], data)
    out = tmp_path / "r"
    md = build_report(
        ReportConfig(evals=[f"base={evals['base']}", f"cpt={evals['cpt']}"], out_dir=str(out))
    ).read_text()
    assert "| wikitext word_perplexity (0-shot) | 35.200 | – | – |" in md
    assert (out / "comparison.png").exists()
    rows = {label: metric for label, metric, _ in comparison_rows(
        [("base", data), ("cpt", json.loads(evals["cpt"].read_text()))], ReportConfig())}  # fmt: skip
    assert rows["wikitext bits_per_byte (0-shot)"] == "bits_per_byte"
