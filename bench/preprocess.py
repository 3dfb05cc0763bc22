"""Preprocessing throughput vs the bare tokenizer's batch encode (the ceiling), side by side.

For each tokenizer, on the same corpus and the same worker count, it measures:

- ceiling: the tokenizer library's own batch call on texts already in memory, with W threads
  (tiktoken ``encode_ordinary_batch(num_threads=W)``; HF ``tokenizers.encode_batch`` with
  ``RAYON_NUM_THREADS=W``): no JSON, no I/O, no packing;
- encode_batch (HF only): ``tokenizers.Tokenizer.encode_batch``, the Rust batch encode with
  character offsets, on the same in-memory texts and ``RAYON_NUM_THREADS=W``; the ceiling above
  is its offset-free twin ``encode_batch_fast`` (what our workers call), so this column shows
  what the offsets cost;
- loop: a plain per-document loop of the bare tokenizer (tiktoken ``encode_ordinary``; HF
  ``Tokenizer.encode``) over texts already in memory, split over W forked processes (process
  start-up included). On short documents this beats the batch call (tiktoken's thread pool
  costs more than it saves), so ours is compared with the *stronger* of the two;
- parsed: the per-document work no preprocessor can skip, and nothing else: raw JSONL lines
  already in memory -> UTF-8 decode + JSON parse -> the strongest per-process encode -> ids in
  the shard dtype, over W forked processes; ours ÷ parsed is what reading, IPC, start-up and
  the writer cost, and ours ÷ best what the JSON/ids work costs on top;
- ours: ``run_preprocess`` end to end (read JSONL, parse, tokenize in W workers, write shards);
- megatron-lm style: Megatron-LM's preprocess_data.py structure (``Pool.imap`` of one document
  per task, chunksize 32, per-document encode, ``IndexedDatasetBuilder.add_document``), for context.

Each is the best of ``--repeats`` runs, interleaved, because the machine is shared.

    python bench/preprocess.py --workers 2 --mb 16
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from itertools import chain
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


def cpu_seconds() -> float:
    """CPU time of this process (all threads) plus its reaped children (pool workers)."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def measured(fn, *args) -> tuple[int, float, float]:
    """(tokens, wall seconds, CPU seconds) of one run (or what a run that times itself says)."""
    wall, cpu = time.perf_counter(), cpu_seconds()
    tokens = fn(*args)
    if isinstance(tokens, tuple):
        return tokens
    return tokens, time.perf_counter() - wall, cpu_seconds() - cpu


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


def ceiling(tokenizer, texts: list[str], workers: int) -> int:
    if tokenizer.name == "Llama3Tokenizer":
        ids = tokenizer.model.encode_ordinary_batch(texts, num_threads=workers)
    else:
        os.environ["TOKENIZERS_PARALLELISM"] = "true"
        backend = tokenizer.backend
        encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
        ids = [e.ids for e in encode(texts, add_special_tokens=False)]
    return sum(map(len, ids))


def rust_encode_batch(tokenizer, texts: list[str], workers: int) -> int | None:
    """``tokenizers.Tokenizer.encode_batch`` (offsets included); None for non-HF tokenizers."""
    if tokenizer.name != "HuggingFaceTokenizer":
        return None
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    return sum(len(e.ids) for e in tokenizer.backend.encode_batch(texts, add_special_tokens=False))


_LOOP: tuple | None = None  # (tokenizer, texts), set before forking so workers inherit it


def _loop_slice(bounds: tuple[int, int]) -> int:
    tokenizer, texts = _LOOP
    lo, hi = bounds
    if tokenizer.name == "Llama3Tokenizer":
        encode = tokenizer.model.encode_ordinary
        return sum(len(encode(t)) for t in texts[lo:hi])
    backend = tokenizer.backend
    return sum(len(backend.encode(t, add_special_tokens=False).ids) for t in texts[lo:hi])


def bare_loop(tokenizer, texts: list[str], workers: int) -> int:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    return _split_over_forks(_loop_slice, tokenizer, texts, workers)


def _split_over_forks(fn, tokenizer, items: list, workers: int) -> int:
    """``sum(fn(slice))`` over ``workers`` forked processes, each given an equal slice of
    ``items`` (inherited through the fork, not pickled)."""
    import multiprocessing as mp

    global _LOOP
    _LOOP = (tokenizer, items)
    n = len(items)
    bounds = [(n * w // workers, n * (w + 1) // workers) for w in range(workers)]
    try:
        with mp.get_context("fork").Pool(workers) as pool:
            return sum(pool.map(fn, bounds))
    finally:
        _LOOP = None


def _parsed_slice(bounds: tuple[int, int]) -> int:
    import numpy as np

    from megatron_cpt.data.indexed import token_dtype
    from megatron_cpt.data.preprocess import _one_tokenizer_thread

    _one_tokenizer_thread(rayon_allowed="TOKENIZERS_PARALLELISM" not in os.environ)
    tokenizer, lines = _LOOP
    dtype = token_dtype(tokenizer.vocab_size)
    texts = [json.loads(raw.decode("utf-8"))["text"] for raw in lines[bounds[0] : bounds[1]]]
    if tokenizer.name == "Llama3Tokenizer":
        encode = tokenizer.model.encode_ordinary
        ids = [encode(t) for t in texts]
    else:
        batch = tokenizer.backend.encode_batch_fast(texts, add_special_tokens=False)
        ids = [e.ids for e in batch]
    flat = np.fromiter(chain.from_iterable(ids), dtype, count=sum(map(len, ids)))
    return len(flat)


def parsed_loop(tokenizer, lines: list[bytes], workers: int) -> int:
    """The per-document work a preprocessor cannot skip, and nothing else: raw JSONL lines
    (already in memory) -> UTF-8 decode + JSON parse -> the strongest per-process encode
    (tiktoken: per-document loop; HF: one batch call on one thread) -> ids in the shard dtype,
    split over W forked processes. Ours ÷ this is what reading, IPC, start-up and the writer cost."""
    return _split_over_forks(_parsed_slice, tokenizer, lines, workers)


CHUNK_BYTES = PreprocessConfig.chunk_bytes


def ours(tokenizer, corpus: Path, workers: int, out_dir: Path) -> int:
    config = PreprocessConfig(
        chunk_bytes=CHUNK_BYTES,
        inputs=[str(corpus)],
        output_prefix=str(out_dir / "ours"),
        tokenizer_type=tokenizer.name,
        tokenizer_model="",
        workers=workers,
        log_interval=0,
    )
    return run_preprocess(config, tokenizer=tokenizer)["tokens"]


#: runs whose workers are forked, measured in a fresh interpreter (see in_fresh_process)
FRESH = ("parsed", "ours")


def in_fresh_process(key: str, name: str, model: str, corpus: Path, workers: int, out: Path):
    """(tokens, wall, CPU) of ``RUNS[key]`` run by a fresh interpreter, as a real
    ``tools/preprocess_data.py`` run is: the ceiling runs started HF ``tokenizers``' rayon pool
    in this process, and a worker forked from here must stay on the slower serial path
    (``megatron_cpt.data.preprocess._one_tokenizer_thread``). Timed inside the child from after
    the tokenizer is built and the data is in place; CPU = the child and its workers."""
    import subprocess

    cmd = [sys.executable, __file__, "--child", key, "--tokenizers", name, "--model", model]
    cmd += ["--corpus", str(corpus), _WORKERS_FLAG, str(workers), "--out", str(out)]
    cmd += ["--chunk-bytes", str(CHUNK_BYTES)]
    env = {k: v for k, v in os.environ.items() if k not in ("TOKENIZERS_PARALLELISM",)}
    env["RAYON_NUM_THREADS"] = "1"  # only the forked workers tokenize; one thread each
    out_text = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    return tuple(json.loads(out_text.strip().splitlines()[-1]))


def _child(args) -> None:
    tokenizer = build_tokenizer(args.tokenizers[0], args.model)
    corpus = Path(args.corpus)
    if args.child == "parsed":
        data, extra = [x for x in corpus.read_bytes().splitlines() if x.strip()], ()
    else:
        data, extra = corpus, (Path(args.out),)
    print(json.dumps(measured(RUNS[args.child], tokenizer, data, args.workers, *extra)))


# --- Megatron-LM's structure (tools/preprocess_data.py), reduced to what costs time ----------
_ML_TOKENIZER = None


def _ml_init(tokenizer):
    global _ML_TOKENIZER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _ML_TOKENIZER = tokenizer


def _ml_encode(line: bytes):
    ids = _ML_TOKENIZER.encode(json.loads(line)["text"])
    return ids, len(line)


def megatron_lm_style(tokenizer, corpus: Path, workers: int, out_dir: Path) -> int:
    import multiprocessing as mp

    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from megatron_cpt.data.indexed import token_dtype

    builder = IndexedDatasetBuilder(
        str(out_dir / "ml.bin"), dtype=token_dtype(tokenizer.vocab_size)
    )
    tokens = 0
    ctx = mp.get_context("fork")
    with open(corpus, "rb") as fin, ctx.Pool(workers, _ml_init, (tokenizer,)) as pool:
        for ids, _ in pool.imap(_ml_encode, fin, 32):
            builder.add_document(torch.tensor(ids, dtype=torch.int64), [len(ids)])
            tokens += len(ids)
        pool.close()
        pool.join()
    builder.finalize(str(out_dir / "ml.idx"))
    return tokens


RUNS = {
    "ceiling": ceiling,
    "encode_batch": rust_encode_batch,
    "loop": bare_loop,
    "parsed": parsed_loop,
    "ours": ours,
    "mlm": megatron_lm_style,
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(_WORKERS_FLAG, type=int, default=2)
    p.add_argument("--mb", type=float, default=16.0, help="corpus size in MB (real text, repeated)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tokenizers", nargs="+", default=["Llama3Tokenizer", "HuggingFaceTokenizer"])
    p.add_argument("--no-megatron-lm", action="store_true", help="skip the Megatron-LM-style run")
    p.add_argument(
        "--chunk-bytes", type=int, default=PreprocessConfig.chunk_bytes, help="raw bytes per task"
    )
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--corpus", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        globals()["CHUNK_BYTES"] = args.chunk_bytes
        _child(args)
        return
    globals()["CHUNK_BYTES"] = args.chunk_bytes
    models = {
        "Llama3Tokenizer": assets.llama3_tokenizer_model,
        "HuggingFaceTokenizer": assets.smollm2_gguf,
    }
    cols = ["ceiling", "encode_batch", "loop", "parsed", "ours"] + (
        [] if args.no_megatron_lm else ["mlm"]
    )
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        corpus = tmp / "corpus.jsonl"
        texts = build_corpus(corpus, args.mb)
        raw_lines = [line for line in corpus.read_bytes().splitlines() if line.strip()]
        mb = corpus.stat().st_size / 1e6
        print(
            f"corpus: {len(texts)} documents, {mb:.1f} MB; workers={args.workers}; "
            f"chunk_bytes={args.chunk_bytes}; best of {args.repeats}"
        )
        print(
            "tok/s: tokens per wall second; tok/cpu-s: tokens per CPU second of this process and "
            "its workers (the fair figure when other jobs share the cores)"
        )
        width = {c: max(14, len(c) + 8) for c in cols}  # "encode_batch tok/s" is wider
        header = f"{'tokenizer':<21}" + "".join(
            f"{c + ' tok/s':>{width[c]}}{c + ' tok/cpu-s':>{width[c] + 4}}" for c in cols
        )
        header += f"{'ratio':>7}{'ratio cpu':>10}{'vs best':>9}{'vs best cpu':>12}"
        header += f"{'vs parsed':>11}{'vs parsed cpu':>14}"
        if not args.no_megatron_lm:
            header += f"{'ours/mlm':>9}{'ours/mlm cpu':>13}"
        print(header)
        for name in args.tokenizers:
            tokenizer = build_tokenizer(name, models[name]())
            best = {c: [0.0, 0.0] for c in cols}  # [tokens per wall s, tokens per CPU s]
            counts: dict[str, int] = {}
            for _ in range(args.repeats):
                for key in cols:
                    in_memory = key in ("ceiling", "encode_batch", "loop", "parsed")
                    data = raw_lines if key == "parsed" else texts if in_memory else corpus
                    extra = () if in_memory else (tmp,)
                    if key in FRESH:
                        n, wall, cpu = in_fresh_process(
                            key, name, str(models[name]()), corpus, args.workers, tmp
                        )
                    else:
                        n, wall, cpu = measured(RUNS[key], tokenizer, data, args.workers, *extra)
                    if n is None:  # not applicable to this tokenizer
                        continue
                    if counts.setdefault(key, n) != n:
                        raise SystemExit(f"{key}: token count changed between runs")
                    best[key] = [max(best[key][0], n / wall), max(best[key][1], n / cpu)]
            if (
                len(
                    {
                        counts[k]
                        for k in ("ours", "ceiling", "loop", "parsed", "encode_batch")
                        if k in counts
                    }
                )
                > 1
            ):
                raise SystemExit(f"{name}: token counts differ: {counts}")
            line = f"{name:<21}" + "".join(
                f"{best[c][0]:>{width[c]},.0f}{best[c][1]:>{width[c] + 4},.0f}"
                if c in counts
                else f"{'-':>{width[c]}}{'-':>{width[c] + 4}}"
                for c in cols
            )
            line += f"{best['ours'][0] / best['ceiling'][0]:>7.2f}{best['ours'][1] / best['ceiling'][1]:>10.2f}"
            # against the strongest bare rate (batch call or plain loop, whichever is faster)
            top = [max(best["ceiling"][i], best["loop"][i]) for i in (0, 1)]
            line += f"{best['ours'][0] / top[0]:>9.2f}{best['ours'][1] / top[1]:>12.2f}"
            # against the same per-document work without our reading/IPC/start-up/writer
            parsed = best["parsed"]
            line += f"{best['ours'][0] / parsed[0]:>11.2f}{best['ours'][1] / parsed[1]:>14.2f}"
            if not args.no_megatron_lm:
                line += f"{best['ours'][0] / best['mlm'][0]:>9.2f}{best['ours'][1] / best['mlm'][1]:>13.2f}"
            print(line, flush=True)


if __name__ == "__main__":
    main()
