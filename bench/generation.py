#!/usr/bin/env python
"""Greedy generation speed: our KV-cached batched decoder vs HF ``generate``, same model, same
prompts, side by side in one command; plus the old uncached re-forward path on a few prompts.

Prompts are real TAT-QA questions with their annual-report context (cut to ``--prompt-tokens``).
Every path decodes greedily with the same EOS; the bench checks the token ids agree before
printing speeds (tokens/s counts generated tokens over wall time, prefill included).

    python bench/generation.py                        # SmolLM2-135M GGUF, 16 prompts x 32 tokens
    python bench/generation.py --prompts 8 --max-new 64 --batch-size 4 --uncached 2
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
from megatron_cpt.evaluation.generation import (  # noqa: E402
    GenRequest,
    greedy_generate,
    greedy_uncached,
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="HF dir or .gguf (default: SmolLM2-135M-Instruct GGUF)")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--prompt-tokens", type=int, default=384)
    p.add_argument("--max-new", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--uncached", type=int, default=2, help="prompts for the re-forward path")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    backend = load_backend(BackendSpec(hf=args.model or str(assets.smollm2_gguf())))
    tok = backend.tokenizer
    data = assets.shared_data_dir() / "tasks" / "tatqa_dev.jsonl"
    rows = [json.loads(line) for line in data.read_text().splitlines()[: args.prompts]]
    prompts = [
        tok.encode(f"{r['context']}\n\nQuestion: {r['question']}\nAnswer:")[-args.prompt_tokens :]
        for r in rows
    ]
    eos = tok.eos_id
    reqs = [GenRequest(ids, args.max_new) for ids in prompts]

    # warm-up, untimed, both paths: the first forward of a process pays one-off costs (thread
    # pool start, allocator growth, lazy init) that would otherwise land on whichever runs first
    warm = prompts[0][-32:]
    greedy_generate(backend, [GenRequest(warm, 2)], eos, batch_size=1, desc=None)
    with torch.inference_mode():
        backend.model.generate(
            input_ids=torch.tensor([warm]), max_new_tokens=2, do_sample=False, pad_token_id=eos
        )

    start = time.perf_counter()
    ours = greedy_generate(backend, reqs, eos, batch_size=args.batch_size, desc=None)
    t_ours = time.perf_counter() - start

    model = backend.model
    start = time.perf_counter()
    hf_out: list[list[int]] = []
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    by_index: dict[int, list[int]] = {}
    for s in range(0, len(order), args.batch_size):
        chunk = order[s : s + args.batch_size]
        width = max(len(prompts[i]) for i in chunk)
        ids = torch.full((len(chunk), width), eos, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(chunk):
            ids[row, width - len(prompts[i]) :] = torch.tensor(prompts[i])
            mask[row, width - len(prompts[i]) :] = 1
        with torch.inference_mode():
            gen = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=args.max_new,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=eos,
            )
        for row, i in enumerate(chunk):
            new = gen[row, width:].tolist()
            by_index[i] = new[: new.index(eos)] if eos in new else new
    hf_out = [by_index[i] for i in range(len(prompts))]
    t_hf = time.perf_counter() - start

    n = min(args.uncached, len(reqs))
    start = time.perf_counter()
    slow = [greedy_uncached(backend, r, eos) for r in reqs[:n]]
    t_slow = time.perf_counter() - start

    same_hf = sum(a == b for a, b in zip(ours, hf_out))
    same_slow = sum(a == b for a, b in zip(ours[:n], slow))
    tok_ours = sum(map(len, ours))
    tok_hf = sum(map(len, hf_out))
    tok_slow = sum(map(len, slow))
    print(f"model {backend.name}; {len(reqs)} prompts x <= {args.prompt_tokens} tokens, "
          f"max_new {args.max_new}, batch {args.batch_size}, threads {args.threads}")  # fmt: skip
    print(f"identical token ids: ours vs HF generate {same_hf}/{len(reqs)}, "
          f"ours vs uncached {same_slow}/{n}")  # fmt: skip
    r_ours, r_hf = tok_ours / t_ours, tok_hf / t_hf
    r_slow = tok_slow / t_slow if t_slow else float("nan")
    print(f"ours (KV cache, batched) {tok_ours:5d} tokens {t_ours:7.1f} s  {r_ours:7.2f} tok/s")
    print(f"HF generate              {tok_hf:5d} tokens {t_hf:7.1f} s  {r_hf:7.2f} tok/s")
    print(f"uncached re-forward      {tok_slow:5d} tokens {t_slow:7.1f} s  {r_slow:7.2f} tok/s")
    print(
        f"ratio ours / HF generate: {r_ours / r_hf:.2f}x; ours / uncached: {r_ours / r_slow:.2f}x"
    )


if __name__ == "__main__":
    main()
