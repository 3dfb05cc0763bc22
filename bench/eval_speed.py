#!/usr/bin/env python
"""Perplexity-evaluation speed: our rolling-window scorer vs lm-eval's HF model, side by side.

Same model object, same documents (held-out annual-report text), same window length and batch
size; ours is ``evaluate_set`` (what ``tools/evaluate.py --data`` runs), lm-eval's is
``HFLM.loglikelihood_rolling`` (what ``lm_eval --model hf`` runs for ``wikitext``-style tasks).
Both score every token once with disjoint windows; the bench checks the total NLL agrees before
printing sequences/s and tokens/s. Each path runs ``--repeats`` times, alternating, best time
kept (the shared machine is noisy).

    python bench/eval_speed.py                   # SmolLM2 GGUF, 16 docs, 256-token windows
    python bench/eval_speed.py --docs 8 --seq-length 512 --batch-size 4
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from megatron_cpt import assets  # noqa: E402
from megatron_cpt.evaluation.backend import BackendSpec, load_backend  # noqa: E402
from megatron_cpt.evaluation.perplexity import PerplexityConfig, score_texts  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="HF dir or .gguf (default: SmolLM2-135M-Instruct GGUF)")
    p.add_argument("--docs", type=int, default=16)
    p.add_argument("--seq-length", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    backend = load_backend(BackendSpec(hf=args.model or str(assets.smollm2_gguf())))
    path = assets.shared_data_dir() / "domain" / "annual_reports.jsonl"
    texts = [json.loads(line)["text"] for line in path.read_text().splitlines()[-args.docs :]]
    cfg = PerplexityConfig(seq_length=args.seq_length, batch_size=args.batch_size)
    ref = HFLM(
        pretrained=backend.model,
        tokenizer=backend.tokenizer.hf,
        batch_size=args.batch_size,
        max_length=args.seq_length,
        device="cpu",
    )
    # lm-eval counts one "sequence" per window; so do we (rolling windows of seq_length)
    requests = [
        Instance("loglikelihood_rolling", {}, (t,), i, metadata=("bench", i, 1))
        for i, t in enumerate(texts)
    ]
    best = {"ours": float("inf"), "lm-eval HFLM": float("inf")}
    nll = {}
    for _ in range(args.repeats):
        start = time.perf_counter()
        _, tokens, _, nll["ours"] = score_texts(backend, texts, cfg, desc=None)
        best["ours"] = min(best["ours"], time.perf_counter() - start)
        start = time.perf_counter()
        with torch.inference_mode():
            nll["lm-eval HFLM"] = -sum(ref.loglikelihood_rolling(requests, disable_tqdm=True))
        best["lm-eval HFLM"] = min(best["lm-eval HFLM"], time.perf_counter() - start)
    windows = sum(-(-len(backend.tokenizer.encode(t)) // args.seq_length) for t in texts)
    print(f"model {backend.name}; {len(texts)} docs, {tokens} tokens, {windows} windows of "
          f"{args.seq_length}, batch {args.batch_size}, threads {torch.get_num_threads()}, "
          f"best of {args.repeats}")  # fmt: skip
    print(f"total NLL ours {nll['ours']:.3f} vs lm-eval {nll['lm-eval HFLM']:.3f} "
          f"(relative difference {abs(nll['ours'] / nll['lm-eval HFLM'] - 1):.1e})")  # fmt: skip
    for name, seconds in best.items():
        print(f"{name:<14} {seconds:7.1f} s  {windows / seconds:6.2f} windows/s  "
              f"{tokens / seconds:8.1f} tokens/s")  # fmt: skip
    print(f"ratio ours / lm-eval (throughput): {best['lm-eval HFLM'] / best['ours']:.2f}x")


if __name__ == "__main__":
    main()
