"""``--output-prefix``: the selection written straight to shards equals tokenizing the selected
JSONL (through tools/preprocess_data.py's library and megatron-core's own IndexedDataset)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from megatron_cpt.data.jsonl import read_texts
from megatron_cpt.data.preprocess import PreprocessConfig, run_preprocess
from megatron_cpt.selection.pipeline import SelectionConfig, run_selection
from megatron_cpt.selection.sampling import Budget
from megatron_cpt.selection.to_shards import ShardOutputConfig
from megatron_cpt.tokenizers import build_tokenizer

REPO = Path(__file__).resolve().parent.parent


def test_selected_shards_equal_preprocessing_the_selected_jsonl(
    shared_data, llama3_tokenizer_model, tmp_path
):
    inputs = tuple(str(p) for p in sorted((shared_data / "domain").glob("*.jsonl")))
    shards = ShardOutputConfig(
        output_prefix=str(tmp_path / "shards" / "sel"),
        tokenizer_type="Llama3Tokenizer",
        tokenizer_model=str(llama3_tokenizer_model),
        append_eod=True,
        workers=2,
        chunk_bytes=4096,  # many chunks, crossing both input files
    )
    summary = run_selection(
        SelectionConfig(
            inputs=inputs,
            output=str(tmp_path / "sel.jsonl"),
            budget=Budget("fraction", 0.3),
            metrics=("random",),
            seed=3,
            cache_dir=str(tmp_path / "cache"),
            progress=False,
            shards=shards,
        )
    )
    out = summary["outputs"]["shards"]
    assert out["prefix"] == str(tmp_path / "shards" / "sel_text_document")
    selected = [t for _, t in read_texts(str(tmp_path / "sel.jsonl"))]
    assert out["documents"] == len(selected) == summary["counts"]["selected"] > 100
    # both input files contribute (the chunks keep each file's own line numbers)
    sources = {json.loads(x)["file"] for x in open(tmp_path / "sel.scores.jsonl")}
    assert len(sources) == 2

    reference = run_preprocess(
        PreprocessConfig(
            inputs=[str(tmp_path / "sel.jsonl")],
            output_prefix=str(tmp_path / "ref" / "sel"),
            tokenizer_type="Llama3Tokenizer",
            tokenizer_model=str(llama3_tokenizer_model),
            append_eod=True,
            log_interval=0,
        )
    )["outputs"]["text"]
    for ext in ("bin", "idx"):
        assert Path(out[ext]).read_bytes() == Path(reference[ext]).read_bytes()

    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(out["prefix"])
    tokenizer = build_tokenizer("Llama3Tokenizer", str(llama3_tokenizer_model))
    assert len(dataset) == len(selected)
    for i, text in enumerate(selected):
        expected = np.array(tokenizer.encode(text) + [tokenizer.eod])
        assert np.array_equal(dataset[i], expected), i
    assert out["tokens"] == sum(len(dataset[i]) for i in range(len(dataset)))


def test_output_prefix_needs_a_tokenizer(shared_data, tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "select_data.py"),
            "--input",
            str(shared_data / "domain" / "sec_agreements.jsonl"),
            "--metric",
            "random",
            "--documents",
            "3",
            "--output",
            str(tmp_path / "s.jsonl"),
            "--output-prefix",
            str(tmp_path / "s"),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: --output-prefix needs --tokenizer-type"
    assert not (tmp_path / "s.jsonl").exists()
