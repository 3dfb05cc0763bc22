"""Staged (file-based, chunked, parallel) MinHash dedup: the same duplicates as the in-memory
datasketch index on ../shared/data, planted near-duplicates found, and memory bounded by the
chunk rather than by the corpus."""

from __future__ import annotations

import tracemalloc

import numpy as np

from megatron_cpt.data.jsonl import read_texts
from megatron_cpt.selection.dedup import DedupConfig, NearDuplicateFilter, shingles
from megatron_cpt.selection.staged_dedup import StagedDedupConfig, run_staged_dedup


def _in_memory(texts: list[str], config: DedupConfig) -> list[int]:
    dedup = NearDuplicateFilter(config)
    out = []
    for i, text in enumerate(texts):
        first = dedup.check(str(i), text)
        out.append(-1 if first is None else int(first))
    return out


def _domain_texts(shared_data) -> list[str]:
    return [
        t
        for path in sorted((shared_data / "domain").glob("*.jsonl"))
        for _, t in read_texts(str(path))
    ]


def test_staged_equals_in_memory_on_shared_data(shared_data, tmp_path):
    texts = _domain_texts(shared_data)
    config = DedupConfig()
    reference = _in_memory(texts, config)
    assert sum(d >= 0 for d in reference) == 276  # the documented count (272 exact + 4 near)
    # small chunks (11 chunks, 11 partitions) and 2 worker processes
    staged = StagedDedupConfig(str(tmp_path / "work"), chunk_docs=100, workers=2)
    dup, stats = run_staged_dedup(iter(texts), config, staged)
    assert dup.tolist() == reference  # same duplicates, pointing at the same kept documents
    assert stats.chunks == 11 and stats.duplicates == 276
    # a lower threshold finds more, and still agrees
    loose = DedupConfig(threshold=0.5)
    dup, _ = run_staged_dedup(iter(texts), loose, StagedDedupConfig(str(tmp_path / "w2"), 300))
    assert dup.tolist() == _in_memory(texts, loose)


def _jaccard(a: str, b: str) -> float:
    x, y = shingles(a, 5), shingles(b, 5)
    return len(x & y) / len(x | y)


def test_staged_finds_planted_near_duplicates(shared_data, tmp_path):
    distinct: list[str] = []
    for _, text in read_texts(str(shared_data / "domain" / "annual_reports.jsonl")):
        if len(text.split()) >= 120 and all(_jaccard(text, t) < 0.5 for t in distinct):
            distinct.append(text)
        if len(distinct) == 30:
            break
    rng = np.random.default_rng(0)
    planted = []
    for src in (0, 3, 7, 12, 20, 29):
        words = distinct[src].split(" ")
        for pos in rng.choice(len(words), size=2, replace=False):
            words[pos] = "REDACTED"
        edited = "  ".join(words)
        assert _jaccard(edited, distinct[src]) >= 0.85
        planted.append((edited, src))
    texts = distinct + [t for t, _ in planted]
    dup, _ = run_staged_dedup(
        iter(texts), DedupConfig(), StagedDedupConfig(str(tmp_path / "w"), chunk_docs=7)
    )
    assert dup[: len(distinct)].tolist() == [-1] * len(distinct)
    assert dup[len(distinct) :].tolist() == [src for _, src in planted]


def _synthetic(n: int, seed: int) -> list[str]:
    """Random 60-word documents, every 10th a copy of an earlier one with its last word changed."""
    rng = np.random.default_rng(seed)
    vocab = [f"w{k}" for k in range(5000)]
    docs: list[str] = []
    for i in range(n):
        if i % 10 == 9:
            words = docs[int(rng.integers(0, i))].split()
            words[-1] = "changed"  # one shingle of 56 differs: Jaccard 55/57
            docs.append(" ".join(words))
        else:
            docs.append(" ".join(rng.choice(vocab, size=60)))
    return docs


def _peak(fn) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_staged_memory_is_bounded_by_the_chunk_not_the_corpus(tmp_path):
    config = DedupConfig()
    chunk = 50
    peaks, held = {}, {}
    for n in (200, 800):
        texts = _synthetic(n, seed=n)

        def staged(texts=texts, n=n):
            staged_cfg = StagedDedupConfig(str(tmp_path / f"w{n}"), chunk_docs=chunk)
            dup, stats = run_staged_dedup(iter(texts), config, staged_cfg)
            held[n] = (dup, stats)

        # the generator hands over one text at a time; the list itself is not traced
        peaks[("staged", n)] = _peak(staged)
        peaks[("memory", n)] = _peak(lambda texts=texts: _in_memory(texts, config))
        dup, stats = held[n]
        assert dup.tolist() == _in_memory(texts, config)
        assert stats.duplicates == n // 10  # the planted copies are found
        assert stats.max_docs_in_chunk == chunk
        # one partition holds about one chunk's band rows (9 bands), not the corpus's
        assert stats.max_rows_in_partition < 2 * chunk * 9
    # the whole-corpus index grows with the corpus (4x the documents, > 2.5x the peak) ...
    assert peaks[("memory", 800)] > 2.5 * peaks[("memory", 200)]
    # ... the staged one does not (its O(N) state is 9 bytes per document: the answer + a flag)
    assert peaks[("staged", 800)] < 1.3 * peaks[("staged", 200)]
