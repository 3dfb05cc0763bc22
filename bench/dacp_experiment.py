"""A/B at equal training tokens: ETS-DACP vs a random selection of the same ~10% token budget.

Question (FinPythia's claim, at the largest scale this CPU allows): does continuing pre-training
on the task-similar ~10% of a domain corpus lower perplexity on held-out *task-domain* text more
than the same number of tokens from a random ~10%? (Default 11%: see ``token_budget``.)

    python bench/dacp_experiment.py --work-dir /tmp/dacp --seeds 0 1 2 --out dacp.json

Setup (all offline, CPU, every model step through the project's own tools):
- domain corpus: ../shared/data/domain/*.jsonl (annual-report paragraphs + SEC agreement
  sentences), MinHash-deduplicated by the selector for both arms alike;
- ETS-DACP task data: FPB minus its last ``--heldout-fpb`` sentences + FiQA-SA train;
- held-out evaluation text, never used for selection: those last FPB sentences + FiQA-SA test
  (the first ``--eval-sentences`` of each); the script asserts no overlap with the task data;
- both arms select ``--fraction`` of the deduplicated corpus's SmolLM2 tokens (one token
  budget for both, see ``token_budget``) with ``tools/select_data.py``'s
  library (similarity/hard vs random/hard, same budget), written straight to megatron-core shards
  by the selector's shard writer (``--output-prefix``; EOD after each document). The ETS-DACP
  selection does not depend on the seed; the random arm's sample is drawn with the run's seed;
- SmolLM2-135M-Instruct is converted once (``convert_checkpoint.py hf-to-mcore``) and each
  arm x seed continues from it with ``tools/pretrain.py`` (megatron-core) on exactly
  ``steps x global batch x seq_len`` tokens: same LR schedule (constant ``--lr``, no warmup,
  no weight decay, clip 1.0) for every run; ``--seed`` sets the data order (megatron-core's
  GPTDataset shuffle) as well as the random arm's sample;
- metric: token-weighted held-out perplexity of the converted base and of every trained
  checkpoint, all scored by ``tools/evaluate.py --megatron`` (each sentence a document after
  BOS, ``--seq-length`` window), so before and after share one scorer.

Each step is a subprocess exactly as a user would type it (``logs/`` keeps every command and
its output); finished steps are skipped on re-run (``--work-dir`` keeps them), so an interrupted
experiment resumes. Trained checkpoints are deleted after their evaluation unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from megatron_cpt import assets  # noqa: E402
from megatron_cpt.data.jsonl import read_texts  # noqa: E402
from megatron_cpt.selection.pipeline import SelectionConfig, run_selection  # noqa: E402
from megatron_cpt.selection.sampling import Budget  # noqa: E402
from megatron_cpt.selection.similarity import SimilarityConfig  # noqa: E402
from megatron_cpt.selection.to_shards import ShardOutputConfig  # noqa: E402
from megatron_cpt.selection.tokens import TokenCounterConfig  # noqa: E402

ARMS = (("ets-dacp", "similarity"), ("random", "random"))


def _write_jsonl(path: Path, texts: list[str]) -> None:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")


def _clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _since(start: tuple[float, float]) -> str:
    wall, _ = _clock()
    return f"{wall - start[0]:.0f}s wall"


def task_and_heldout(data_dir: Path, heldout_fpb: int, eval_sentences: int):
    """Task data for ETS-DACP and the held-out task-domain sentences (disjoint by text)."""
    fpb = [t for _, t in read_texts(str(data_dir / "tasks" / "fpb.jsonl"))]
    task = fpb[:-heldout_fpb] + [
        t for _, t in read_texts(str(data_dir / "tasks" / "fiqasa_train.jsonl"))
    ]
    task_set = set(task)
    fiqa_test = [t for _, t in read_texts(str(data_dir / "tasks" / "fiqasa_test.jsonl"))]
    # FiQA-SA repeats some texts across its splits; those are dropped from the held-out set.
    heldout = [t for t in fpb[-heldout_fpb:] if t not in task_set][:eval_sentences]
    heldout += [t for t in fiqa_test if t not in task_set][:eval_sentences]
    assert not task_set & set(heldout)
    dropped = sum(t in task_set for t in fiqa_test)
    return task, heldout, dropped


def selection_config(
    data_dir: Path, out_dir: Path, arm: str, metric: str, seed: int, budget: Budget, args,
    task_path: Path, shards: bool = True,
) -> SelectionConfig:  # fmt: skip
    """One arm's selection (JSONL + megatron-core shards, SmolLM2 token counts)."""
    gguf = str(assets.smollm2_gguf())
    return SelectionConfig(
        inputs=(str(data_dir / "domain" / "*.jsonl"),),
        output=str(out_dir / f"{arm}.jsonl"),
        budget=budget,
        metrics=(metric,),
        seed=seed,
        cache_dir=args.cache_dir,
        progress=False,
        similarity=SimilarityConfig(task_data=(str(task_path),)),
        tokens=TokenCounterConfig(tokenizer=gguf),
        shards=ShardOutputConfig(
            output_prefix=str(out_dir / arm),
            tokenizer_type="HuggingFaceTokenizer",
            tokenizer_model=gguf,
            append_eod=True,
        )
        if shards
        else None,
    )


def token_budget(data_dir: Path, work: Path, args, task_path: Path) -> tuple[Budget, int]:
    """``--fraction`` of the deduplicated corpus's SmolLM2 tokens, the same budget for both arms.

    A document-count fraction would give the arms different token counts (random 10 % of the
    documents held 29-38k tokens over seeds 0-5, the task-similar 10 % 42k), and some random draws
    would then be shorter than the training budget, i.e. repeat data. On ../shared/data 10 % of
    the tokens is 30,850, and a token budget stops before the document that would cross it, so
    the ETS-DACP selection held 30,715 tokens (EOD included): fewer than the 30,721 that 30 x 4
    x 256 training tokens need. Hence the default ``--fraction`` of 0.11.
    """
    probe = work / "select" / "probe"
    summary_path = probe / "random.summary.json"
    if not summary_path.exists():
        probe.mkdir(parents=True, exist_ok=True)
        run_selection(selection_config(data_dir, probe, "random", "random", 0,
                                       Budget("fraction", 1.0), args, task_path, shards=False))  # fmt: skip
    kept = json.loads(summary_path.read_text())["tokens"]["kept_after_dedup"]
    return Budget("tokens", int(args.fraction * kept)), kept


class Runner:
    """Runs our CLIs as subprocesses, one at a time, logging each to ``work/logs``."""

    def __init__(self, work: Path, threads: int):
        self.logs = work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                        CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS=str(threads),
                        TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")  # fmt: skip

    def tool(self, name: str, *args, log: str) -> None:
        cmd = [sys.executable, str(REPO / "tools" / name), *map(str, args)]
        path = self.logs / f"{log}.log"
        with open(path, "w") as fh:
            fh.write(shlex.join(cmd) + "\n")
            fh.flush()
            code = subprocess.call(cmd, stdout=fh, stderr=subprocess.STDOUT, env=self.env)
        if code != 0:
            tail = path.read_text().splitlines()[-8:]
            raise SystemExit(f"{name} failed (exit {code}); log {path}:\n" + "\n".join(tail))

    def evaluate(self, checkpoint: Path, heldout: Path, out: Path, args, log: str) -> dict:
        if not out.exists():
            self.tool("evaluate.py", "--megatron", checkpoint, "--tokenizer",
                      assets.smollm2_gguf(), "--data", f"heldout={heldout}",
                      "--seq-length", args.seq_len, "--batch-size", 16, "--output", out,
                      log=log)  # fmt: skip
        return json.loads(out.read_text())["perplexity"]["heldout"]


def train_args(base: Path, prefix: str, save: Path, seed: int, args) -> list:
    return [
        "--pretrained-checkpoint", base, "--save", save, "--data-path", prefix,
        "--split", "100,0,0", "--tokenizer-type", "HuggingFaceTokenizer",
        "--tokenizer-model", assets.smollm2_gguf(), "--seq-length", args.seq_len,
        "--micro-batch-size", args.micro_batch_size, "--global-batch-size", args.global_batch_size,
        "--train-iters", args.steps, "--lr", args.lr, "--min-lr", args.lr,
        "--lr-decay-style", "constant", "--lr-warmup-iters", 0, "--weight-decay", 0.0,
        "--clip-grad", 1.0, "--log-interval", 1, "--save-interval", args.steps,
        "--no-save-optim", "--seed", seed,
    ]  # fmt: skip


def losses_from_log(path: Path) -> list[float]:
    """``lm loss`` per logged iteration, from pretrain.py's log lines."""
    out = []
    for line in path.read_text().splitlines():
        if "iteration" in line and "lm loss" in line:
            out.append(float(line.split("lm loss")[1].split("|")[0].strip(" :")))
    return out


def summarize(results: dict, seeds: list[int]) -> list[str]:
    base = results["base_ppl"]
    by = {(r["arm"], r["seed"]): r["heldout_ppl"] for r in results["runs"]}
    lines = ["seed  ets-dacp ppl  random ppl  ETS/random"]
    ratios = []
    for seed in seeds:
        if ("ets-dacp", seed) in by and ("random", seed) in by:
            ratio = by["ets-dacp", seed] / by["random", seed]
            ratios.append(ratio)
            lines.append(f"{seed:4d}  {by['ets-dacp', seed]:12.3f}  {by['random', seed]:10.3f}"
                         f"  {ratio:10.4f}")  # fmt: skip
    lines.append(f"base (before training): {base:.3f}")
    for arm, _ in ARMS:
        vals = [by[arm, s] for s in seeds if (arm, s) in by]
        if len(vals) >= 2:
            lines.append(f"{arm}: mean {statistics.mean(vals):.3f} std {statistics.stdev(vals):.3f}"
                         f" min-max {min(vals):.3f}-{max(vals):.3f} (n={len(vals)})")  # fmt: skip
    if len(ratios) >= 2:
        lines.append(f"ratio ETS/random: mean {statistics.mean(ratios):.4f} std "
                     f"{statistics.stdev(ratios):.4f} min-max {min(ratios):.4f}-{max(ratios):.4f}"
                     f" (n={len(ratios)}; <1: ETS better)")  # fmt: skip
        results["ratio_stats"] = {"mean": statistics.mean(ratios),
                                  "std": statistics.stdev(ratios),
                                  "min": min(ratios), "max": max(ratios), "n": len(ratios)}  # fmt: skip
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", type=Path, default=assets.shared_data_dir())
    p.add_argument("--work-dir", type=Path, default=Path("runs/dacp_experiment"))
    p.add_argument(
        "--fraction",
        type=float,
        default=0.11,
        help="of the deduplicated corpus's tokens, per arm (0.11: the smallest round fraction "
        "whose selections hold 30 x 4 x 256 tokens without repeating any; see token_budget)",
    )
    p.add_argument("--heldout-fpb", type=int, default=150)
    p.add_argument("--eval-sentences", type=int, default=64, help="per held-out set")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--global-batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each tool")
    p.add_argument("--cache-dir", help="selection score cache (default: the selector's)")
    p.add_argument("--keep", action="store_true", help="keep the trained checkpoints")
    p.add_argument("--out", type=Path, default=Path("dacp_experiment.json"))
    args = p.parse_args(argv)
    if args.data_dir is None:
        raise SystemExit("../shared/data not found (set MEGATRON_CPT_SHARED_DATA)")
    t0 = _clock()
    work = args.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    # Finished steps are reused on re-run, so a work dir holds one setting only.
    setting = {k: str(v) for k, v in vars(args).items() if k not in ("seeds", "keep", "out")}
    setting_path = work / "setting.json"
    if setting_path.exists() and json.loads(setting_path.read_text()) != setting:
        raise SystemExit(f"{work} holds a run with other settings ({setting_path}); use another "
                         "--work-dir")  # fmt: skip
    setting_path.write_text(json.dumps(setting, indent=1) + "\n")
    runner = Runner(work, args.threads)
    n_tokens = args.steps * args.global_batch_size * args.seq_len

    task, heldout, dropped = task_and_heldout(args.data_dir, args.heldout_fpb, args.eval_sentences)
    print(f"[data] task {len(task)} texts; held-out {len(heldout)} sentences "
          f"({dropped} FiQA-SA test texts also in train dropped)", flush=True)  # fmt: skip
    _write_jsonl(work / "task.jsonl", task)
    _write_jsonl(work / "heldout.jsonl", heldout)

    base = work / "base_mcore"
    if not (base / "latest_checkpointed_iteration.txt").exists():
        runner.tool("convert_checkpoint.py", "hf-to-mcore", "--hf", assets.smollm2_gguf(),
                    "--out", base, "--overwrite", log="convert")  # fmt: skip
    base_eval = runner.evaluate(base, work / "heldout.jsonl", work / "eval_base.json", args,
                                log="evaluate_base")  # fmt: skip
    print(f"[eval] base held-out ppl {base_eval['ppl']:.3f} on {base_eval['docs']} sentences, "
          f"{base_eval['tokens']} tokens ({_since(t0)})", flush=True)  # fmt: skip
    results = {"args": {k: str(v) for k, v in vars(args).items()}, "train_tokens": n_tokens,
               "base_ppl": base_eval["ppl"], "heldout_tokens": base_eval["tokens"],
               "selections": {}, "runs": []}  # fmt: skip

    budget, kept = token_budget(args.data_dir, work, args, work / "task.jsonl")
    results["budget"] = {"kind": "tokens", "value": int(budget.value), "corpus_tokens": kept}
    print(f"[select] budget {int(budget.value)} of {kept} SmolLM2 tokens after dedup "
          f"({args.fraction:g}) for each arm", flush=True)  # fmt: skip
    for seed in args.seeds:
        for arm, metric in ARMS:
            # ETS-DACP (hard top-k) does not depend on the seed: one selection serves all seeds.
            sel_dir = work / "select" / (arm if arm == "ets-dacp" else f"{arm}_seed{seed}")
            summary_path = sel_dir / f"{arm}.summary.json"
            if not summary_path.exists():
                sel_dir.mkdir(parents=True, exist_ok=True)
                run_selection(selection_config(args.data_dir, sel_dir, arm, metric, seed, budget,
                                               args, work / "task.jsonl"))  # fmt: skip
            summary = json.loads(summary_path.read_text())
            shards = summary["outputs"]["shards"]
            if shards["tokens"] < n_tokens + 1:
                raise SystemExit(f"{arm}: selection has {shards['tokens']} tokens < "
                                 f"{n_tokens + 1} needed (would repeat data); lower --steps")  # fmt: skip
            results["selections"][sel_dir.name] = {"documents": shards["documents"],
                                                   "tokens": shards["tokens"]}  # fmt: skip
            run_dir = work / "runs" / f"{arm}_seed{seed}"
            out = run_dir / "eval.json"
            if not out.exists():
                run_dir.mkdir(parents=True, exist_ok=True)
                runner.tool("pretrain.py", *train_args(base, shards["prefix"], run_dir / "ckpt",
                                                       seed, args), log=f"train_{arm}_seed{seed}")  # fmt: skip
            ev = runner.evaluate(run_dir / "ckpt", work / "heldout.jsonl", out, args,
                                 log=f"evaluate_{arm}_seed{seed}")  # fmt: skip
            if not args.keep:
                shutil.rmtree(run_dir / "ckpt", ignore_errors=True)
            losses = losses_from_log(runner.logs / f"train_{arm}_seed{seed}.log")
            run = {"arm": arm, "seed": seed, "train_tokens": n_tokens, "heldout_ppl": ev["ppl"],
                   "selection_documents": shards["documents"],
                   "selection_tokens": shards["tokens"],
                   "train_loss_first_last": [losses[0], losses[-1]] if losses else None}  # fmt: skip
            results["runs"].append(run)
            loss = f"loss {losses[0]:.3f}->{losses[-1]:.3f}, " if losses else ""
            print(f"[train] {arm:8s} seed {seed}: {n_tokens} tokens of {shards['tokens']} "
                  f"selected, {loss}held-out ppl {base_eval['ppl']:.3f} -> {ev['ppl']:.3f} "
                  f"({_since(t0)})", flush=True)  # fmt: skip
            args.out.write_text(json.dumps(results, indent=2) + "\n")
    print()
    for line in summarize(results, args.seeds):
        print(line)
    results["total"] = _since(t0)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"total {_since(t0)}; results -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
