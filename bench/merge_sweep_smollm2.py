#!/usr/bin/env python
"""The merge sweep on the real SmolLM2-135M-Instruct: a quick CPT, then ``tools/merge_sweep.py``.

The quick CPT is plain AdamW on SEC annual reports (``--steps`` steps of ``--batch`` x
``--seq`` tokens, documents 0.. of the file); the sweep evaluates on later, unseen annual-report
documents (domain) and wikitext2 (general). The CPT model is cached in ``WORK/cpt``; the sweep's
candidates in ``WORK/sweep/candidates`` (re-runs evaluate only new points).

    python bench/merge_sweep_smollm2.py --work runs/sweep-smollm2
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def save_hf(model, tok, out: Path) -> None:
    """save_pretrained refuses GGUF-loaded models; their weights are plain dequantized floats."""
    from safetensors.torch import save_file

    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()
             if not (k == "lm_head.weight" and model.config.tie_word_embeddings)}  # fmt: skip
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["dtype"] = "float32"
    config["architectures"] = [type(model).__name__]
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    tok.save_pretrained(tmp)
    tmp.rename(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=Path("runs/sweep-smollm2"))
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--eval-docs", type=int, default=10)
    p.add_argument("--eval-chars", type=int, default=2000)
    p.add_argument("--density", default="0.2,0.5,0.8,1.0")
    p.add_argument("--weight", default="0.5,1.0")
    p.add_argument("--constraint", default="general_bpb<=base*1.01")
    args = p.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_cpt import assets
    from megatron_cpt.data.jsonl import read_texts

    data = assets.shared_data_dir()
    work = args.work.resolve()
    base_dir, cpt_dir = work / "instruct", work / "cpt"
    gguf = assets.smollm2_gguf()
    domain_file = data / "domain" / "annual_reports.jsonl"
    texts = [t for _, t in itertools.islice(read_texts([str(domain_file)], "text"), 400)]
    train_docs = args.steps * args.batch
    if not base_dir.exists():
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                     dtype=torch.float32)  # fmt: skip
        save_hf(model, tok, base_dir)
    if not cpt_dir.exists():
        tok = AutoTokenizer.from_pretrained(base_dir)
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
        torch.manual_seed(0)
        model.train()
        start = time.perf_counter()
        for step in range(args.steps):
            docs = texts[step * args.batch : (step + 1) * args.batch]
            batch = tok(docs, return_tensors="pt", truncation=True, max_length=args.seq,
                        padding="max_length")  # fmt: skip
            labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
            loss = model(**batch, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            print(f"cpt step {step + 1}/{args.steps} loss {loss.item():.4f} "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)  # fmt: skip
        save_hf(model, tok, cpt_dir)
    eval_dir = work / "eval"
    eval_dir.mkdir(parents=True, exist_ok=True)
    held_out = texts[train_docs + 50 : train_docs + 50 + args.eval_docs]
    general_file = data / "general" / "wikitext2.jsonl"
    general = [t for _, t in itertools.islice(read_texts([str(general_file)], "text"), 400)
               if len(t) > 500][: args.eval_docs]  # fmt: skip
    for name, docs in (("sec", held_out), ("wiki", general)):
        (eval_dir / f"{name}.jsonl").write_text(
            "".join(json.dumps({"text": d[: args.eval_chars]}) + "\n" for d in docs)
        )
    cmd = [sys.executable, str(ROOT / "tools/merge_sweep.py"), "--base", str(base_dir),
           "--model", str(cpt_dir), "--method", "ties", "--density", args.density,
           "--weight", args.weight, "--domain", f"sec={eval_dir / 'sec.jsonl'}",
           "--general", f"wiki={eval_dir / 'wiki.jsonl'}", "--seq-length", "256",
           "--batch-size", "4", "--constraint", args.constraint, "--out", str(work / "sweep")]  # fmt: skip
    print("$", " ".join(cmd[1:]), flush=True)
    start = time.perf_counter()
    code = subprocess.call(cmd, cwd=ROOT)
    print(f"sweep took {time.perf_counter() - start:.0f} s")
    return code


if __name__ == "__main__":
    sys.exit(main())
