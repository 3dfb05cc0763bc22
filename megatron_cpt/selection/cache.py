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

    def __init__(self, root: str | Path, file_hash: str, scorer_key: str, source: str = ""):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        key = cache_key(file_hash, scorer_key)
        self.path = self.root / f"{key}.scores.jsonl"
        meta = self.root / f"{key}.meta.json"
        if not meta.exists():  # human-readable record of what the opaque name holds
            tmp = meta.with_suffix(".tmp")
            tmp.write_text(
                json.dumps({"file_hash": file_hash, "scorer": scorer_key, "source": source}) + "\n"
            )
            os.replace(tmp, meta)
        self.scores: dict[int, float] = {}
        self._pending: list[tuple[int, float]] = []
        self._load()

    def _load(self) -> None:
        if not self.path.exists():
            return
        with open(self.path, encoding="utf-8") as fh:
            for raw in fh:
                if not raw.endswith("\n"):
                    break  # torn write from an interrupted run: re-score that document
                try:
                    row = json.loads(raw)
                    self.scores[int(row["line"])] = _decode(row["score"])
                except (ValueError, KeyError, TypeError):
                    break
        # Rewrite without the torn tail so later appends start on a fresh line.
        if self.scores and self.path.stat().st_size != self._expected_size():
            self._rewrite()

    def _expected_size(self) -> int:
        return sum(len(_row(line, score)) for line, score in self.scores.items())

    def _rewrite(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            for line, score in self.scores.items():
                fh.write(_row(line, score))
        os.replace(tmp, self.path)

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


def _row(line: int, score: float) -> str:
    value = None if math.isnan(score) else score  # JSON has no NaN; null means "undefined"
    return json.dumps({"line": line, "score": value}) + "\n"


def _decode(value) -> float:
    return float("nan") if value is None else float(value)
