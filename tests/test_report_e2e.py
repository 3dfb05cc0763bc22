"""The report and the evaluator on a *real* run: convert -> preprocess -> pretrain -> evaluate.

A tiny Llama (random weights, BPE tokenizer trained in the test) is converted to megatron-core,
continued-pretrained for a few iterations by tools/pretrain.py on real ../shared/data text with
domain and general validation sets, then the trained checkpoint is evaluated through
``--megatron`` (its tokenizer found from the trainer's recorded flags) and reported on.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_eval_scoring import make_tiny_llama

REPO = Path(__file__).resolve().parent.parent


def tool(name: str, *args) -> str:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    # the in-process conversion set up a one-rank group and exported its port: a child that
    # inherits MASTER_PORT would try to bind the same port
    for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, str(REPO / "tools" / name), *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=1200)  # fmt: skip
    assert proc.returncode == 0, f"{name}: {proc.stderr[-3000:]}"
    return proc.stdout


@pytest.mark.slow
def test_report_on_a_real_training_run(shared_data, tmp_path):
    from PIL import Image

    from megatron_cpt.convert.importer import ImportConfig, import_hf

    hf = make_tiny_llama(tmp_path / "hf")
    base = tmp_path / "base_mcore"
    import_hf(ImportConfig(str(hf), str(base)))
    tok = ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", hf]
    prefixes = {}
    for name, src in {
        "domain": shared_data / "domain/annual_reports.jsonl",
        "general": shared_data / "general/wikitext2.jsonl",
    }.items():
        out = tmp_path / "shards" / name
        tool("preprocess_data.py", *tok, "--input", src, "--append-eod", "--output-prefix", out)
        prefixes[name] = f"{out}_text_document"

    run = tmp_path / "run"
    tool(
        "pretrain.py", "--pretrained-checkpoint", base, "--save", run / "checkpoints",
        "--run-dir", run, "--tensorboard-dir", run / "tb",
        "--data-path", 0.9, prefixes["domain"], 0.1, prefixes["general"], "--split", "100,0,0",
        "--valid-data-path", f"annual_reports={prefixes['domain']}",
        f"wikitext={prefixes['general']}", *tok,
        "--seq-length", 64, "--micro-batch-size", 4, "--global-batch-size", 8,
        "--train-iters", 30, "--lr", 3e-3, "--min-lr", 3e-4, "--lr-warmup-iters", 3,
        "--log-interval", 1, "--eval-interval", 10, "--eval-iters", 2, "--save-interval", 30,
        "--seed", 1234,
    )  # fmt: skip
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert {r["name"] for r in records if r["kind"] == "valid"} == {"annual_reports", "wikitext"}

    held_out = tmp_path / "held_out.jsonl"
    with open(shared_data / "domain/annual_reports.jsonl") as src:
        held_out.write_text("".join(next(src) for _ in range(3)))
    common = ["--data", f"annual_reports={held_out}", "--seq-length", 64, "--max-docs", 3]
    tool("evaluate.py", "--hf", hf, *common, "--output", tmp_path / "base.json")
    tool(
        "evaluate.py", "--megatron", run / "checkpoints", *common, "--output", tmp_path / "cpt.json"
    )
    base_ppl = json.loads((tmp_path / "base.json").read_text())["perplexity"]["annual_reports"]
    cpt_ppl = json.loads((tmp_path / "cpt.json").read_text())["perplexity"]["annual_reports"]
    assert cpt_ppl["tokens"] == base_ppl["tokens"]
    assert cpt_ppl["ppl"] < base_ppl["ppl"]  # 30 steps on this very text must help a random model

    out = tmp_path / "report"
    tool("report.py", run, "--eval", f"base={tmp_path / 'base.json'}",
         f"cpt={tmp_path / 'cpt.json'}", "--out", out)  # fmt: skip
    md = (out / "report.md").read_text()
    assert "| annual_reports | domain |" in md and "| wikitext | general |" in md
    assert "better" in md
    for png in ("train_loss.png", "valid_loss.png", "comparison.png"):
        with Image.open(out / png) as im:
            assert im.format == "PNG"
