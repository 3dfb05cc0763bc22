"""Near-duplicate removal in stages over files, with memory bounded by a chunk.

The in-memory :class:`~megatron_cpt.selection.dedup.NearDuplicateFilter` keeps every kept
document's MinHash (~1 KB) in a datasketch index, so 10M documents need ~10 GB. This module
computes *the same result* (same signatures, same LSH bands, same Jaccard confirmation, same
"first occurrence is kept" rule) in stages that each hold one chunk at a time and communicate
through files in a work directory, like datatrove's MinHash pipeline:

1. **signatures** (parallel, per slice of ~1,000 documents; filed per chunk): datasketch
   MinHash of the word shingles, written as ``sig-<chunk>.npy`` (``docs x num_perm`` uint64),
   plus one row per (document, band) -- a 64-bit hash of the band's hash values and of the
   whole signature -- split by :func:`partition_stage` into the bucket file of the partition
   ``band_key % partitions``.
2. **buckets -> candidate pairs** (parallel, per partition): sort the partition's rows by
   (band, key, document); within a bucket, each document is paired with every earlier *first
   member of a distinct signature* in that bucket (documents with identical signatures after
   the first are always duplicates, never kept, so they can never be the one a later document
   duplicates). Each pair is confirmed with the MinHash Jaccard estimate (signatures read
   from the chunk files) and the confirmed ones are written to the edge file of the later
   document's chunk.
3. **clusters** (sequential, chunk by chunk in corpus order): a document is a duplicate iff a
   confirmed pair links it to an earlier *kept* document; it points to the most similar one
   (ties: the earliest). This is exactly the streaming filter's decision, made from files. The
   only state carried across chunks is one byte per document (kept or not).
4. **filter**: ``duplicate_of`` per document (``-1`` = kept), returned to the pipeline.

Every stage function takes its own share (chunk or partition indices), so stages can run in
separate processes or on separate nodes over a shared work directory; :func:`run_staged_dedup`
runs them with a local process pool, which signs slices smaller than a chunk so that every
worker stays busy to the end of the stage. Band-key hashes are 64-bit, so a false bucket collision is
possible with probability ~2^-64 per pair, and would still have to pass the Jaccard check.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from datasketch import MinHash, MinHashLSH

from megatron_cpt.selection.dedup import DedupConfig, shingles

#: one row per (document, band) in a bucket file
BUCKET_ROW = np.dtype([("band", "<u2"), ("key", "<u8"), ("doc", "<i8"), ("sig", "<u8")])
#: one confirmed pair (later document, earlier document, Jaccard estimate)
EDGE_ROW = np.dtype([("doc", "<i8"), ("other", "<i8"), ("sim", "<f8")])


@dataclass(frozen=True)
class StagedDedupConfig:
    work_dir: str
    chunk_docs: int = 50_000  # documents per signature chunk = the memory bound of every stage
    workers: int = 1  # processes for the parallel stages (1: run in this process)

    def __post_init__(self) -> None:
        from megatron_cpt.errors import UserError

        if self.chunk_docs < 1:
            raise UserError(f"--dedup-chunk must be >= 1, got {self.chunk_docs}")
        if self.workers < 1:
            raise UserError(f"--dedup-workers must be >= 1, got {self.workers}")


@dataclass
class StageStats:
    """What each stage held at most (rows/documents), to show memory is bounded by a chunk."""

    documents: int = 0
    chunks: int = 0
    partitions: int = 0
    max_docs_in_chunk: int = 0
    max_rows_in_partition: int = 0
    max_edges_in_chunk: int = 0
    candidate_pairs: int = 0
    confirmed_pairs: int = 0
    duplicates: int = 0
    extra: dict = field(default_factory=dict)


def lsh_bands(config: DedupConfig) -> tuple[int, int]:
    """(bands, rows per band): datasketch's choice for the threshold, as the in-memory index."""
    return _lsh_bands(config.threshold, config.num_perm)


@functools.cache
def _lsh_bands(threshold: float, num_perm: int) -> tuple[int, int]:
    # MinHashLSH integrates the false-positive/negative curves to choose (b, r): ~25 ms, and
    # every signing task asks.
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    return lsh.b, lsh.r


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, elementwise (a bijection on 64 bits; uint64 arrays wrap)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _fold_hash(values: np.ndarray, salt: np.ndarray | int = 0) -> np.ndarray:
    """A 64-bit hash of each row of ``values[..., k]`` (uint64), folded over the last axis:
    ``h = mix(h ^ v)``, vectorised over every leading axis at once. Band keys and whole-
    signature keys of a whole slice of documents cost a few dozen numpy calls, not one
    Python-level digest per (document, band)."""
    h = np.broadcast_to(np.asarray(salt, np.uint64), values.shape[:-1]).copy()
    h = _mix64(h + np.uint64(0x9E3779B97F4A7C15))
    for k in range(values.shape[-1]):
        h = _mix64(h ^ values[..., k])
    return h


class _Signer:
    """MinHash exactly as :class:`NearDuplicateFilter` computes it (same seed, permutations)."""

    def __init__(self, config: DedupConfig):
        self.config = config
        self.template = MinHash(num_perm=config.num_perm, seed=config.seed)
        self.scheme = getattr(self.template, "scheme", None)

    def __call__(self, text: str) -> np.ndarray | None:
        grams = shingles(text, self.config.shingle_size)
        if not grams:
            return None
        mh = MinHash(
            num_perm=self.config.num_perm,
            seed=self.config.seed,
            permutations=self.template.permutations,
            **({"scheme": self.scheme} if self.scheme is not None else {}),
        )
        mh.update_batch(list(grams))
        return mh.hashvalues


def _chunk_name(work, kind: str, index: int, ext: str = "npy") -> str:
    return _file(work, f"{kind}-{index:06d}.{ext}")


def _file(work, name: str) -> str:
    # Strings, not pathlib: every Path built from a new name interns its parts for the life of
    # the process, and the stages create (chunks x partitions) files.
    return os.path.join(str(work), name)


def sign_texts(first_doc: int, texts: list[str], config: DedupConfig):
    """Stage 1 for one slice of consecutive documents: ``(signatures, band rows)``.

    ``signatures`` is ``len(texts) x num_perm`` uint64 (zero rows for documents without words,
    which are never candidates, as in the in-memory filter); ``band rows`` has one
    :data:`BUCKET_ROW` per (document with words, band), documents numbered from ``first_doc``.
    Pure: the caller files the result under its chunk (:func:`write_chunk`), so a pool can sign
    slices much smaller than a chunk and keep every worker busy to the end.
    """
    signer = _Signer(config)
    bands, rows = lsh_bands(config)
    sigs = np.zeros((len(texts), config.num_perm), dtype=np.uint64)
    present = np.zeros(len(texts), dtype=bool)
    for k, text in enumerate(texts):
        hv = signer(text)
        if hv is not None:
            sigs[k], present[k] = hv, True
    docs = np.flatnonzero(present)
    signed = sigs[docs]
    keys = _fold_hash(
        signed[:, : bands * rows].reshape(len(docs), bands, rows), np.arange(bands, dtype=np.uint64)
    )
    out = np.empty((len(docs), bands), dtype=BUCKET_ROW)
    out["band"] = np.arange(bands, dtype=np.uint16)
    out["key"] = keys
    out["doc"] = (first_doc + docs)[:, None]
    out["sig"] = _fold_hash(signed, np.uint64(bands))[:, None]
    return sigs, out.reshape(-1)


def write_chunk(work_dir: str, chunk: int, parts: list[tuple[np.ndarray, np.ndarray]]) -> int:
    """File one chunk's signed slices (in document order): ``sig-<chunk>.npy`` and its band
    rows (one bucket file per chunk here; :func:`partition_stage` splits it by key once the
    corpus size is known). Returns the chunk's document count."""
    sigs = [p[0] for p in parts]
    rows = [p[1] for p in parts]
    _save(_chunk_name(work_dir, "sig", chunk), np.concatenate(sigs) if sigs else np.zeros((0, 0)))
    _save_rows(
        _chunk_name(work_dir, "bands", chunk, "bin"),
        np.concatenate(rows) if rows else np.zeros(0, BUCKET_ROW),
    )
    return sum(len(s) for s in sigs)


def partition_stage(work_dir: str, chunk: int, partitions: int) -> None:
    """Stage 2 for one chunk: split its band rows into the key partitions' bucket files."""
    work = Path(work_dir)
    rows = np.fromfile(_chunk_name(work, "bands", chunk, "bin"), dtype=BUCKET_ROW)
    part = rows["key"] % np.uint64(partitions)
    for p in range(partitions):
        _save_rows(_file(work, f"bucket-p{p:05d}-c{chunk:06d}.bin"), rows[part == p])


class _Signatures:
    """Random access to any document's signature by reading its row from the chunk file.

    Plain reads, not memory maps: mapped pages count towards the process's resident memory
    until unmapped, and a partition's pairs touch rows all over the corpus.
    """

    def __init__(self, work: Path, chunk_docs: int):
        self.work, self.chunk_docs, self.files = work, chunk_docs, {}

    def __getitem__(self, doc: int) -> np.ndarray:
        c = doc // self.chunk_docs
        if c not in self.files:
            fh = open(_chunk_name(self.work, "sig", c), "rb", buffering=0)  # no buffer per file
            fmt = np.lib.format
            version = fmt.read_magic(fh)
            read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
            shape, _, dtype = read(fh)
            self.files[c] = (fh, fh.tell(), shape[1] * dtype.itemsize, dtype)
        fh, offset, row_bytes, dtype = self.files[c]
        fh.seek(offset + (doc - c * self.chunk_docs) * row_bytes)
        return np.frombuffer(fh.read(row_bytes), dtype=dtype)

    def close(self) -> None:
        for fh, *_ in self.files.values():
            fh.close()
        self.files.clear()


def pairs_stage(
    work_dir: str, partition: int, chunks: int, chunk_docs: int, threshold: float
) -> tuple[int, int, int]:
    """Stage 3 for one partition: bucket members -> confirmed pairs, filed by later doc's chunk.

    Returns (rows held, candidate pairs, confirmed pairs).
    """
    work = Path(work_dir)
    rows = np.concatenate(
        [
            np.fromfile(_file(work, f"bucket-p{partition:05d}-c{c:06d}.bin"), dtype=BUCKET_ROW)
            for c in range(chunks)
        ]
    )
    order = np.lexsort((rows["doc"], rows["key"], rows["band"]))
    rows = rows[order]
    sigs = _Signatures(work, chunk_docs)
    edges: dict[int, list[tuple[int, int, float]]] = {}
    candidates = confirmed = 0
    same = (rows["band"][1:] == rows["band"][:-1]) & (rows["key"][1:] == rows["key"][:-1])
    starts = np.flatnonzero(np.concatenate(([True], ~same)))
    ends = np.append(starts[1:], len(rows))
    for s, e in zip(starts, ends):
        if e - s < 2:
            continue
        firsts: list[tuple[int, int]] = []  # (doc, whole-signature hash), distinct signatures
        seen_sig: set[int] = set()
        for doc, whole in zip(rows["doc"][s:e].tolist(), rows["sig"][s:e].tolist()):
            if firsts:
                mine = sigs[doc]
                for other, _ in firsts:
                    candidates += 1
                    sim = float(np.count_nonzero(mine == sigs[other])) / len(mine)
                    if sim >= threshold:
                        confirmed += 1
                        edges.setdefault(doc // chunk_docs, []).append((doc, other, sim))
            if whole not in seen_sig:
                seen_sig.add(whole)
                firsts.append((doc, whole))
    sigs.close()
    for c in range(chunks):
        _save_rows(
            _file(work, f"edges-c{c:06d}-p{partition:05d}.bin"),
            np.array(edges.get(c, []), EDGE_ROW),
        )
    return len(rows), candidates, confirmed


def cluster_stage(work_dir: str, chunks: int, partitions: int, documents: int, chunk_docs: int):
    """Stage 3b, sequential in corpus order: the streaming filter's decisions, from the edges.

    Yields ``(chunk, duplicate_of array)`` per chunk (``-1`` = kept) and the largest number of
    edges held at once via the final value of ``cluster_stage.max_edges``.
    """
    work = Path(work_dir)
    kept = np.ones(documents, dtype=bool)  # the one per-document state: 1 byte each
    max_edges = 0
    for c in range(chunks):
        edges = np.concatenate(
            [
                np.fromfile(_file(work, f"edges-c{c:06d}-p{p:05d}.bin"), dtype=EDGE_ROW)
                for p in range(partitions)
            ]
        )
        max_edges = max(max_edges, len(edges))
        lo = c * chunk_docs
        dup = np.full(min(chunk_docs, documents - lo), -1, dtype=np.int64)
        # by document, then most similar first, then earliest
        edges = edges[np.lexsort((edges["other"], -edges["sim"], edges["doc"]))]
        for doc, other in zip(edges["doc"].tolist(), edges["other"].tolist()):
            if dup[doc - lo] == -1 and kept[other]:
                # the first kept partner in this order is the best one; mark doc a duplicate
                dup[doc - lo] = other
                kept[doc] = False
        yield c, dup, max_edges


def _save_rows(path: str, rows: np.ndarray) -> None:
    """Raw records (no .npy header: parsing a structured header per file allocates and keeps
    dtype objects, and the stages read chunks x partitions such files)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    rows.tofile(tmp)
    os.replace(tmp, path)


def _save(path: str, array: np.ndarray) -> None:
    tmp = f"{path}.tmp-{os.getpid()}.npy"
    np.save(tmp, array)
    os.replace(tmp, path)


def run_staged_dedup(
    texts: Iterable[str],
    config: DedupConfig,
    staged: StagedDedupConfig,
    rank: int = 0,
    world: int = 1,
    barrier=None,
) -> tuple[np.ndarray, StageStats]:
    """All stages over a stream of texts (corpus order); returns ``duplicate_of`` per document
    (``-1`` = kept) and what this process's stages held. Texts are consumed one chunk at a time.

    With ``world`` > 1 (torchrun ranks sharing ``work_dir``, ``barrier`` between stages), every
    rank streams the texts but signs only chunks ``c % world == rank``, partitions its own
    chunks, pairs partitions ``p % world == rank``, and then reads all edge files to reach the
    same answer as every other rank.
    """
    work = Path(staged.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    stats = StageStats()
    sync = barrier or (lambda: None)
    pool = ProcessPoolExecutor(staged.workers) if staged.workers > 1 else None
    try:
        # Stage 1: the pool signs slices (a few per worker in flight, so texts never pile up
        # and no worker idles while another finishes a whole chunk); this process files each
        # of its chunks once the chunk's slices are back, in order.
        inflight: list[tuple[int, bool, Future | _Done]] = []
        parts: list[tuple[np.ndarray, np.ndarray]] = []

        def collect() -> None:
            chunk_index, last, future = inflight.pop(0)
            parts.append(future.result())
            if last:
                held = write_chunk(str(work), chunk_index, parts)
                stats.max_docs_in_chunk = max(stats.max_docs_in_chunk, held)
                parts.clear()

        chunk = first = 0
        for chunk, first, buf, last in _slices(texts, staged.chunk_docs, _slice_docs(staged)):
            if chunk % world == rank:
                inflight.append((chunk, last, _submit(pool, sign_texts, first, buf, config)))
                if len(inflight) > 2 * staged.workers:
                    collect()
            first += len(buf)
        while inflight:
            collect()
        chunk += 1
        stats.documents, stats.chunks = first, chunk
        sync()
        # Stage 2: as many key partitions as chunks, so that a partition holds about one
        # chunk's band rows (rows = documents x bands, spread evenly by the key hash).
        partitions = chunk
        stats.partitions = partitions
        mine = [(str(work), c, partitions) for c in range(chunk) if c % world == rank]
        list(_map(pool, partition_stage, mine))
        sync()
        # Stage 3: candidate pairs per partition.
        args = [
            (str(work), p, chunk, staged.chunk_docs, config.threshold)
            for p in range(partitions)
            if p % world == rank
        ]
        for held, cand, conf in _map(pool, pairs_stage, args):
            stats.max_rows_in_partition = max(stats.max_rows_in_partition, held)
            stats.candidate_pairs += cand
            stats.confirmed_pairs += conf
    finally:
        if pool is not None:
            pool.shutdown()
    sync()
    # Stage 4: clusters in corpus order, then the filter's answer.
    duplicate_of = np.full(first, -1, dtype=np.int64)
    for c, dup, max_edges in cluster_stage(str(work), chunk, partitions, first, staged.chunk_docs):
        duplicate_of[c * staged.chunk_docs : c * staged.chunk_docs + len(dup)] = dup
        stats.max_edges_in_chunk = max_edges
    stats.duplicates = int((duplicate_of >= 0).sum())
    return duplicate_of, stats


class _Done:
    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value


def _submit(pool, fn, *args):
    if pool is None:
        return _Done(fn(*args))
    return pool.submit(fn, *args)


#: documents per signing task: large enough that a task's IPC (its texts out, ~1 KB of
#: signature per document back) is a fraction of a percent of its MinHash work, small enough
#: that a chunk is spread over every worker
SLICE_DOCS = 1000


def _slice_docs(staged: StagedDedupConfig) -> int:
    return max(1, min(staged.chunk_docs, SLICE_DOCS))


def _slices(texts: Iterable[str], chunk_docs: int, slice_docs: int):
    """``(chunk, first document, texts, last slice of its chunk?)`` over a stream of texts;
    slices never straddle chunks. An empty corpus is one empty chunk."""
    chunk = doc = in_chunk = 0
    buf: list[str] = []
    for text in texts:
        buf.append(text)
        in_chunk += 1
        if in_chunk == chunk_docs or len(buf) == slice_docs:
            last = in_chunk == chunk_docs
            yield chunk, doc, buf, last
            doc, buf = doc + len(buf), []
            if last:
                chunk, in_chunk = chunk + 1, 0
    if buf or doc == 0 or in_chunk:
        yield chunk, doc, buf, True


def _map(pool, fn, arglist):
    if pool is None:
        return (fn(*a) for a in arglist)
    return pool.map(fn, *zip(*arglist)) if arglist else iter(())
