"""The selection pipeline: read -> dedup -> score (cached) -> rank/sample -> write.

Documents are streamed; only per-document metadata (location, id, scores) is held in memory, so
the corpus may be far larger than RAM. Input files are read several times (index + dedup,
scoring of what the cache lacks, writing the selection) instead of holding texts.

Outputs, each written to a temporary name and renamed when complete:
- the selected JSONL: the original input lines, byte for byte, in input order;
- a scores JSONL: one row per document (file, line, id, duplicate_of, each metric, tokens,
  ranking score, rank, selected);
- a JSON summary: counts, token totals, metric distributions, duplicates removed, cache use.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from megatron_cpt.data.jsonl import (
    EMPTY_DOCUMENT,
    BadInputError,
    JsonlRecord,
    expand_inputs,
    get_text,
    iter_raw_lines,
    parse_line,
)
from megatron_cpt.errors import UserError
from megatron_cpt.output_paths import check_output_dir, check_output_file
from megatron_cpt.selection.cache import ScoreCache
from megatron_cpt.selection.dedup import DedupConfig, NearDuplicateFilter
from megatron_cpt.selection.perplexity import PerplexityConfig, PerplexityScorer
from megatron_cpt.selection.pos_entropy import PosEntropyConfig, PosEntropyScorer
from megatron_cpt.selection.sampling import Budget, combine, ranking_order, select
from megatron_cpt.selection.similarity import SimilarityConfig, TaskSimilarityScorer
from megatron_cpt.selection.to_shards import SelectedShardWriter, ShardOutputConfig
from megatron_cpt.selection.tokens import TokenCounter, TokenCounterConfig

METRICS = ("similarity", "perplexity", "pos-entropy", "random")
#: ETS-DACP-com: the rank average of all three FinPythia metrics
COMBINED = ("similarity", "perplexity", "pos-entropy")


def parse_metrics(spec: str) -> tuple[str, ...]:
    """``combined`` or a comma list of metrics (several are rank-averaged)."""
    names = COMBINED if spec == "combined" else tuple(s.strip() for s in spec.split(",") if s)
    bad = [m for m in names if m not in METRICS]
    if bad or not names:
        raise UserError(
            f"--metric {spec}: unknown metric(s) {bad}; choose from {METRICS} or combined"
        )
    if len(set(names)) != len(names):
        raise UserError(f"--metric {spec}: a metric is repeated")
    return names


@dataclass(frozen=True)
class SelectionConfig:
    inputs: tuple[str, ...]
    output: str
    budget: Budget
    metrics: tuple[str, ...] = ("similarity",)
    sampling: str = "hard"
    seed: int = 0
    text_key: str = "text"
    id_key: str = "id"
    scores_output: str | None = None  # default: <output stem>.scores.jsonl
    summary_output: str | None = None  # default: <output stem>.summary.json
    cache_dir: str | None = None  # default: <megatron_cpt cache>/selection_scores
    chunk_size: int = 64  # documents per scoring call; the cache is flushed after each
    skip_bad_lines: bool = False
    progress: bool = True
    dedup: DedupConfig = field(default_factory=DedupConfig)
    # How dedup runs (not what it computes): staged over files in chunks with parallel
    # signature workers (default), or the whole-corpus in-memory index (``dedup_in_memory``).
    dedup_in_memory: bool = False
    dedup_workers: int = 1
    dedup_chunk: int = 50_000
    dedup_work_dir: str | None = None  # default: a temporary directory next to the output
    shards: ShardOutputConfig | None = None  # also write the selection as megatron-core shards
    similarity: SimilarityConfig = field(default_factory=SimilarityConfig)
    perplexity: PerplexityConfig = field(default_factory=PerplexityConfig)
    pos_entropy: PosEntropyConfig = field(default_factory=PosEntropyConfig)
    tokens: TokenCounterConfig = field(default_factory=TokenCounterConfig)

    def output_paths(self) -> tuple[Path, Path, Path]:
        out = Path(self.output)
        stem = out.name[: -len(".jsonl")] if out.name.endswith(".jsonl") else out.name
        scores = Path(self.scores_output or out.with_name(stem + ".scores.jsonl"))
        summary = Path(self.summary_output or out.with_name(stem + ".summary.json"))
        return out, scores, summary


@dataclass
class Corpus:
    """Per-document metadata of every readable input document, in input order."""

    files: list[str] = field(default_factory=list)
    file_hashes: list[str] = field(default_factory=list)
    file_idx: list[int] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)
    ids: list[str | None] = field(default_factory=list)
    duplicate_of: list[int | None] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)

    def __len__(self) -> int:
        return len(self.lines)

    def location(self, i: int) -> str:
        return f"{self.files[self.file_idx[i]]}:{self.lines[i]}"


def build_scorers(config: SelectionConfig) -> dict:
    """Scorers are cheap to build (models load on first use), so errors surface up front."""
    scorers: dict = {}
    for metric in config.metrics:
        if metric == "similarity":
            scorers[metric] = TaskSimilarityScorer(config.similarity)
        elif metric == "perplexity":
            scorers[metric] = PerplexityScorer(config.perplexity)
        elif metric == "pos-entropy":
            scorers[metric] = PosEntropyScorer(config.pos_entropy)
    scorers["tokens"] = TokenCounter(config.tokens)
    return scorers


def _records(path: str, config: SelectionConfig, skipped: Counter):
    """``(record, text)`` for one file under the skip policy; empty texts are skipped."""
    for number, raw in iter_raw_lines(path):
        try:
            record = JsonlRecord(path, number, parse_line(path, number, raw), len(raw))
            text = get_text(record, config.text_key)
            if not text.strip():
                raise BadInputError(path, number, f"empty {config.text_key!r}", EMPTY_DOCUMENT)
        except BadInputError as err:
            if not config.skip_bad_lines:
                raise UserError(f"{err} (pass --skip-bad-lines to skip such lines)") from None
            skipped[err.reason] += 1
            continue
        yield record, raw, text


def index_corpus(
    config: SelectionConfig, paths: list[Path], rank: int = 0, world: int = 1
) -> Corpus:
    """Pass 1: locate documents, hash file contents (the cache key), find near-duplicates.

    With ``world`` > 1 only the staged dedup is spread over the ranks (see _index_staged).
    """
    corpus = Corpus()
    if staged_dedup(config):
        return _index_staged(config, paths, corpus, rank, world)
    dedup = NearDuplicateFilter(config.dedup) if config.dedup.enabled else None
    key_to_doc: dict[str, int] = {}
    for i, text in _index_documents(config, paths, corpus):
        dup = None
        if dedup is not None:
            key = f"{corpus.file_idx[i]}:{corpus.lines[i]}"
            first = dedup.check(key, text)
            if first is None:
                key_to_doc[key] = i
            else:
                dup = key_to_doc[first]
        corpus.duplicate_of.append(dup)
    return corpus


def _index_documents(config: SelectionConfig, paths: list[Path], corpus: Corpus):
    """Fill ``corpus`` with every document's location and id; yields ``(index, text)``."""
    bar = tqdm(desc="index+dedup", unit="doc", disable=not config.progress)
    for path in paths:
        name = str(path)
        digest = hashlib.sha256()
        corpus.files.append(name)
        for number, raw in iter_raw_lines(name):
            digest.update(f"{number}\n".encode())
            digest.update(raw)
        corpus.file_hashes.append(digest.hexdigest())
        for record, _, text in _records(name, config, corpus.skipped):
            i = len(corpus.lines)
            corpus.file_idx.append(len(corpus.files) - 1)
            corpus.lines.append(record.line)
            doc_id = record.obj.get(config.id_key)
            corpus.ids.append(None if doc_id is None else str(doc_id))
            yield i, text
            bar.update(1)
    bar.close()


def staged_dedup(config: SelectionConfig) -> bool:
    return config.dedup.enabled and not config.dedup_in_memory


def _index_staged(
    config: SelectionConfig, paths: list[Path], corpus: Corpus, rank: int = 0, world: int = 1
) -> Corpus:
    """Index while the staged dedup takes the texts chunk by chunk (memory: one chunk).

    Under torchrun every rank indexes (the same metadata) and signs/pairs its share of the
    chunks; the stage files go to a directory all ranks share (next to ``--output``, or
    ``--dedup-work-dir``), which must be on a shared filesystem for multi-node runs.
    """
    import shutil
    import tempfile

    from megatron_cpt.selection.staged_dedup import StagedDedupConfig, run_staged_dedup

    StagedDedupConfig("", config.dedup_chunk, config.dedup_workers)  # flags checked first
    barrier = None
    if config.dedup_work_dir:
        work, remove = Path(config.dedup_work_dir), False
    else:
        parent = Path(config.output).resolve().parent
        parent.mkdir(parents=True, exist_ok=True)
        if world == 1:
            work = Path(tempfile.mkdtemp(prefix=".dedup-", dir=parent))
        else:  # one name all ranks agree on
            tag = hashlib.sha256(str(Path(config.output).resolve()).encode()).hexdigest()[:12]
            work = parent / f".dedup-{tag}"
        remove = True
    if world > 1:
        import torch.distributed as dist

        barrier = dist.barrier
    staged = StagedDedupConfig(str(work), config.dedup_chunk, config.dedup_workers)
    try:
        texts = (text for _, text in _index_documents(config, paths, corpus))
        duplicate_of, _ = run_staged_dedup(texts, config.dedup, staged, rank, world, barrier)
        if barrier is not None:
            barrier()  # every rank has read every edge file
    finally:
        if remove and rank == 0:
            shutil.rmtree(work, ignore_errors=True)
    corpus.duplicate_of = [None if d < 0 else int(d) for d in duplicate_of.tolist()]
    return corpus


def score_corpus(
    config: SelectionConfig,
    corpus: Corpus,
    scorers: dict,
    root: Path,
    rank: int = 0,
    world: int = 1,
) -> tuple[dict, dict, int]:
    """Scores of kept documents per metric (NaN for duplicates), from the cache or computed.

    With ``world`` ranks, the documents some cache lacks are listed in corpus order (the same
    list on every rank, since every rank reads the same cache) and rank ``r`` scores the
    ``r``-th contiguous block of it, appending to its own part of the cache. Returns the scores
    this rank knows (cached + its own), cache statistics, and how many documents it scored.
    """
    kept = [i for i in range(len(corpus)) if corpus.duplicate_of[i] is None]
    by_file: dict[int, list[int]] = {}
    for i in kept:
        by_file.setdefault(corpus.file_idx[i], []).append(i)
    results = {name: np.full(len(corpus), np.nan) for name in scorers}
    stats = {name: {"cached": 0, "scored": 0} for name in scorers}
    part = None if world == 1 else rank
    work = []  # (file index, {scorer: cache}, lines still to score per scorer)
    for f, docs in by_file.items():
        caches = {
            name: ScoreCache(root, corpus.file_hashes[f], s.key, corpus.files[f], part=part)
            for name, s in scorers.items()
        }
        missing = {}
        for name, cache in caches.items():
            todo = set()
            for i in docs:
                if corpus.lines[i] in cache:
                    results[name][i] = cache.get(corpus.lines[i])
                    stats[name]["cached"] += 1
                else:
                    todo.add(corpus.lines[i])
            missing[name] = todo
        if any(missing.values()):
            work.append((f, caches, missing))
    # This rank's share: a contiguous block of the (file, line) pairs some scorer lacks.
    pending = [(f, line) for f, _, m in work for line in sorted(set().union(*m.values()))]
    lo, hi = len(pending) * rank // world, len(pending) * (rank + 1) // world
    mine: dict[int, set[int]] = {}
    for f, line in pending[lo:hi]:
        mine.setdefault(f, set()).add(line)
    total = sum(len(t & mine.get(f, set())) for f, _, m in work for t in m.values())
    bar = tqdm(total=total, desc="scoring", unit="score", disable=not config.progress or not total)
    for f, caches, missing in work:
        wanted = mine.get(f)
        if not wanted:
            continue
        line_to_doc = {corpus.lines[i]: i for i in by_file[f]}
        chunk: list[tuple[int, str]] = []

        def flush_chunk(chunk=chunk, caches=caches, missing=missing, line_to_doc=line_to_doc):
            for name, cache in caches.items():
                part = [(line, text) for line, text in chunk if line in missing[name]]
                if not part:
                    continue
                values = scorers[name].score([text for _, text in part])
                for (line, _), value in zip(part, values):
                    cache.put(line, float(value))
                    results[name][line_to_doc[line]] = float(value)
                stats[name]["scored"] += len(part)
                cache.flush()
                bar.update(len(part))
            chunk.clear()

        for record, _, text in _records(corpus.files[f], config, Counter()):
            if record.line in wanted:
                chunk.append((record.line, text))
                if len(chunk) >= config.chunk_size:
                    flush_chunk()
        flush_chunk()
    bar.close()
    return results, stats, hi - lo


def merge_rank_scores(corpus: Corpus, scorers: dict, root: Path, results: dict) -> None:
    """Fold the ranks' cache parts into the main cache files and fill in their scores."""
    by_file: dict[int, list[int]] = {}
    for i in range(len(corpus)):
        if corpus.duplicate_of[i] is None:
            by_file.setdefault(corpus.file_idx[i], []).append(i)
    for f, docs in by_file.items():
        for name, s in scorers.items():
            cache = ScoreCache(root, corpus.file_hashes[f], s.key, corpus.files[f])
            cache.compact()
            for i in docs:
                if np.isnan(results[name][i]) and corpus.lines[i] in cache:
                    results[name][i] = cache.get(corpus.lines[i])


def _distribution(values: np.ndarray) -> dict:
    ok = values[~np.isnan(values)]
    out = {"count": int(len(ok)), "nan": int(len(values) - len(ok))}
    if len(ok):
        q = np.percentile(ok, [10, 25, 50, 75, 90])
        out.update(
            mean=float(ok.mean()),
            std=float(ok.std()),
            min=float(ok.min()),
            p10=float(q[0]),
            p25=float(q[1]),
            p50=float(q[2]),
            p75=float(q[3]),
            p90=float(q[4]),
            max=float(ok.max()),
        )
    return out


class _AtomicWriter:
    """Write to ``<name>.tmp-<pid>``; rename over ``name`` only when the block succeeds."""

    def __init__(self, path: Path, mode: str):
        self.path = path
        self.tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        self.mode = mode

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kwargs = {} if "b" in self.mode else {"encoding": "utf-8"}
        self.fh = open(self.tmp, self.mode, **kwargs)
        return self.fh

    def __exit__(self, exc_type, exc, tb):
        self.fh.close()
        if exc_type is None:
            os.replace(self.tmp, self.path)
        else:
            self.tmp.unlink(missing_ok=True)
        return False


def run_selection(config: SelectionConfig, scorers: dict | None = None) -> dict:
    """Run the whole pipeline; returns the summary (also written to disk)."""
    from megatron_cpt import assets

    paths = expand_inputs(list(config.inputs))
    out_path, scores_path, summary_path = config.output_paths()
    for p in (out_path, scores_path, summary_path):
        if p.resolve() in {q.resolve() for q in paths}:
            raise UserError(f"output {p} would overwrite an input file")
    if config.sampling not in ("hard", "soft"):
        raise UserError(f"--sampling must be 'hard' or 'soft', got {config.sampling!r}")
    root = Path(config.cache_dir) if config.cache_dir else assets.cache_dir() / "selection_scores"
    for flag, p in (("--output", out_path), ("--scores-output", scores_path),
                    ("--summary-output", summary_path)):  # fmt: skip
        check_output_file(p, flag)  # before hours of scoring
    check_output_dir(root, "--cache-dir")
    scorers = scorers if scorers is not None else build_scorers(config)

    rank, world = _distributed()
    # Built up front (on the rank that writes) so a bad tokenizer fails before any scoring.
    shard_writer, problem = None, None
    try:
        if config.shards is not None and rank == 0:
            shard_writer = SelectedShardWriter(config.shards, config.text_key)
    except UserError as err:
        problem = err
    if world > 1:  # one rank's bad flag stops every rank (none waits at a barrier for it)
        problem = _broadcast(problem)
    if problem is not None:
        raise problem
    corpus = None
    if staged_dedup(config):  # every rank indexes and runs its share of the dedup stages
        corpus = index_corpus(config, paths, rank, world)
    else:  # rank 0 indexes (and dedups in memory); the others receive the metadata, no texts
        if rank == 0:
            try:
                corpus = index_corpus(config, paths)
            except UserError as err:  # tell the other ranks instead of leaving them waiting
                corpus = err
        if world > 1:
            corpus = _broadcast(corpus)
    if isinstance(corpus, UserError):
        raise corpus
    if not len(corpus):
        raise UserError(f"--input {' '.join(config.inputs)}: no documents with a text")
    started = time.perf_counter()
    scores, cache_stats, scored_here = score_corpus(config, corpus, scorers, root, rank, world)
    seconds_here = round(time.perf_counter() - started, 3)
    scored_per_rank, seconds_per_rank = [scored_here], [seconds_here]
    if world > 1:
        import torch.distributed as dist

        gathered: list = [None] * world
        dist.all_gather_object(gathered, (scored_here, cache_stats, seconds_here))  # a barrier
        scored_per_rank = [n for n, _, _ in gathered]
        seconds_per_rank = [t for _, _, t in gathered]
        cache_stats = {
            name: {k: sum(st[name][k] for _, st, _ in gathered) for k in ("cached", "scored")}
            for name in cache_stats
        }
        # every rank counted the cached documents: count them once
        for name in cache_stats:
            cache_stats[name]["cached"] //= world
        if rank != 0:
            return {}
    merge_rank_scores(corpus, scorers, root, scores)
    kept = np.array([d is None for d in corpus.duplicate_of])
    kept_idx = np.flatnonzero(kept)
    if "random" in config.metrics:
        scores["random"] = np.full(len(corpus), np.nan)
        scores["random"][kept_idx] = np.random.default_rng(config.seed).random(len(kept_idx))

    metric_arrays = [scores[m][kept_idx] for m in config.metrics]
    ranking_score = combine(metric_arrays)
    tokens = scores["tokens"][kept_idx].astype(np.int64)
    order, chosen = select(
        ranking_score, config.sampling, config.budget, seed=config.seed, tokens=tokens
    )
    rank = np.empty(len(kept_idx), dtype=np.int64)
    rank[ranking_order(ranking_score)] = np.arange(1, len(kept_idx) + 1)
    selected = np.zeros(len(corpus), dtype=bool)
    selected[kept_idx[chosen]] = True
    full_score = np.full(len(corpus), np.nan)
    full_score[kept_idx] = ranking_score
    full_rank = np.zeros(len(corpus), dtype=np.int64)
    full_rank[kept_idx] = rank

    # Selected documents: original bytes, input order (and, with --output-prefix, as shards
    # tokenized from the same lines in the same pass).
    def selected_lines(fh):
        doc = 0
        for name in corpus.files:
            for record, raw, _ in _records(name, config, Counter()):
                if corpus.lines[doc] != record.line:
                    raise UserError(f"{name} changed while it was being selected from; re-run")
                if selected[doc]:
                    fh.write(raw if raw.endswith(b"\n") else raw + b"\n")
                    yield name, record.line, raw
                doc += 1

    shard_summary = None
    with _AtomicWriter(out_path, "wb") as fh:
        if shard_writer is not None:
            shard_summary = shard_writer.run(selected_lines(fh))
        else:
            for _ in selected_lines(fh):
                pass
    with _AtomicWriter(scores_path, "w") as fh:
        for i in range(len(corpus)):
            dup = corpus.duplicate_of[i]
            row = {
                "file": corpus.files[corpus.file_idx[i]],
                "line": corpus.lines[i],
                "id": corpus.ids[i],
                "duplicate_of": None if dup is None else (corpus.ids[dup] or corpus.location(dup)),
            }
            for m in (*config.metrics, "tokens"):
                row[m] = _json_float(scores[m][i])
            row["score"] = _json_float(full_score[i])
            row["rank"] = int(full_rank[i]) if dup is None else None
            row["selected"] = bool(selected[i])
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")

    sel_idx = kept_idx[chosen]
    summary = {
        "inputs": corpus.files,
        "outputs": {
            "selected": str(out_path),
            "scores": str(scores_path),
            **({"shards": shard_summary} if shard_summary is not None else {}),
        },
        "config": {
            "metrics": list(config.metrics),
            "sampling": config.sampling,
            "budget": asdict(config.budget),
            "seed": config.seed,
            "dedup": asdict(config.dedup),
            "scorers": {name: s.key for name, s in scorers.items()},
        },
        "counts": {
            "documents": len(corpus),
            "bad_lines_skipped": dict(corpus.skipped),
            "duplicates_removed": int((~kept).sum()),
            "kept_after_dedup": int(len(kept_idx)),
            "selected": int(len(sel_idx)),
        },
        "tokens": {
            "unit": scorers["tokens"].unit,
            "kept_after_dedup": int(tokens.sum()),
            "selected": int(scores["tokens"][sel_idx].sum()),
        },
        "metrics": {
            m: {
                "kept": _distribution(scores[m][kept_idx]),
                "selected": _distribution(scores[m][sel_idx]),
            }
            for m in (*config.metrics, "tokens")
        },
        "cache": {"dir": str(root), **{k: v for k, v in cache_stats.items()}},
        "ranks": world,
        "scored_per_rank": scored_per_rank,
        "scoring_seconds_per_rank": seconds_per_rank,  # incl. model loading on first use
    }
    if len(config.metrics) > 1:
        summary["metrics"]["rank_average"] = {
            "kept": _distribution(ranking_score),
            "selected": _distribution(ranking_score[chosen]),
        }
    with _AtomicWriter(summary_path, "w") as fh:
        json.dump(summary, fh, indent=2)
        fh.write("\n")
    return summary


def _distributed() -> tuple[int, int]:
    """``(rank, world size)``: a process group only when launched by torchrun with > 1 rank.

    Each rank scores on its own device (``cuda:LOCAL_RANK`` via the platform layer, else CPU).
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    from megatron_cpt import platform

    return platform.init_process_group_only()


def _broadcast(obj):
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _json_float(value: float):
    return None if np.isnan(value) else float(value)
