"""A/B at equal training tokens: ETS-DACP 10% vs a random 10% of the domain corpus.

Question (FinPythia's claim, at toy scale): does continuing pre-training on the task-similar
10% of a domain corpus lower perplexity on held-out *task-domain* text more than the same number
of tokens from a random 10%?

Setup (all offline, CPU):
- domain corpus: ../shared/data/domain/*.jsonl (annual-report paragraphs + SEC agreement
  sentences), MinHash-deduplicated by the selector for both arms alike;
- ETS-DACP task data: FPB minus its last ``--heldout-fpb`` sentences + FiQA-SA train;
- held-out evaluation text, never used for selection: those last FPB sentences + FiQA-SA test
  (the first ``--eval-sentences`` of each); the script asserts no overlap with the task data;
- both arms select ``--fraction`` of the deduplicated corpus with ``tools/select_data.py``'s
  library (similarity/hard vs random/hard, same budget), then train SmolLM2-135M-Instruct from
  the same weights on exactly ``steps * batch * seq_len`` tokens of packed documents (EOS between
  documents, order shuffled by the seed), full-parameter AdamW at a constant LR;
- metric: token-weighted held-out perplexity before and after, per arm and seed.

The trainer is a plain Hugging Face Transformers loop on purpose: the variable under test is the
data, and the project's megatron-core trainer was being written concurrently.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from megatron_cpt import assets  # noqa: E402
from megatron_cpt.data.jsonl import read_texts  # noqa: E402
from megatron_cpt.selection.perplexity import batch_nll, load_causal_lm  # noqa: E402
from megatron_cpt.selection.pipeline import SelectionConfig, run_selection  # noqa: E402
from megatron_cpt.selection.sampling import Budget  # noqa: E402
from megatron_cpt.selection.similarity import SimilarityConfig  # noqa: E402


def _write_jsonl(path: Path, texts: list[str]) -> None:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")


def _clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _since(start: tuple[float, float]) -> str:
    wall, cpu = _clock()
    return f"{wall - start[0]:.0f}s wall, {cpu - start[1]:.0f}s CPU"


def heldout_perplexity(model, tokenizer, texts: list[str], batch_size: int = 16) -> float:
    """Token-weighted perplexity over sentences (each scored on its own, batched by length)."""
    model.eval()
    ids = sorted((tokenizer(t)["input_ids"] for t in texts), key=len)
    total, count = 0.0, 0
    for start in range(0, len(ids), batch_size):
        for s, c in batch_nll(model, tokenizer, ids[start : start + batch_size]):
            total, count = total + s, count + c
    return math.exp(total / count)


def packed_batches(tokenizer, texts: list[str], seed: int, args) -> torch.Tensor:
    """``steps x batch x seq_len`` tokens of the selection, documents shuffled and EOS-joined."""
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    need = args.steps * args.batch_size * args.seq_len
    stream: list[int] = []
    for i in order:
        stream += tokenizer(texts[i], add_special_tokens=False)["input_ids"]
        stream.append(tokenizer.eos_token_id)
        if len(stream) >= need:
            break
    if len(stream) < need:
        raise SystemExit(f"selection has {len(stream)} tokens < {need} needed; lower --steps")
    return torch.tensor(stream[:need]).view(args.steps, args.batch_size, args.seq_len)


def train(model, batches: torch.Tensor, seed: int, lr: float) -> list[float]:
    torch.manual_seed(seed)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    for batch in batches:
        batch = batch.to(model.device)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", type=Path, default=assets.shared_data_dir())
    p.add_argument("--fraction", type=float, default=0.1)
    p.add_argument("--heldout-fpb", type=int, default=150)
    p.add_argument("--eval-sentences", type=int, default=64, help="per held-out set")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--cache-dir", help="selection score cache (default: the selector's)")
    p.add_argument("--out", type=Path, default=Path("dacp_experiment.json"))
    args = p.parse_args(argv)
    if args.data_dir is None:
        raise SystemExit("../shared/data not found (set MEGATRON_CPT_SHARED_DATA)")
    d = args.data_dir
    t0 = _clock()

    fpb = [t for _, t in read_texts(str(d / "tasks" / "fpb.jsonl"))]
    task = fpb[: -args.heldout_fpb] + [
        t for _, t in read_texts(str(d / "tasks" / "fiqasa_train.jsonl"))
    ]
    task_set = set(task)
    fiqa_test = [t for _, t in read_texts(str(d / "tasks" / "fiqasa_test.jsonl"))]
    # FiQA-SA repeats some texts across its splits; those are dropped from the held-out set.
    heldout = [t for t in fpb[-args.heldout_fpb :] if t not in task_set][: args.eval_sentences]
    heldout += [t for t in fiqa_test if t not in task_set][: args.eval_sentences]
    print(
        f"[data] task {len(task)} texts; held-out {len(heldout)} sentences "
        f"({sum(t in task_set for t in fiqa_test)} FiQA-SA test texts also in train dropped)"
    )

    tmp = Path(tempfile.mkdtemp(prefix="dacp_"))
    _write_jsonl(tmp / "task.jsonl", task)
    domain = (str(d / "domain" / "*.jsonl"),)
    selections = {}
    for arm, metric in (("ets-dacp", "similarity"), ("random", "random")):
        config = SelectionConfig(
            inputs=domain,
            output=str(tmp / f"{arm}.jsonl"),
            budget=Budget("fraction", args.fraction),
            metrics=(metric,),
            seed=12345,
            cache_dir=args.cache_dir,
            similarity=SimilarityConfig(task_data=(str(tmp / "task.jsonl"),)),
        )
        summary = run_selection(config)
        selections[arm] = [t for _, t in read_texts(config.output)]
        print(
            f"[select] {arm}: {summary['counts']['selected']}/"
            f"{summary['counts']['kept_after_dedup']} docs, "
            f"{summary['tokens']['selected']} words ({_since(t0)})",
            flush=True,
        )

    model, tokenizer = load_causal_lm(assets.smollm2_gguf())
    base_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    base = heldout_perplexity(model, tokenizer, heldout)
    n_tokens = args.steps * args.batch_size * args.seq_len
    print(f"[eval] base held-out ppl {base:.3f} on {len(heldout)} sentences ({_since(t0)})")
    results = {"args": {k: str(v) for k, v in vars(args).items()}, "base_ppl": base, "runs": []}
    for seed in args.seeds:
        for arm, texts in selections.items():
            model.load_state_dict(base_state)
            losses = train(model, packed_batches(tokenizer, texts, seed, args), seed, args.lr)
            ppl = heldout_perplexity(model, tokenizer, heldout)
            run = {"arm": arm, "seed": seed, "train_tokens": n_tokens, "heldout_ppl": ppl}
            run["train_loss_first_last"] = [losses[0], losses[-1]]
            results["runs"].append(run)
            print(
                f"[train] {arm:8s} seed {seed}: {n_tokens} tokens, loss {losses[0]:.3f}->"
                f"{losses[-1]:.3f}, held-out ppl {base:.3f} -> {ppl:.3f} ({_since(t0)})",
                flush=True,
            )
    print("\narm       seed  train_tokens  heldout_ppl  vs_base")
    for r in results["runs"]:
        print(
            f"{r['arm']:9s} {r['seed']:4d}  {r['train_tokens']:12d}  {r['heldout_ppl']:11.3f}"
            f"  {r['heldout_ppl'] / base:7.4f}"
        )
    for seed in args.seeds:
        by = {r["arm"]: r["heldout_ppl"] for r in results["runs"] if r["seed"] == seed}
        ratio = by["ets-dacp"] / by["random"]
        print(f"seed {seed}: ETS-DACP / random held-out ppl ratio = {ratio:.4f} (<1: ETS better)")
    results["total"] = _since(t0)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"total {_since(t0)}; results -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
