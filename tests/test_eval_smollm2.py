"""Evaluation on the real SmolLM2-135M-Instruct and the real ../shared/data text and tasks.

Kept small (a few docs, short windows, ``limit`` of a few examples) because one 135M forward
of a few hundred tokens takes around a second on the shared 2-core machine; the model is loaded
once for the module. Expected values are relations, not constants: real text must be far more
predictable than the same words shuffled, and our lm-eval adapter must reproduce lm-eval's own
HF model on the same weights.
"""

from __future__ import annotations

import json
import math
import random

import pytest
from lm_eval.api.instance import Instance

from megatron_cpt.data.jsonl import read_texts
from megatron_cpt.evaluation.backend import BackendSpec, load_backend
from megatron_cpt.evaluation.lm_eval_adapter import MegatronCPTLM
from megatron_cpt.evaluation.perplexity import PerplexityConfig, evaluate_set, score_texts
from megatron_cpt.evaluation.tasks_runner import TasksConfig, run_tasks


@pytest.fixture(scope="module")
def smol(smollm2_gguf):
    return load_backend(BackendSpec(hf=str(smollm2_gguf)))


def _first_texts(path, n, max_chars):
    """The first ``n`` documents cut to ``max_chars``: real text, CPU-affordable length."""
    return [text[:max_chars] for _, text in zip(range(n), (t for _, t in read_texts(str(path))))]


def test_real_text_perplexity_and_bpb(smol, shared_data, tmp_path):
    sets = {
        "annual_reports": _first_texts(shared_data / "domain/annual_reports.jsonl", 2, 400),
        "wikitext2": _first_texts(shared_data / "general/wikitext2.jsonl", 1, 400),
    }
    cfg = PerplexityConfig(seq_length=48, batch_size=8)
    results = {}
    for name, texts in sets.items():
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        results[name] = res = evaluate_set(smol, name, [str(path)], cfg)
        assert res.tokens > 48  # more than one rolling window
        assert res.bytes == sum(len(t.encode("utf-8")) for t in texts)
        assert res.bpb == pytest.approx(res.nll / math.log(2) / res.bytes)
    # the same words in random order: a real LM must find the original far more predictable
    shuffled = []
    for text in sets["annual_reports"]:
        words = text.split(" ")
        random.Random(0).shuffle(words)
        shuffled.append(" ".join(words))
    _, _, nbytes, nll_shuffled = score_texts(smol, shuffled, cfg, desc=None)
    assert nbytes == results["annual_reports"].bytes
    assert results["annual_reports"].nll < 0.8 * nll_shuffled


def test_adapter_matches_lm_eval_hflm_on_smollm2(smol, shared_data):
    from lm_eval.models.huggingface import HFLM

    docs = [
        t
        for _, t in zip(range(2), (t for _, t in read_texts(str(shared_data / "tasks/fpb.jsonl"))))
    ]
    prompt = "Text: {}\nSentiment:"
    pairs = [(prompt.format(d), f" {c}") for d in docs for c in ("negative", "neutral", "positive")]
    reqs = [Instance("loglikelihood", {}, p, idx=i) for i, p in enumerate(pairs)]
    ours = MegatronCPTLM(backend=smol, batch_size=6).loglikelihood(reqs, disable_tqdm=True)
    ref = HFLM(pretrained=smol.model, tokenizer=smol.tokenizer.hf, batch_size=6, device="cpu")
    theirs = ref.loglikelihood(reqs, disable_tqdm=True)
    for (lp, greedy), (ref_lp, ref_greedy) in zip(ours, theirs):
        assert lp == pytest.approx(ref_lp, abs=2e-3)
        assert greedy == ref_greedy


def test_finance_tasks_run_on_smollm2(smol, shared_data):
    lm = MegatronCPTLM(backend=smol, batch_size=6)
    res = run_tasks(lm, TasksConfig(tasks=["finance"], limit=2))  # k-shot: test_eval_scoring
    assert set(res) == {"fpb", "fiqasa", "headlines"}
    for task, row in res.items():
        assert row["samples"] == 2 and row["num_fewshot"] == 0, task
        assert 0.0 <= row["acc"] <= 1.0 and 0.0 <= row["f1"] <= 1.0


@pytest.mark.slow
def test_converted_smollm2_perplexity_matches_hf(smol, smollm2_gguf, shared_data, tmp_path):
    """The acceptance check on the real model: GGUF -> megatron-core -> same perplexity."""
    from megatron_cpt.convert.importer import ImportConfig, import_hf

    ckpt = tmp_path / "smollm2_mcore"
    import_hf(ImportConfig(str(smollm2_gguf), str(ckpt)))
    megatron = load_backend(BackendSpec(megatron=str(ckpt)))
    path = tmp_path / "ar.jsonl"
    texts = _first_texts(shared_data / "domain/annual_reports.jsonl", 3, 1500)
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    cfg = PerplexityConfig(seq_length=256, batch_size=4)
    ref = evaluate_set(smol, "ar", [str(path)], cfg)
    ours = evaluate_set(megatron, "ar", [str(path)], cfg)
    assert ours.tokens == ref.tokens
    assert abs(ours.ppl / ref.ppl - 1) < 1e-3
