"""Preprocessing throughput vs the bare tokenizer's batch encode (the ceiling), side by side.

For each tokenizer, on the same corpus and the same worker count, it measures:

- ceiling: the tokenizer library's own batch call on texts already in memory, with W threads
  (tiktoken ``encode_ordinary_batch(num_threads=W)``; HF ``tokenizers.encode_batch`` with
  ``RAYON_NUM_THREADS=W``): no JSON, no I/O, no packing;
- ours: ``run_preprocess`` end to end (read JSONL, parse, tokenize in W workers, write shards);
- megatron-lm style: Megatron-LM's preprocess_data.py structure (``Pool.imap`` of one document
  per task, chunksize 32, per-document encode, ``IndexedDatasetBuilder.add_document``), for context.

Each is the best of ``--repeats`` runs, interleaved, because the machine is shared.

    python bench/preprocess.py --workers 2 --mb 8
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_WORKERS_FLAG = "--workers"


def _early_workers() -> int:
    # RAYON_NUM_THREADS must be set before HF tokenizers starts its thread pool.
    if _WORKERS_FLAG in sys.argv:
        return int(sys.argv[sys.argv.index(_WORKERS_FLAG) + 1])
    return 2


os.environ.setdefault("RAYON_NUM_THREADS", str(_early_workers()))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from megatron_cpt import assets  # noqa: E402
from megatron_cpt.data.preprocess import PreprocessConfig, run_preprocess  # noqa: E402
from megatron_cpt.tokenizers import build_tokenizer  # noqa: E402

SOURCES = ("domain/annual_reports.jsonl", "domain/sec_agreements.jsonl", "general/wikitext2.jsonl")


def build_corpus(target: Path, megabytes: float) -> list[str]:
    data = assets.shared_data_dir()
    if data is None:
        raise SystemExit("bench/preprocess.py needs ../shared/data (see its README)")
    lines = []
    for name in SOURCES:
        lines += [line for line in (data / name).read_bytes().splitlines() if line.strip()]
    out, size = [], 0
    while size < megabytes * 1e6:
        for line in lines:
            out.append(line)
            size += len(line) + 1
    target.write_bytes(b"\n".join(out) + b"\n")
    return [json.loads(line)["text"] for line in out]


def ceiling(tokenizer, texts: list[str], workers: int) -> tuple[int, float]:
    start = time.perf_counter()
    if tokenizer.name == "Llama3Tokenizer":
        ids = tokenizer.model.encode_ordinary_batch(texts, num_threads=workers)
    else:
        os.environ["TOKENIZERS_PARALLELISM"] = "true"
        backend = tokenizer.backend
        encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
        ids = [e.ids for e in encode(texts, add_special_tokens=False)]
    return sum(map(len, ids)), time.perf_counter() - start


def ours(tokenizer, corpus: Path, workers: int, out_dir: Path) -> tuple[int, float]:
    config = PreprocessConfig(
        inputs=[str(corpus)],
        output_prefix=str(out_dir / "ours"),
        tokenizer_type=tokenizer.name,
        tokenizer_model="",
        workers=workers,
        log_interval=0,
    )
    start = time.perf_counter()
    summary = run_preprocess(config, tokenizer=tokenizer)
    return summary["tokens"], time.perf_counter() - start


# --- Megatron-LM's structure (tools/preprocess_data.py), reduced to what costs time ----------
_ML_TOKENIZER = None


def _ml_init(tokenizer):
    global _ML_TOKENIZER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _ML_TOKENIZER = tokenizer


def _ml_encode(line: bytes):
    text = json.loads(line)["text"]
    ids = _ML_TOKENIZER.encode(text)
    return ids, len(line)


def megatron_lm_style(tokenizer, corpus: Path, workers: int, out_dir: Path) -> tuple[int, float]:
    import multiprocessing as mp

    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from megatron_cpt.data.indexed import token_dtype

    start = time.perf_counter()
    builder = IndexedDatasetBuilder(
        str(out_dir / "ml.bin"), dtype=token_dtype(tokenizer.vocab_size)
    )
    tokens = 0
    with (
        open(corpus, "rb") as fin,
        mp.get_context("fork").Pool(workers, _ml_init, (tokenizer,)) as pool,
    ):
        for ids, _ in pool.imap(_ml_encode, fin, 32):
            builder.add_document(torch.tensor(ids, dtype=torch.int64), [len(ids)])
            tokens += len(ids)
    builder.finalize(str(out_dir / "ml.idx"))
    return tokens, time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(_WORKERS_FLAG, type=int, default=2)
    p.add_argument("--mb", type=float, default=8.0, help="corpus size in MB (real text, repeated)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tokenizers", nargs="+", default=["Llama3Tokenizer", "HuggingFaceTokenizer"])
    p.add_argument("--no-megatron-lm", action="store_true", help="skip the Megatron-LM-style run")
    args = p.parse_args()
    models = {
        "Llama3Tokenizer": assets.llama3_tokenizer_model,
        "HuggingFaceTokenizer": assets.smollm2_gguf,
    }
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        corpus = tmp / "corpus.jsonl"
        texts = build_corpus(corpus, args.mb)
        mb = corpus.stat().st_size / 1e6
        print(
            f"corpus: {len(texts)} documents, {mb:.1f} MB; workers={args.workers}; best of {args.repeats}"
        )
        header = f"{'tokenizer':<22} {'ceiling tok/s':>14} {'ours tok/s':>12} {'ratio':>6}"
        if not args.no_megatron_lm:
            header += f" {'megatron-lm-style tok/s':>24} {'ours/mlm':>9}"
        print(header)
        for name in args.tokenizers:
            tokenizer = build_tokenizer(name, models[name]())
            best = {"ceiling": 0.0, "ours": 0.0, "mlm": 0.0}
            counts = {}
            for _ in range(args.repeats):
                runs = {"ceiling": (ceiling, texts), "ours": (ours, corpus)}
                if not args.no_megatron_lm:
                    runs["mlm"] = (megatron_lm_style, corpus)
                for key, (fn, data) in runs.items():
                    extra = () if fn is ceiling else (tmp,)
                    n, seconds = fn(tokenizer, data, args.workers, *extra)
                    counts.setdefault(key, n)
                    if counts[key] != n:
                        raise SystemExit(f"{key}: token count changed between runs")
                    best[key] = max(best[key], n / seconds)
            if counts["ours"] != counts["ceiling"]:
                raise SystemExit(
                    f"{name}: ours wrote {counts['ours']} tokens, ceiling {counts['ceiling']}"
                )
            line = f"{name:<22} {best['ceiling']:>14,.0f} {best['ours']:>12,.0f} {best['ours'] / best['ceiling']:>6.2f}"
            if not args.no_megatron_lm:
                line += f" {best['mlm']:>24,.0f} {best['ours'] / best['mlm']:>9.2f}"
            print(line, flush=True)


if __name__ == "__main__":
    main()
