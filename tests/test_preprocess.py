"""Shards read back through megatron-core's IndexedDataset equal the tokenizer's own encoding."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from test_tokenizers import EDGE_TEXTS, train_sentencepiece

from megatron_cpt.data.indexed import IndexedWriter, token_dtype
from megatron_cpt.data.preprocess import PreprocessConfig, output_prefixes, run_preprocess
from megatron_cpt.data.sentences import SentenceSplitter, SentenceSplitterConfig
from megatron_cpt.tokenizers import build_tokenizer

REPO = Path(__file__).resolve().parent.parent
REAL_FILES = (
    "domain/annual_reports.jsonl",
    "domain/sec_agreements.jsonl",
    "general/wikitext2.jsonl",
)


def indexed_dataset(prefix: str):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    return IndexedDataset(prefix)


def shard_documents(prefix: str) -> list[list[list[int]]]:
    """Every document as its list of sequences, read by megatron-core."""
    ds = indexed_dataset(prefix)
    docs = ds.document_indices
    return [[ds[j].tolist() for j in range(docs[i], docs[i + 1])] for i in range(len(docs) - 1)]


def expected_documents(tokenizer, texts, *, append_eod, splitter=None):
    """What the shard must hold: non-empty docs, each sentence/document encoded on its own."""
    out = []
    for text in texts:
        if not text or text.isspace():
            continue
        pieces = splitter.split(text) if splitter else [text]
        seqs = [ids for ids in (tokenizer.encode(p) for p in pieces) if ids]
        if not seqs:
            continue
        if append_eod:
            seqs[-1] = seqs[-1] + [tokenizer.eod]
        out.append(seqs)
    return out


def read_jsonl_texts(paths, key="text"):
    texts = []
    for path in paths:
        with open(path, encoding="utf-8") as fh:
            texts += [json.loads(line)[key] for line in fh if line.strip()]
    return texts


def write_jsonl(path: Path, records, compress=None) -> Path:
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()
    if compress == "gz":
        data = gzip.compress(data)
    elif compress == "zst":
        import zstandard

        data = zstandard.ZstdCompressor().compress(data)
    path.write_bytes(data)
    return path


def preprocess(tmp_path, inputs, tokenizer, name="out", **overrides) -> tuple[dict, str]:
    config = PreprocessConfig(
        inputs=[str(p) for p in inputs],
        output_prefix=str(tmp_path / name),
        tokenizer_type=tokenizer.name,
        tokenizer_model="",
        log_interval=0,
        **overrides,
    )
    summary = run_preprocess(config, tokenizer=tokenizer)
    return summary, output_prefixes(config)[config.json_keys[0]]


@pytest.fixture(scope="module")
def llama3(llama3_tokenizer_model):
    return build_tokenizer("Llama3Tokenizer", llama3_tokenizer_model)


@pytest.fixture(scope="module")
def hf(smollm2_gguf):
    return build_tokenizer("HuggingFaceTokenizer", smollm2_gguf)


@pytest.fixture(scope="module")
def sp(shared_data, tmp_path_factory):
    texts = read_jsonl_texts([shared_data / f for f in REAL_FILES])
    path = train_sentencepiece(texts, tmp_path_factory.mktemp("sp") / "sp.model")
    return build_tokenizer("SentencePieceTokenizer", path)


@pytest.fixture(scope="module")
def real_inputs(shared_data, tmp_path_factory) -> list[Path]:
    """Byte-exact leading slices of each real file (~1 MB in all, to keep the suite quick)."""
    out = tmp_path_factory.mktemp("real")
    paths = []
    for name, lines in zip(REAL_FILES, (300, 201, 15)):
        with open(shared_data / name, "rb") as fh:
            head = b"".join(fh.readline() for _ in range(lines))
        paths.append(out / Path(name).name)
        paths[-1].write_bytes(head)
    return paths


@pytest.fixture(params=["llama3", "hf", "sp"])
def tokenizer(request):
    return request.getfixturevalue(request.param)


def test_real_data_every_tokenizer_1_and_2_workers_identical(tmp_path, real_inputs, tokenizer):
    inputs = real_inputs
    texts = read_jsonl_texts(inputs)
    # Small chunks so 2 workers really interleave many tasks.
    one, prefix1 = preprocess(
        tmp_path, inputs, tokenizer, "w1", append_eod=True, chunk_bytes=64 << 10
    )
    two, prefix2 = preprocess(
        tmp_path, inputs, tokenizer, "w2", append_eod=True, chunk_bytes=64 << 10, workers=2
    )
    expected = expected_documents(tokenizer, texts, append_eod=True)
    assert shard_documents(prefix1) == expected
    for ext in (".bin", ".idx"):
        assert Path(prefix1 + ext).read_bytes() == Path(prefix2 + ext).read_bytes()
    assert one["documents"] == two["documents"] == len(expected)
    assert one["tokens"] == sum(len(d[0]) for d in expected)
    ds = indexed_dataset(prefix1)
    assert ds.index.dtype == token_dtype(tokenizer.vocab_size)
    assert (ds.index.dtype == np.uint16) == (tokenizer.vocab_size < 65500)


def edge_records():
    long_doc = " ".join(f"word{i} 😀 日本" for i in range(60_000))  # ~600k chars, > tiktoken chunk
    texts = EDGE_TEXTS + ["", "   \n\t ", long_doc, "x", "\u0301", "a" * 30_000]
    return [{"id": i, "text": t, "meta": {"n": i}} for i, t in enumerate(texts)]


@pytest.mark.parametrize("compress", [None, "gz", "zst"])
def test_edge_cases_and_compressed_inputs(tmp_path, llama3, compress):
    records = edge_records()
    path = write_jsonl(
        tmp_path / f"edge.jsonl{'.' + compress if compress else ''}", records, compress
    )
    summary, prefix = preprocess(
        tmp_path, [path], llama3, append_eod=False, workers=2, chunk_bytes=4096
    )
    expected = expected_documents(llama3, [r["text"] for r in records], append_eod=False)
    assert shard_documents(prefix) == expected
    assert summary["skipped"] == {"empty_document": 2}
    assert summary["documents"] == len(records) - 2


def test_edge_cases_hf_and_sentencepiece(tmp_path, hf, sp):
    records = edge_records()
    path = write_jsonl(tmp_path / "edge.jsonl", records)
    for tok in (hf, sp):
        _, prefix = preprocess(tmp_path, [path], tok, name=tok.name, append_eod=True)
        expected = expected_documents(tok, [r["text"] for r in records], append_eod=True)
        assert shard_documents(prefix) == expected


def test_globs_multiple_files_and_keys_keep_input_order(tmp_path, llama3):
    for i in range(3):
        write_jsonl(
            tmp_path / f"part{i}.jsonl",
            [
                {"text": f"file {i} doc {j}. Second sentence.", "title": f"T{i}.{j}"}
                for j in range(5)
            ],
        )
    extra = write_jsonl(tmp_path / "extra.jsonl.gz", [{"text": "gz doc", "title": "gz"}], "gz")
    config = PreprocessConfig(
        inputs=[str(tmp_path / "part*.jsonl"), str(extra)],
        output_prefix=str(tmp_path / "multi"),
        tokenizer_type="Llama3Tokenizer",
        tokenizer_model="",
        json_keys=("text", "title"),
        append_eod=True,
        log_interval=0,
    )
    summary = run_preprocess(config, tokenizer=llama3)
    prefixes = output_prefixes(config)
    assert prefixes == {
        "text": str(tmp_path / "multi_text_document"),
        "title": str(tmp_path / "multi_title_document"),
    }
    for key in ("text", "title"):
        texts = [
            f"file {i} doc {j}. Second sentence." if key == "text" else f"T{i}.{j}"
            for i in range(3)
            for j in range(5)
        ]
        texts.append("gz doc" if key == "text" else "gz")
        assert shard_documents(prefixes[key]) == expected_documents(llama3, texts, append_eod=True)
        assert summary["outputs"][key]["documents"] == 16


def test_sentence_mode_groups_sentences_by_document(tmp_path, real_inputs, llama3):
    inputs = real_inputs[1:]  # agreements + wikitext
    cfg = SentenceSplitterConfig(train_chars=100_000)
    one, prefix = preprocess(
        tmp_path, inputs, llama3, "s1", split_sentences=True, sentences=cfg, append_eod=True
    )
    _, prefix2 = preprocess(
        tmp_path,
        inputs,
        llama3,
        "s2",
        split_sentences=True,
        sentences=cfg,
        append_eod=True,
        workers=2,
        chunk_bytes=50_000,
    )
    assert prefix.endswith("_text_sentence")
    texts = read_jsonl_texts(inputs)
    splitter = SentenceSplitter.train(texts, cfg)
    expected = expected_documents(llama3, texts, append_eod=True, splitter=splitter)
    assert shard_documents(prefix) == expected
    assert sum(len(d) for d in expected) > 5 * len(expected)  # really split into sentences
    assert one["outputs"]["text"]["sequences"] == sum(len(d) for d in expected)
    for ext in (".bin", ".idx"):
        assert Path(prefix + ext).read_bytes() == Path(prefix2 + ext).read_bytes()


def test_writer_is_byte_identical_to_megatron_core_builder(tmp_path, shared_data, hf):
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    texts = read_jsonl_texts([shared_data / "domain/sec_agreements.jsonl"])[:60]
    splitter = SentenceSplitter.train(texts, SentenceSplitterConfig(train_chars=0))
    docs = expected_documents(hf, texts, append_eod=True, splitter=splitter)
    dtype = token_dtype(hf.vocab_size)
    builder = IndexedDatasetBuilder(str(tmp_path / "ref.bin"), dtype=dtype)
    with IndexedWriter(tmp_path / "ours", dtype) as ours:
        for seqs in docs:
            flat = [t for s in seqs for t in s]
            builder.add_document(torch.tensor(flat), [len(s) for s in seqs])
            ours.add_document(flat, [len(s) for s in seqs])
        ours.finalize()
    builder.finalize(str(tmp_path / "ref.idx"))
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"ours{ext}").read_bytes() == (tmp_path / f"ref{ext}").read_bytes()


def test_progress_and_summary(tmp_path, shared_data, llama3, capsys):
    import io

    stream = io.StringIO()
    inputs = [shared_data / "domain/sec_agreements.jsonl"]
    config = PreprocessConfig(
        inputs=[str(p) for p in inputs],
        output_prefix=str(tmp_path / "p"),
        tokenizer_type="Llama3Tokenizer",
        tokenizer_model="",
        log_interval=50,
        chunk_bytes=2000,
    )
    summary = run_preprocess(config, tokenizer=llama3, progress_stream=stream)
    lines = stream.getvalue().splitlines()
    n = len(read_jsonl_texts(inputs))
    assert len(lines) == n // 50
    assert all("docs/s" in ln and "tokens/s" in ln and "MB/s" in ln for ln in lines)
    assert summary["documents"] == n
    assert summary["input_bytes"] == sum(
        len(raw) for raw in inputs[0].read_bytes().splitlines(keepends=True)
    )
    assert set(summary["outputs"]["text"]) >= {"bin", "idx", "documents", "tokens"}


def test_existing_dir_or_new_dir_for_outputs(tmp_path, llama3):
    src = write_jsonl(tmp_path / "a.jsonl", [{"text": "hello"}])
    _, prefix = preprocess(tmp_path / "new" / "nested", [src], llama3)
    assert Path(prefix + ".bin").exists()
    shutil.rmtree(tmp_path / "new")


def test_blank_lines_crlf_and_missing_final_newline(tmp_path, llama3):
    src = tmp_path / "raw.jsonl"
    src.write_bytes(b'{"text": "one"}\r\n\n   \n{"text": "two"}\n{"text": "three"}')
    for chunk_bytes in (1, 7, 1 << 20):  # blocks smaller than a line, and one block for all
        summary, prefix = preprocess(
            tmp_path, [src], llama3, f"c{chunk_bytes}", chunk_bytes=chunk_bytes
        )
        assert shard_documents(prefix) == expected_documents(
            llama3, ["one", "two", "three"], append_eod=False
        )
        assert summary["input_bytes"] == src.stat().st_size
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "one"}\n\n{"text": 3}')
    with pytest.raises(Exception, match=f"{bad}:3: key 'text' is int"):
        preprocess(tmp_path, [bad], llama3, "bad", chunk_bytes=5)


def test_sentence_splitter_abbreviations_and_keep_newlines():
    text = "Apple Inc. reported revenue of $3.2 billion. Mr. Smith said U.S. sales rose.\n\nSee Note 5."
    plain = SentenceSplitter.train([], SentenceSplitterConfig(train_chars=0))
    assert plain.split(text) == [
        "Apple Inc. reported revenue of $3.2 billion.",
        "Mr. Smith said U.S. sales rose.",
        "See Note 5.",
    ]
    keep = SentenceSplitter.train([], SentenceSplitterConfig(train_chars=0, keep_newlines=True))
    assert "".join(keep.split(text)) == text
    assert keep.split(text)[1].endswith("rose.\n\n")
    bare = SentenceSplitter.train(
        [], SentenceSplitterConfig(train_chars=0, add_common_abbreviations=False)
    )
    assert "Apple Inc." in bare.split(text)  # untrained punkt splits after every abbreviation


def test_token_dtype_follows_megatron_rule():
    from megatron.core.datasets.indexed_dataset import DType

    for vocab in (1000, 49152, 65499, 65500, 128256):
        assert token_dtype(vocab) == DType.optimal_dtype(vocab)


def test_chunk_encoder_survives_pickling_for_spawned_workers(tmp_path, hf, sp, llama3):
    """Under spawn/forkserver the encoder is pickled to each worker: results must not change."""
    import pickle

    from megatron_cpt.data.preprocess import ChunkEncoder, iter_chunks

    src = write_jsonl(
        tmp_path / "e.jsonl", edge_records()[:12] + [{"text": "Mr. Smith left. He came back."}]
    )
    splitter = SentenceSplitter.train([], SentenceSplitterConfig(train_chars=0))
    for tok in (llama3, hf, sp):
        encoder = ChunkEncoder(
            tok,
            ("text",),
            token_dtype(tok.vocab_size),
            append_eod=True,
            skip_bad_lines=False,
            splitter=splitter,
        )
        clone = pickle.loads(pickle.dumps(encoder))
        for chunk in iter_chunks([src], 200):
            a, b = encoder(chunk), clone(chunk)
            assert a.skipped == b.skipped
            assert [k.tokens.tobytes() for k in a.keys] == [k.tokens.tobytes() for k in b.keys]
            assert [k.sequence_lengths.tolist() for k in a.keys] == [
                k.sequence_lengths.tolist() for k in b.keys
            ]


def test_small_inputs_are_cut_into_at_least_8_tasks_per_worker(tmp_path):
    """--chunk-bytes is an upper bound: a 4 MB input on 2 workers is 16 tasks, not 4 (the run
    would otherwise end on one busy worker); an explicit smaller value and 1 worker are kept."""
    from megatron_cpt.data.preprocess import MIN_TASK_BYTES, PreprocessConfig, task_bytes

    big = tmp_path / "big.jsonl"
    big.write_bytes(b"x" * (4 << 20))
    tiny = tmp_path / "tiny.jsonl"
    tiny.write_bytes(b"x" * 1000)

    def config(workers, chunk_bytes=1 << 20):
        return PreprocessConfig([], "", "", "", workers=workers, chunk_bytes=chunk_bytes)

    assert task_bytes(config(2), [big]) == (4 << 20) // 16
    assert task_bytes(config(1), [big]) == 1 << 20
    assert task_bytes(config(2, chunk_bytes=4096), [big]) == 4096
    assert task_bytes(config(2), [tiny]) == MIN_TASK_BYTES
    assert task_bytes(config(2), [big, big, big, big, big]) == 1 << 20


_RAYON_SCRIPT = r"""
import json, os, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from megatron_cpt.data.jsonl import read_texts
from megatron_cpt.data.preprocess import map_ordered
from megatron_cpt.tokenizers import build_tokenizer

tok = build_tokenizer("HuggingFaceTokenizer", sys.argv[2])
texts = [t for _, t in read_texts(sys.argv[3])][:60]

def encode(part):  # runs in a worker: what it tokenized with, and the ids
    ids = tok.encode_batch(part)
    threads = len(os.listdir("/proc/self/task"))
    return os.environ.get("TOKENIZERS_PARALLELISM"), os.environ.get("RAYON_NUM_THREADS"), threads, ids

parts = [texts[i : i + 20] for i in range(0, len(texts), 20)]
clean = list(map_ordered(encode, parts, workers=2))
tok.backend.encode_batch_fast(texts)  # the parent now runs rayon's pool (default threads)
after = list(map_ordered(encode, parts, workers=2))
print(json.dumps({"clean": clean, "after": after, "serial": tok.encode_batch(texts)}))
"""


def test_hf_workers_use_a_one_thread_rayon_pool_only_where_it_is_safe(
    smollm2_gguf, shared_data, tmp_path
):
    """In a fresh process the workers take tokenizers' rayon path with one thread (1.11-1.28x
    the tokens per CPU-second of its serial path, bench/tokenizer_paths.py); once the parent
    has run rayon's pool, forked workers stay serial (a pool without threads would hang) -- and
    the ids are the same."""
    import subprocess

    env = {k: v for k, v in os.environ.items() if k not in ("TOKENIZERS_PARALLELISM",)}
    src = shared_data / "domain" / "annual_reports.jsonl"
    proc = subprocess.run(
        [sys.executable, "-c", _RAYON_SCRIPT, str(REPO), str(smollm2_gguf), str(src)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,  # a rayon pool inherited without threads would wait forever
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    ids = [x for part in out["clean"] for x in part[3]]
    assert ids == out["serial"] == [x for part in out["after"] for x in part[3]]
    for setting, threads, workers_threads, _ in out["clean"]:
        assert (setting, threads) == ("true", "1")
        assert workers_threads == 2  # the worker and one rayon thread
    for _, _, workers_threads, _ in out["after"]:
        assert workers_threads == 1  # serial: no rayon thread started in the child
