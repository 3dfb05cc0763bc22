"""Data selection at scale: dedup and scoring throughput and dedup memory, side by side.

Dedup (synthetic documents, streamed so the corpus is never held; each variant in its own
process so that its peak RSS is its own):
  - ``memory``: today's single-process whole-corpus datasketch index (the baseline),
  - ``staged``: the file-based staged dedup with 1 worker and with ``--workers`` workers,
  for each corpus size in ``--docs``; printed: documents/s, peak RSS, ratios against the
  baseline and against 1 worker. Correctness is checked on real text first: the staged result
  equals the in-memory one on ../shared/data/domain.

Scoring (real text: ../shared/data/domain, no dedup, a fresh cache per run): each metric in
``--scorers`` through ``tools/select_data.py`` in one process vs ``torchrun --nproc_per_node
--ranks``; printed: documents/s from the summary's per-rank scoring seconds (model loading
included) and end to end.

    python bench/select_scale.py --docs 20000 80000 --workers 2 --scorers pos-entropy --ranks 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def _mix(x):
    """splitmix64 finaliser, elementwise on a uint64 array: a counter-based hash, so any
    document's words can be regenerated from (seed, document, position) without state."""
    import numpy as np

    with np.errstate(over="ignore"):
        x = (x + np.uint64(0x9E3779B97F4A7C15)) & np.uint64(0xFFFFFFFFFFFFFFFF)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def synthetic(n: int, seed: int = 0, words: int = 200, block: int = 1000):
    """Random ``words``-word documents over a 20,000-word vocabulary; every 10th re-uses an
    earlier one with its last word changed. Generated a block at a time from a counter-based
    hash (nothing held, cheap next to MinHash: the bench measures the dedup, not this)."""
    import numpy as np

    vocab = [f"w{k}" for k in range(20000)]
    pos = np.arange(words, dtype=np.uint64)
    salt = np.uint64(seed) * np.uint64(0x2545F4914F6CDD1D)

    def ids(docs):  # (len(docs), words) word ids
        x = (docs.astype(np.uint64)[:, None] * np.uint64(words) + pos) ^ salt
        return (_mix(x) % np.uint64(len(vocab))).astype(np.int64)

    for lo in range(0, n, block):
        docs = np.arange(lo, min(n, lo + block), dtype=np.int64)
        copy = docs % 10 == 9
        pick = _mix(docs.astype(np.uint64) ^ ~salt) % np.maximum(docs, 1).astype(np.uint64)
        src = np.where(copy, pick.astype(np.int64) // 10 * 10, docs)  # an original, never a copy
        for i, row in zip(docs.tolist(), ids(src).tolist()):
            text = [vocab[w] for w in row]
            if i % 10 == 9:
                text[-1] = "changed"
            yield " ".join(text)


def _child(args) -> None:
    from megatron_cpt.selection.dedup import DedupConfig, NearDuplicateFilter
    from megatron_cpt.selection.staged_dedup import StagedDedupConfig, run_staged_dedup

    config = DedupConfig()
    start = time.perf_counter()
    if args.child == "memory":
        dedup = NearDuplicateFilter(config)
        dups = sum(
            dedup.check(str(i), t) is not None
            for i, t in enumerate(synthetic(args.n, words=args.words))
        )
    else:
        with tempfile.TemporaryDirectory(dir=args.work) as work:
            staged = StagedDedupConfig(work, args.chunk, args.workers)
            dup, _ = run_staged_dedup(synthetic(args.n, words=args.words), config, staged)
            dups = int((dup >= 0).sum())
    seconds = time.perf_counter() - start
    # peak RSS of this process and of its (finished) worker processes, in MiB
    me = resource.getrusage(resource.RUSAGE_SELF)
    ch = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = me.ru_utime + me.ru_stime + ch.ru_utime + ch.ru_stime
    out = {"seconds": seconds, "cpu": cpu, "duplicates": dups}
    out.update(rss=me.ru_maxrss / 1024, child_rss=ch.ru_maxrss / 1024)
    print(json.dumps(out))


def _run_child(kind: str, n: int, workers: int, chunk: int, work: str, words: int) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--n", str(n), "--workers", str(workers)]
    cmd += ["--chunk", str(chunk), "--work", work, "--words", str(words)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def check_real_text() -> None:
    from megatron_cpt import assets
    from megatron_cpt.data.jsonl import read_texts
    from megatron_cpt.selection.dedup import DedupConfig, NearDuplicateFilter
    from megatron_cpt.selection.staged_dedup import StagedDedupConfig, run_staged_dedup

    root = assets.shared_data_dir()
    if root is None:
        print("[real text] ../shared/data absent: equality check skipped")
        return
    texts = [t for p in sorted((root / "domain").glob("*.jsonl")) for _, t in read_texts(str(p))]
    dedup = NearDuplicateFilter(DedupConfig())
    ref = [dedup.check(str(i), t) for i, t in enumerate(texts)]
    ref = [-1 if r is None else int(r) for r in ref]
    with tempfile.TemporaryDirectory() as work:
        dup, _ = run_staged_dedup(iter(texts), DedupConfig(), StagedDedupConfig(work, 100, 2))
    same = dup.tolist() == ref
    print(
        f"[real text] domain: {len(texts)} docs, in-memory {sum(r >= 0 for r in ref)} dups, "
        f"staged (chunk 100, 2 workers) {int((dup >= 0).sum())} dups, identical: {same}"
    )
    if not same:
        sys.exit("staged dedup differs from the in-memory dedup")


def bench_dedup(args) -> None:
    check_real_text()
    print(
        f"\n{'variant':<22}{'docs':>8}{'docs/s':>10}{'docs/cpu-s':>12}{'peak MiB':>10}"
        f"{'dups':>8}  ratio (wall)"
    )
    for n in args.docs:
        base = _run_child("memory", n, 1, args.chunk, args.work, args.words)
        rows = [("memory (baseline)", base, 1)]
        one = _run_child("staged", n, 1, args.chunk, args.work, args.words)
        rows.append(("staged 1 worker", one, 1))
        if args.workers > 1:
            many = _run_child("staged", n, args.workers, args.chunk, args.work, args.words)
            rows.append((f"staged {args.workers} workers", many, args.workers))
        for name, r, w in rows:
            rate = n / r["seconds"]
            peak = r["rss"] + (r["child_rss"] if w > 1 else 0)  # main + largest worker
            ratio = f"{rate / (n / base['seconds']):.2f}x memory"
            if w > 1:
                ratio += f", {rate / (n / one['seconds']):.2f}x 1 worker (goal >= {0.8 * w:.1f})"
            per_cpu = n / r["cpu"]
            print(
                f"{name:<22}{n:>8}{rate:>10.0f}{per_cpu:>12.0f}{peak:>10.0f}"
                f"{r['duplicates']:>8}  {ratio}"
            )
            if r["duplicates"] != base["duplicates"]:
                sys.exit(f"{name}: {r['duplicates']} duplicates vs {base['duplicates']}")


def bench_scorers(args) -> None:
    from megatron_cpt import assets

    root = assets.shared_data_dir()
    if root is None:
        print("[scorers] ../shared/data absent: skipped")
        return
    inputs = [str(p) for p in sorted((root / "domain").glob("*.jsonl"))]
    tool = str(REPO / "tools" / "select_data.py")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    print(f"\n{'scorer':<14}{'ranks':>6}{'docs':>6}{'scoring docs/s':>16}{'wall s':>8}  ratio")
    for metric in args.scorers:
        rates = {}
        for ranks in (1, args.ranks):
            with tempfile.TemporaryDirectory(dir=args.work) as tmp:
                out = Path(tmp) / "sel.jsonl"
                cmd = [sys.executable, tool] if ranks == 1 else [
                    sys.executable, "-m", "torch.distributed.run", "--standalone",
                    "--nproc_per_node", str(ranks), tool,
                ]  # fmt: skip
                cmd += ["--input", *inputs, "--metric", metric, "--documents", "10", "--no-dedup"]
                cmd += ["--output", str(out), "--cache-dir", str(Path(tmp) / "c"), "--no-progress"]
                if metric == "similarity":
                    cmd += ["--task-data", str(root / "tasks" / "fpb.jsonl")]
                start = time.perf_counter()
                subprocess.run(cmd, env=env, check=True, capture_output=True)
                wall = time.perf_counter() - start
                summary = json.loads((Path(tmp) / "sel.summary.json").read_text())
            docs = summary["counts"]["kept_after_dedup"]
            rate = docs / max(summary["scoring_seconds_per_rank"])
            rates[ranks] = rate
            ratio = (
                ""
                if ranks == 1
                else f"{rate / rates[1]:.2f}x 1 process (goal >= {0.8 * ranks:.1f})"
            )
            print(f"{metric:<14}{ranks:>6}{docs:>6}{rate:>16.1f}{wall:>8.0f}  {ratio}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--docs", type=int, nargs="+", default=[20000, 80000])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--words", type=int, default=200, help="words per synthetic document")
    p.add_argument("--chunk", type=int, default=10000, help="staged dedup chunk (documents)")
    p.add_argument("--scorers", nargs="*", default=["pos-entropy"])
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--work", default=tempfile.gettempdir())
    p.add_argument("--skip-dedup", action="store_true")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        _child(args)
        return
    print(f"# cpus {os.cpu_count()}, load average {os.getloadavg()[0]:.1f}")
    if not args.skip_dedup:
        bench_dedup(args)
    if args.scorers:
        bench_scorers(args)


if __name__ == "__main__":
    main()
