#!/usr/bin/env python
"""The seed study at CPU scale (issue 17): SmolLM2-135M-Instruct fine-tuned (full and LoRA)
vs the same model zero-shot and 5-shot, on FiQA-SA and FPB held-out items.

One command, offline, CPU:

    python bench/sft_vs_fewshot.py --out /tmp/sftx --train-items 256 --test-items 100

Arms per dataset, all scored by the same label log-likelihood scorer as the demo's
instruction axis (``instruct.label_choice``: the label + the template's end of turn as the
whole assistant answer, each label's probability summed over both casings), with
``prefix_scoring.cached_label_logprobs`` computing the table (one forward per prompt; checked
here against the uncached scorer on the first items):

- ``zero``: the instruction of ``instruct.INSTRUCT_TASKS`` as one user turn, SmolLM2's chat
  template (which adds its default system prompt);
- ``five``: the same, after 5 demonstration turns (user = the instruction on a train item,
  assistant = its label): the first 5 items of the seeded train order with at most 2 per label;
- ``full`` / ``lora``: our pipeline. ``convert_checkpoint.py hf-to-mcore`` (the GGUF, fp32) ->
  ``preprocess_sft.py`` on ``{prompt: the zero-shot instruction, response: the label word}``
  (packed, assistant-only loss) -> ``pretrain.py --sft`` from that checkpoint (full: all
  weights; LoRA: ``--lora-rank`` adapters on all four linears, base frozen) ->
  ``convert_checkpoint.py mcore-to-hf`` (LoRA merged) -> scored zero-shot as above. Each
  training runs in its own process; its wall time, CPU seconds (user + system) and peak RSS
  come from ``os.wait4`` on that process.

Splits (fixed, seed 17): FiQA-SA trains on ``fiqasa_train.jsonl`` and tests on
``fiqasa_test.jsonl``; FPB has no split, so ``fpb.jsonl`` is shuffled with
``random.Random(17)`` and the last 200 items are its test split, the rest its train split.
Train items whose text also occurs in the test split are dropped (16 FiQA-SA texts are in
both of its files; FPB repeats some sentences). ``--train-items`` / ``--test-items`` take the
first N of each split in that seeded order.
Accuracy and macro-F1 (sklearn, over the gold label set) are printed as a markdown table and
written with everything else to ``OUT/results.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SEED = 17
FPB_TEST = 200
DATASETS = ("fiqasa", "fpb")
ARMS = ("zero", "five", "full", "lora")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="work and result directory")
    p.add_argument("--datasets", default=",".join(DATASETS))
    p.add_argument("--arms", default=",".join(ARMS))
    p.add_argument("--train-items", type=int, default=None, help="default: the whole split")
    p.add_argument("--test-items", type=int, default=None, help="default: the whole split")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--seq-length", type=int, default=512, help="packed: ~5 conversations")
    p.add_argument("--micro-batch-size", type=int, default=2)
    p.add_argument("--global-batch-size", type=int, default=2)
    p.add_argument("--full-lr", type=float, default=2e-5)
    p.add_argument("--lora-lr", type=float, default=2e-4)
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--lora-alpha", type=float, default=32)
    p.add_argument("--threads", type=int, default=1, help="torch / OMP threads everywhere")
    p.add_argument("--check-items", type=int, default=2, help="cached == uncached on these")
    p.add_argument(
        "--reuse-trained",
        action="store_true",
        help="score an arm's existing OUT/DATASET/ARM_hf export instead of training again "
        "(its training numbers stay in the run that trained it)",
    )
    return p.parse_args(argv)


# ---- data -----------------------------------------------------------------------------------


def splits(name: str, data_dir: Path) -> tuple[list[dict], list[dict]]:
    from megatron_cpt.evaluation.instruct import INSTRUCT_TASKS
    from megatron_cpt.evaluation.tasks.utils import _records

    labels = [x.lower() for x in INSTRUCT_TASKS[name].labels]

    def shuffled(path):
        rows = _records(data_dir / path, labels, ("text",))
        random.Random(SEED).shuffle(rows)
        return rows

    if name == "fiqasa":
        train, test = shuffled("fiqasa_train.jsonl"), shuffled("fiqasa_test.jsonl")
    else:
        rows = shuffled("fpb.jsonl")
        train, test = rows[:-FPB_TEST], rows[-FPB_TEST:]
    held = {r["text"] for r in test}  # 16 FiQA-SA texts are in both files; FPB has repeats
    return [r for r in train if r["text"] not in held], test


def pick_demos(train: list[dict], n_labels: int, k: int = 5) -> list[dict]:
    per_label, demos = [0] * n_labels, []
    for row in train:
        if per_label[row["gold"]] < 2:
            per_label[row["gold"]] += 1
            demos.append(row)
        if len(demos) == k:
            return demos
    raise SystemExit(f"error: fewer than {k} usable demonstrations in the train split")


# ---- subprocesses with their own rusage -----------------------------------------------------


def run_measured(cmd: list[str], log: Path, env: dict) -> dict:
    """Run ``cmd``; wall, CPU seconds and peak RSS of that process (``os.wait4``)."""
    start = time.perf_counter()
    with log.open("w") as fh:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        tail = log.read_text()[-3000:]
        raise SystemExit(f"error: {' '.join(cmd[:3])} ... exit {code}; log {log}:\n{tail}")
    return {
        "wall_s": round(wall, 1),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
        "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),  # Linux: KiB
    }


def tool(name: str) -> list[str]:
    return [sys.executable, str(REPO / "tools" / name)]


# ---- scoring --------------------------------------------------------------------------------


class Scorer:
    """One model's chat prompts and label forms, scored by ``instruct.label_choice``."""

    def __init__(self, path: str):
        from megatron_cpt.evaluation.backend import HFBackend, HFBackendConfig
        from megatron_cpt.evaluation.chat import chat_template_of, end_of_turn

        self.backend = HFBackend.from_config(HFBackendConfig(path))
        tok = self.backend.tokenizer
        self.template = chat_template_of(self.backend)
        self.bos = tok.decode([tok.bos_id]) if tok.bos_id is not None else ""
        self.eos = tok.decode([tok.eos_id]) if tok.eos_id is not None else ""
        self.eot = end_of_turn(self.template, self.bos, self.eos)

    def prompt(self, task, row: dict, demos: list[dict]) -> list[int]:
        from megatron_cpt.evaluation.chat import render_chat

        messages = []
        for d in demos:
            messages.append({"role": "user", "content": task.instruction.format(**d)})
            messages.append({"role": "assistant", "content": task.labels[d["gold"]]})
        messages.append({"role": "user", "content": task.instruction.format(**row)})
        text = render_chat(self.template, messages, True, self.bos, self.eos)
        return self.backend.tokenizer.encode(text)

    def evaluate(self, task, rows, demos, check: int, desc: str) -> dict:
        from megatron_cpt.evaluation.instruct import (
            label_choice,
            label_forms,
            label_logprobs,
            macro_f1,
        )
        from megatron_cpt.evaluation.prefix_scoring import cached_label_logprobs

        tok = self.backend.tokenizer
        prompts = [self.prompt(task, r, demos) for r in rows]
        forms = [[tok.encode(f + self.eot) for f in label_forms(lab)] for lab in task.labels]
        start = time.perf_counter()
        preds, _ = label_choice(
            self.backend, prompts, forms, desc=desc, table_fn=cached_label_logprobs
        )
        seconds = time.perf_counter() - start
        check_diff = None
        if check:  # the cached table equals the uncached scorer's on the first items
            flat = [f for label in forms for f in label]
            a = label_logprobs(self.backend, prompts[:check], flat)
            b = cached_label_logprobs(self.backend, prompts[:check], flat)
            check_diff = max(abs(x.logprob - y.logprob) for ra, rb in zip(a, b)
                             for x, y in zip(ra, rb))  # fmt: skip
            if check_diff > 1e-3:
                raise SystemExit(f"error: cached scorer differs by {check_diff} ({desc})")
        golds = [r["gold"] for r in rows]
        n = len(task.labels)
        return {
            "acc": sum(p == g for p, g in zip(preds, golds)) / len(rows),
            "macro_f1": macro_f1(golds, preds, n),
            "n": len(rows),
            "pred_counts": [preds.count(k) for k in range(n)],
            "gold_counts": [golds.count(k) for k in range(n)],
            "mean_prompt_tokens": round(sum(map(len, prompts)) / len(prompts), 1),
            "score_s": round(seconds, 1),
            "cached_vs_uncached_max_abs_diff": check_diff,
        }


# ---- the experiment -------------------------------------------------------------------------


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    from megatron_cpt import assets
    from megatron_cpt.evaluation.instruct import INSTRUCT_TASKS
    from megatron_cpt.evaluation.tasks.utils import finance_data_dir

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    datasets = args.datasets.split(",")
    arms = args.arms.split(",")
    data_dir = finance_data_dir()
    gguf = str(assets.smollm2_gguf())
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=str(args.threads))
    results: dict = {"args": vars(args), "gguf": gguf, "datasets": {}}
    results_path = out / "results.json"

    def save():
        results_path.write_text(json.dumps(results, indent=2))

    base = out / "base_mcore"
    if {"full", "lora"} & set(arms) and not base.exists():
        results["import"] = run_measured(
            [*tool("convert_checkpoint.py"), "hf-to-mcore", "--hf", gguf, "--out", str(base),
             "--dtype", "float32"],
            out / "import.log", env,
        )  # fmt: skip

    for name in datasets:
        task = INSTRUCT_TASKS[name]
        train, test = splits(name, data_dir)
        demos = pick_demos(train, len(task.labels))
        train = train[: args.train_items] if args.train_items else train
        test = test[: args.test_items] if args.test_items else test
        res = results["datasets"][name] = {
            "train_items": len(train),
            "test_items": len(test),
            "demos": [{"text": d["text"], "label": task.labels[d["gold"]]} for d in demos],
            "arms": {},
            "training": {},
        }
        work = out / name
        work.mkdir(exist_ok=True)
        # ---- SFT data: prompt = the zero-shot instruction, response = the label word
        if {"full", "lora"} & set(arms):
            jsonl = work / "train.jsonl"
            jsonl.write_text(
                "".join(
                    json.dumps(
                        {"prompt": task.instruction.format(**r), "response": task.labels[r["gold"]]}
                    )
                    + "\n"
                    for r in train
                )  # fmt: skip
            )
            proc = subprocess.run(
                [*tool("preprocess_sft.py"), "--input", str(jsonl), "--output-prefix",
                 str(work / "sft"), "--tokenizer-type", "HuggingFaceTokenizer",
                 "--tokenizer-model", gguf, "--seq-length", str(args.seq_length)],
                cwd=REPO, env=env, capture_output=True, text=True,
            )  # fmt: skip
            if proc.returncode != 0:
                raise SystemExit(f"error: preprocess_sft failed:\n{proc.stderr[-3000:]}")
            summary = json.loads(proc.stdout[proc.stdout.index("{") :])
            res["sft_data"] = summary
            iters = max(1, math.ceil(summary["samples"] * args.epochs / args.global_batch_size))
            res["train_iters"] = iters
        for arm in ("full", "lora"):
            if arm not in arms or (args.reuse_trained and (work / f"{arm}_hf").is_dir()):
                continue
            lr = args.full_lr if arm == "full" else args.lora_lr
            extra = []
            if arm == "lora":
                extra = ["--lora-rank", str(args.lora_rank), "--lora-alpha", str(args.lora_alpha)]
            run_dir, ckpt, hf = work / f"{arm}_run", work / f"{arm}_ckpt", work / f"{arm}_hf"
            cmd = [
                *tool("pretrain.py"), "--model", "smollm2-135m",
                "--pretrained-checkpoint", str(base), "--sft",
                "--data-path", str(work / "sft_tokens"),
                "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", gguf,
                "--seq-length", str(args.seq_length),
                "--micro-batch-size", str(args.micro_batch_size),
                "--global-batch-size", str(args.global_batch_size),
                "--train-iters", str(iters), "--lr", str(lr), "--min-lr", str(lr / 10),
                "--lr-warmup-iters", str(max(1, iters // 8)), "--lr-decay-style", "cosine",
                "--weight-decay", "0.0", "--clip-grad", "1.0", "--seed", str(SEED),
                "--log-interval", "1", "--eval-interval", str(iters + 1),
                "--save", str(ckpt), "--run-dir", str(run_dir), *extra,
            ]  # fmt: skip
            measured = run_measured(cmd, work / f"{arm}_train.log", env)
            losses = [
                r["lm_loss"]
                for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
                if r["kind"] == "train"
            ]
            tokens = iters * args.global_batch_size * args.seq_length
            measured.update(
                lr=lr,
                iters=iters,
                train_tokens=tokens,
                loss_tokens=round(summary["loss_tokens"] * iters * args.global_batch_size
                                  / summary["samples"]),
                tokens_per_cpu_s=round(tokens / measured["cpu_s"], 1),
                first_loss=losses[0],
                last_loss=losses[-1],
            )  # fmt: skip
            measured["export"] = run_measured(
                [*tool("convert_checkpoint.py"), "mcore-to-hf", "--load", str(ckpt), "--out",
                 str(hf), "--overwrite"],
                work / f"{arm}_export.log", env,
            )  # fmt: skip
            res["training"][arm] = measured
            save()
            print(f"[{name}] {arm}: {json.dumps(measured)}", flush=True)

        # ---- scoring (per dataset, so a finished dataset is complete even if a later one
        # is not): the base model zero- and 5-shot, then each fine-tune zero-shot
        scored = [(arm, gguf, shots) for arm, shots in (("zero", []), ("five", demos))]
        scored += [(arm, str(work / f"{arm}_hf"), []) for arm in ("full", "lora")]
        scorer, loaded = None, None
        for arm, model, shots in scored:
            if arm not in arms:
                continue
            if loaded != model:
                scorer, loaded = Scorer(model), model
            check = args.check_items if arm in ("zero", "five") else 0
            r = scorer.evaluate(task, test, shots, check, f"{name} {arm}")
            res["arms"][arm] = r
            save()
            print(f"[{name}] {arm}: {json.dumps(r)}", flush=True)
        del scorer

    print(table(results))
    return 0


def table(results: dict) -> str:
    lines = [
        "| dataset | n test | arm | accuracy | macro-F1 | predicted (Neg/Neu/Pos) |",
        "|---|---|---|---|---|---|",
    ]
    for name, res in results["datasets"].items():
        for arm, r in res["arms"].items():
            lines.append(
                f"| {name} | {r['n']} | {arm} | {r['acc']:.3f} | {r['macro_f1']:.3f} | "
                f"{'/'.join(map(str, r['pred_counts']))} (gold "
                f"{'/'.join(map(str, r['gold_counts']))}) |"
            )
    lines += ["", "| dataset | arm | train items | iters | train tokens | wall s | CPU s | "
              "peak RSS MiB | loss first -> last |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, res in results["datasets"].items():
        for arm, t in res["training"].items():
            lines.append(
                f"| {name} | {arm} | {res['train_items']} | {t['iters']} | {t['train_tokens']} "
                f"| {t['wall_s']} | {t['cpu_s']} | {t['peak_rss_mib']} | "
                f"{t['first_loss']:.3f} -> {t['last_loss']:.3f} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
