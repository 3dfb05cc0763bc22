"""What every per-document metric provides, so the pipeline can cache and rank them alike."""

from __future__ import annotations

from typing import Protocol


class Scorer(Protocol):
    #: metric name as given on the command line (``similarity``, ``perplexity``, ...)
    name: str
    #: identity of the numbers this scorer produces (metric + model + parameters); part of the
    #: cache key, so changing any of them re-scores instead of reusing stale numbers
    key: str
    #: how many times the underlying model was invoked (tests prove cache reuse with it)
    calls: int

    def score(self, texts: list[str]) -> list[float]:
        """One float per text; higher means "select first". NaN means undefined (ranked last)."""
        ...
