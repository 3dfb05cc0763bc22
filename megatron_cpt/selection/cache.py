"""Resumable per-document score cache.

Scoring is the expensive step (a causal LM forward per document); choosing a budget or a
sampling mode is cheap. So scores are stored per input file, keyed by the file's *content* hash
(not its name or mtime, which change under copies) and by the scorer's identity (metric, model,
parameters). Each cache entry is an append-only JSONL of ``{"line": n, "score": x}`` flushed
every few batches: a crash or Ctrl-C loses at most one flush interval, and a re-run continues
where the previous one stopped. A torn last line (killed mid-write) is ignored on load.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path


def cache_key(file_hash: str, scorer_key: str) -> str:
    return hashlib.sha256(f"{file_hash}\n{scorer_key}".encode()).hexdigest()[:32]


class ScoreCache:
    """Scores of one scorer on one input file, loaded from and appended to disk."""

    def __init__(
        self,
        root: str | Path,
        file_hash: str,
        scorer_key: str,
        source: str = "",
        part: int | None = None,
    ):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        key = cache_key(file_hash, scorer_key)
        self.main_path = self.root / f"{key}.scores.jsonl"
        self._part_glob = f"{key}.part-*.scores.jsonl"
        # Where this process appends: the main file, or its rank's part file.
        self.path = (
            self.main_path if part is None else self.root / f"{key}.part-{part}.scores.jsonl"
        )
        meta = self.root / f"{key}.meta.json"
        if not meta.exists():  # human-readable record of what the opaque name holds
            tmp = meta.with_name(f"{meta.name}.tmp-{os.getpid()}")
            tmp.write_text(
                json.dumps({"file_hash": file_hash, "scorer": scorer_key, "source": source}) + "\n"
            )
            os.replace(tmp, meta)
        self.scores: dict[int, float] = {}
        self._pending: list[tuple[int, float]] = []
        self._load()

    def part_paths(self) -> list[Path]:
        return sorted(self.root.glob(self._part_glob))

    def _load(self) -> None:
        for path in [self.main_path, *self.part_paths()]:
            if not path.exists():
                continue
            scores = _read_rows(path)
            self.scores.update(scores)
            # Our own append target loses its torn tail so later appends start on a fresh line;
            # other ranks' files are only read (their owner or compact() repairs them).
            if path == self.path and path.stat().st_size != _size(scores):
                _rewrite(path, scores)

    def compact(self) -> None:
        """Fold every part file into the main file (run by one process when no rank writes)."""
        parts = self.part_paths()
        if not parts:
            return
        merged = _read_rows(self.main_path) if self.main_path.exists() else {}
        for path in parts:
            merged.update(_read_rows(path))
        _rewrite(self.main_path, merged)
        for path in parts:
            path.unlink(missing_ok=True)
        self.scores.update(merged)

    def __contains__(self, line: int) -> bool:
        return line in self.scores

    def get(self, line: int) -> float:
        return self.scores[line]

    def put(self, line: int, score: float) -> None:
        self.scores[line] = score
        self._pending.append((line, score))

    def flush(self) -> None:
        if not self._pending:
            return
        with open(self.path, "a", encoding="utf-8") as fh:
            for line, score in self._pending:
                fh.write(_row(line, score))
            fh.flush()
            os.fsync(fh.fileno())
        self._pending.clear()


def _read_rows(path: Path) -> dict[int, float]:
    scores: dict[int, float] = {}
    with open(path, encoding="utf-8") as fh:
        for raw in fh:
            if not raw.endswith("\n"):
                break  # torn write from an interrupted run: re-score that document
            try:
                row = json.loads(raw)
                scores[int(row["line"])] = _decode(row["score"])
            except (ValueError, KeyError, TypeError):
                break
    return scores


def _size(scores: dict[int, float]) -> int:
    return sum(len(_row(line, score)) for line, score in scores.items())


def _rewrite(path: Path, scores: dict[int, float]) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        for line, score in scores.items():
            fh.write(_row(line, score))
    os.replace(tmp, path)


def _row(line: int, score: float) -> str:
    value = None if math.isnan(score) else score  # JSON has no NaN; null means "undefined"
    return json.dumps({"line": line, "score": value}) + "\n"


def _decode(value) -> float:
    return float("nan") if value is None else float(value)
