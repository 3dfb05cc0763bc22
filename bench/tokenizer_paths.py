"""The three tokenizer-path choices behind preprocessing, each side by side with its baseline.

1. Llama-3 ranks load (every Llama-3 job's start-up): ours (one read, ``binascii``, validated)
   vs the per-line ``base64.b64decode(validate=True)`` loader it replaced, and tiktoken's own
   ``load_tiktoken_bpe`` (no validation) for reference; equal dicts are checked.
2. HF ``tokenizers`` ``encode_batch_fast`` in a preprocessing worker: the serial path
   (``TOKENIZERS_PARALLELISM=false``, what workers used before) vs a one-thread rayon pool
   (``TOKENIZERS_PARALLELISM=true``, ``RAYON_NUM_THREADS=1``, what they use now). Each in its own
   fresh interpreter (rayon's pool is per process), interleaved; tokens per CPU-second.
3. Llama-3 ids into a flat array: ``encode_ordinary`` + ``np.fromiter`` vs ``encode_to_numpy``
   + ``np.concatenate`` (``Tokenizer.encode_batch_flat``); equal ids are checked.

Texts: real lines of ../shared/data (annual reports, SEC agreements, wikitext-2). Best of
``--repeats``; the machine is shared, so read the ratios.

    python bench/tokenizer_paths.py --docs 2400 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from itertools import chain
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SOURCES = ("domain/annual_reports.jsonl", "domain/sec_agreements.jsonl", "general/wikitext2.jsonl")


def texts(n: int) -> list[str]:
    from megatron_cpt import assets

    data = assets.shared_data_dir()
    if data is None:
        raise SystemExit("bench/tokenizer_paths.py needs ../shared/data (see its README)")
    out = [json.loads(x)["text"] for s in SOURCES for x in (data / s).read_text().splitlines() if x]
    return (out * (n // len(out) + 1))[:n]


def best(fn, repeats: int) -> float:
    """Smallest CPU seconds of ``repeats`` calls."""
    times = []
    for _ in range(repeats):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return min(times)


def ranks_load(repeats: int) -> None:
    from tiktoken.load import load_tiktoken_bpe

    from megatron_cpt import assets
    from megatron_cpt.tokenizers import _load_tiktoken_ranks

    def before(path: Path) -> dict[bytes, int]:
        """The loader this project had before (validated per line with base64's regex)."""
        import base64

        ranks = {}
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    token, rank = line.split()
                    ranks[base64.b64decode(token, validate=True)] = int(rank)
        return ranks

    path = Path(assets.llama3_tokenizer_model())
    assert _load_tiktoken_ranks(path) == load_tiktoken_bpe(str(path)) == before(path)
    ours = best(lambda: _load_tiktoken_ranks(path), repeats)
    old = best(lambda: before(path), repeats)
    theirs = best(lambda: load_tiktoken_bpe(str(path)), repeats)
    print(
        f"1. Llama-3 ranks load (CPU s): ours, validated {ours:.3f}; before, validated per line "
        f"{old:.3f} -> {old / ours:.2f}x; tiktoken's own loader, not validated {theirs:.3f}"
    )


_HF_CHILD = """
import json, os, sys, time
sys.path.insert(0, {repo!r})
from megatron_cpt.tokenizers import build_tokenizer
tok = build_tokenizer("HuggingFaceTokenizer", {model!r})
texts = json.load(open({texts!r}))
parts = [texts[i : i + 300] for i in range(0, len(texts), 300)]  # ~1 MiB-task-sized batches
best = None
for _ in range({repeats}):
    start = time.process_time()
    n = sum(len(e.ids) for p in parts for e in tok.backend.encode_batch_fast(p, add_special_tokens=False))
    spent = time.process_time() - start
    best = spent if best is None else min(best, spent)
print(json.dumps([n, best, len(os.listdir("/proc/self/task"))]))
"""


def hf_paths(sample: list[str], repeats: int, work: Path) -> None:
    from megatron_cpt import assets

    path = work / "texts.json"
    path.write_text(json.dumps(sample))
    code = _HF_CHILD.format(
        repo=str(REPO), model=str(assets.smollm2_gguf()), texts=str(path), repeats=repeats
    )
    settings = {
        "serial (TOKENIZERS_PARALLELISM=false)": {"TOKENIZERS_PARALLELISM": "false"},
        "rayon, 1 thread": {"TOKENIZERS_PARALLELISM": "true", "RAYON_NUM_THREADS": "1"},
    }
    found: dict[str, list] = {}
    for _ in range(2):  # interleaved, fresh interpreters
        for name, env in settings.items():
            full = {k: v for k, v in os.environ.items() if k not in ("RAYON_NUM_THREADS",)}
            full.update(env)
            out = subprocess.run(
                [sys.executable, "-c", code], env=full, capture_output=True, text=True, check=True
            ).stdout
            tokens, cpu, threads = json.loads(out.strip().splitlines()[-1])
            if name not in found or cpu < found[name][1]:
                found[name] = [tokens, cpu, threads]
    (serial, fast) = found.values()
    assert serial[0] == fast[0]
    print(f"2. HF encode_batch_fast, {serial[0]:,} tokens, one thread of work each:")
    for name, (tokens, cpu, threads) in found.items():
        print(f"     {name:<38} {tokens / cpu:>12,.0f} tok/CPU-s  ({threads} OS threads)")
    print(f"     rayon, 1 thread / serial: {serial[1] / fast[1]:.2f}x tokens per CPU-second")


def llama3_flat(sample: list[str], repeats: int) -> None:
    import numpy as np

    from megatron_cpt import assets
    from megatron_cpt.tokenizers import build_tokenizer

    tok = build_tokenizer("Llama3Tokenizer", assets.llama3_tokenizer_model())
    encode = tok.model.encode_ordinary

    def lists():
        ids = [encode(t) for t in sample]
        return np.fromiter(chain.from_iterable(ids), np.int32, count=sum(map(len, ids)))

    def buffers():
        return tok.encode_batch_flat(sample, np.int32)[0]

    assert np.array_equal(lists(), buffers())
    a, b = best(lists, repeats), best(buffers, repeats)
    n = len(buffers())
    print(
        f"3. Llama-3 ids -> flat int32, {n:,} tokens: encode_ordinary + np.fromiter {a:.3f} CPU-s, "
        f"encode_to_numpy + concatenate {b:.3f} CPU-s -> {a / b:.2f}x"
    )


def main() -> None:
    import tempfile

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--docs", type=int, default=2400, help="real documents per measurement")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    print(f"# cpus {os.cpu_count()}, load average {os.getloadavg()[0]:.1f}")
    sample = texts(args.docs)
    ranks_load(args.repeats)
    with tempfile.TemporaryDirectory() as work:
        hf_paths(sample, args.repeats, Path(work))
    llama3_flat(sample, args.repeats)


if __name__ == "__main__":
    main()
