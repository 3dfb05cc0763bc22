"""The merge sweep on a tiny real HF Llama (with a trained BPE tokenizer) and a few AdamW steps of
"CPT" on real domain text: grid, evaluation, Pareto front, constraint, cache, outputs, errors."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from test_eval_scoring import make_tiny_llama

from megatron_cpt.data.jsonl import read_texts
from megatron_cpt.errors import UserError
from megatron_cpt.evaluation.perplexity import PerplexityConfig
from megatron_cpt.merge.sweep import Sweep, SweepConfig, parse_constraint

METRICS = ["domain_bpb", "general_bpb", "sec_bpb", "wiki_bpb"]


def first_docs(path, n, chars=400):
    return [text[:chars] for _, text in itertools.islice(read_texts([str(path)], "text"), n)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, shared_data):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("sweep")
    base = make_tiny_llama(root / "base")
    sets = {}
    for name, rel in (("sec", "domain/annual_reports.jsonl"), ("wiki", "general/wikitext2.jsonl")):
        docs = first_docs(shared_data / rel, 14)
        (root / f"{name}_eval.jsonl").write_text(
            "".join(json.dumps({"text": t}) + "\n" for t in docs[8:])
        )
        sets[name] = docs[:8]
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batch = tok(sets["sec"], truncation=True, max_length=64)
    torch.manual_seed(0)
    for _ in range(6):  # a short "CPT" on domain text: domain bpb falls, general moves
        for ids in batch["input_ids"]:
            loss = model(input_ids=torch.tensor([ids]), labels=torch.tensor([ids])).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
    model.save_pretrained(root / "cpt")
    tok.save_pretrained(root / "cpt")
    return root


def sweep_config(root, out, **overrides):
    cfg = dict(
        base=root / "base",
        models=[root / "cpt"],
        domain={"sec": [str(root / "sec_eval.jsonl")]},
        general={"wiki": [str(root / "wiki_eval.jsonl")]},
        out_dir=out,
        method="ties",
        densities=[0.5, 1.0],
        weights=[0.5, 1.0],
        perplexity=PerplexityConfig(seq_length=64, batch_size=4),
        constraints=["general_bpb<=base*1.02"],
    )
    cfg.update(overrides)
    return SweepConfig(**cfg)


def test_sweep_grid_pareto_constraint_and_cache(setup, tmp_path):
    out = tmp_path / "sweep"
    logs: list[str] = []
    summary = Sweep(sweep_config(setup, out)).run(log=logs.append)
    assert summary["evaluated"] == 6 and summary["cached"] == 0  # base, cpt, 2 x 2 grid
    refs = {r["label"]: r for r in summary["references"]}
    cands = {r["label"]: r for r in summary["candidates"]}
    assert set(cands) == {"d0.5 w0.5", "d0.5 w1", "d1 w0.5", "d1 w1"}
    assert refs["base"]["domain_gain_pct"] == 0 and refs["base"]["general_change_pct"] == 0
    # the "CPT" worked: domain bpb fell
    assert refs["cpt"]["metrics"]["domain_bpb"] < refs["base"]["metrics"]["domain_bpb"]
    # density 1, weight 1, no normalize: the merge IS the CPT model, so it scores the same
    for m in METRICS:
        assert cands["d1 w1"]["metrics"][m] == pytest.approx(refs["cpt"]["metrics"][m], rel=1e-5)
    # with one model, the domain/general means are the single sets'
    for r in summary["candidates"]:
        assert r["metrics"]["domain_bpb"] == r["metrics"]["sec_bpb"]
    # Pareto flags, recomputed here
    rows = summary["candidates"]
    for r in rows:
        dominated = any(
            o["metrics"]["domain_bpb"] <= r["metrics"]["domain_bpb"]
            and o["metrics"]["general_bpb"] <= r["metrics"]["general_bpb"]
            and o["metrics"] != r["metrics"]
            for o in rows
        )
        assert r["pareto"] == (not dominated), r["label"]
    # the recommendation: the lowest domain bpb among points meeting the constraint
    base_general = refs["base"]["metrics"]["general_bpb"]
    feasible = [r for r in rows if r["metrics"]["general_bpb"] <= base_general * 1.02]
    assert [r["feasible"] for r in rows] == [r in feasible for r in rows]
    if feasible:
        best = min(feasible, key=lambda r: r["metrics"]["domain_bpb"])
        assert summary["recommended"]["label"] == best["label"]
    else:
        assert summary["recommended"] is None
    for name in ("sweep.md", "sweep.json", "pareto.png"):
        assert (out / name).stat().st_size > 0
    assert (out / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    assert "| d0.5 w0.5 |" in (out / "sweep.md").read_text()
    assert not list(out.glob("candidates/*/model"))  # merged weights dropped once scored

    # a re-run with one more weight evaluates only the two new points
    again = Sweep(sweep_config(setup, out, weights=[0.5, 1.0, 0.25])).run(log=logs.append)
    assert again["evaluated"] == 2 and again["cached"] == 6
    old = {r["label"]: r["metrics"] for r in rows}
    for r in again["candidates"]:
        if r["label"] in old:
            assert r["metrics"] == old[r["label"]] and r["cached"]


def test_constraint_parsing():
    c = parse_constraint("general_bpb<=base*1.01", METRICS)
    refs = {"base": {"general_bpb": 2.0}}
    assert c.bound(refs) == pytest.approx(2.02)
    assert parse_constraint("general_bpb <= base+1%", METRICS).bound(refs) == pytest.approx(2.02)
    assert parse_constraint("general_bpb<=base+0.1", METRICS).bound(refs) == pytest.approx(2.1)
    assert parse_constraint("wiki_bpb<1.5", METRICS).holds({"wiki_bpb": 1.4}, refs)
    assert not parse_constraint("domain_bpb>=cpt", METRICS).holds(
        {"domain_bpb": 1.0}, {"cpt": {"domain_bpb": 1.1}}
    )
    for bad, expect in (
        ("general_bpb<=", "expected METRIC OP"),
        ("foo_bpb<=base", "unknown metric foo_bpb"),
        ("general_bpb<=base*1%", "% goes with"),
    ):
        with pytest.raises(UserError, match=expect):
            parse_constraint(bad, METRICS)


def test_sweep_config_errors(setup, tmp_path):
    for overrides, expect in (
        ({"method": "slerp"}, "the sweep supports"),
        ({"general": {}}, "at least one --domain"),
        ({"method": "task_arithmetic"}, "does not sparsify"),
        ({"densities": [0.0, 0.5]}, "within"),
        ({"constraints": ["general<=base"]}, "unknown metric general"),
        # a set whose NAME_bpb would overwrite the mean of the other group's / several sets
        ({"domain": {"general": ["x.jsonl"]}}, "general_bpb is the mean over the general sets"),
        ({"domain": {"domain": ["x.jsonl"], "sec": ["y.jsonl"]}}, "domain_bpb is the mean"),
    ):
        with pytest.raises(UserError, match=expect):
            Sweep(sweep_config(setup, tmp_path / "x", **overrides))


def test_set_named_like_its_axis_is_one_column(setup, tmp_path):
    """The demo names its sets "domain" and "general": their NAME_bpb is the axis itself."""
    sweep = Sweep(
        sweep_config(
            setup,
            tmp_path / "x",
            domain={"domain": [str(setup / "sec_eval.jsonl")]},
            general={"general": [str(setup / "wiki_eval.jsonl")]},
        )
    )
    assert sweep.metrics == ["domain_bpb", "general_bpb"]


def test_cli_bad_constraint_is_one_line(setup, tmp_path):
    from test_merge import ROOT

    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools/merge_sweep.py"), "--base", str(setup / "base"),
         "--model", str(setup / "cpt"), "--domain", f"sec={setup / 'sec_eval.jsonl'}",
         "--general", f"wiki={setup / 'wiki_eval.jsonl'}", "--out", str(tmp_path / "o"),
         "--constraint", "general_bpb=>base"],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --constraint 'general_bpb=>base'")


def test_megatron_space_sweep_equals_hf_space_and_reuses_its_cache(setup, tmp_path):
    """The same sweep over Megatron checkpoints (imported from the HF base and CPT): every
    candidate, exported, is the HF-space candidate bit for bit, scores the same, and a widened
    grid evaluates only the new points."""
    from safetensors.torch import load_file

    from megatron_cpt.convert.exporter import ExportConfig, export_hf
    from megatron_cpt.convert.importer import ImportConfig, import_hf

    for name in ("base", "cpt"):
        import_hf(ImportConfig(str(setup / name), str(tmp_path / f"mc-{name}")))
    hf = Sweep(sweep_config(setup, tmp_path / "hf", keep_models=True)).run(log=lambda _: None)
    megatron_cfg = sweep_config(
        setup,
        tmp_path / "mc",
        base=tmp_path / "mc-base",
        models=[tmp_path / "mc-cpt"],
        tokenizer=str(setup / "base"),
        keep_models=True,
    )
    sweep = Sweep(megatron_cfg)
    assert sweep.megatron
    mc = sweep.run(log=lambda _: None)
    assert mc["evaluated"] == 6 and mc["cached"] == 0
    hf_rows = {r["label"]: r for r in [*hf["references"], *hf["candidates"]]}
    assert [r["label"] for r in mc["candidates"]] == [r["label"] for r in hf["candidates"]]
    for row in [*mc["references"], *mc["candidates"]]:
        for metric in METRICS:  # two forward implementations, fp32: equal to rounding
            assert row["metrics"][metric] == pytest.approx(
                hf_rows[row["label"]]["metrics"][metric], rel=1e-4
            ), (row["label"], metric)
    for row in mc["candidates"]:
        exported = tmp_path / "export" / row["key"]
        export_hf(
            ExportConfig(str(tmp_path / "mc/candidates" / row["key"] / "model"), str(exported))
        )
        ours = load_file(str(exported / "model.safetensors"))
        reference_dir = tmp_path / "hf/candidates" / hf_rows[row["label"]]["key"] / "model"
        reference = {}
        for file in sorted(reference_dir.glob("*.safetensors")):
            reference |= load_file(str(file))
        assert ours.keys() == reference.keys()
        for name, tensor in reference.items():
            assert torch.equal(ours[name], tensor), (row["label"], name)

    widened = replace(megatron_cfg, weights=[0.5, 1.0, 0.25])
    again = Sweep(widened).run(log=lambda _: None)
    assert again["evaluated"] == 2 and again["cached"] == 6
    old = {r["label"]: r["metrics"] for r in mc["candidates"]}
    for r in again["candidates"]:
        assert r["cached"] == (r["label"] in old)
        if r["label"] in old:
            assert r["metrics"] == old[r["label"]]
