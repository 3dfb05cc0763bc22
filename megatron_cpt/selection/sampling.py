"""Ranking, rank averaging, hard/soft sampling and exact budgets.

- Ranking: descending score, NaN (undefined metric) last, ties broken by input order so the
  result is deterministic.
- ETS-DACP-com: each metric's scores become normalised ranks ``rank / n`` in ``(0, 1]``
  (1 = best, ties share their average rank, NaN gets 0) and the ranks are averaged.
- Hard sampling: the ranking itself; a budget takes its prefix, so the selection is exactly the
  top of the ranking.
- Soft sampling: documents drawn *without replacement* with probability proportional to the
  weight (the metric value, or the averaged rank for combined metrics), via Efraimidis–Spirakis
  keys ``k_i = log(u_i) / w_i`` with ``u_i ~ U(0,1)`` from ``numpy.random.default_rng(seed)``.
  Ordering by descending key is distributed exactly like successive weighted draws without
  replacement, so any prefix (any budget) is such a sample. Weights ``<= 0`` or NaN get key
  ``-inf`` (drawn only after every positive-weight document).
- Budgets: ``documents`` takes exactly ``min(n, k)``; ``fraction`` takes ``floor(f * n)``
  (``f*n`` rounded to 9 decimals first so 0.29 * 100 is 29, not 28); ``tokens`` walks the order
  and stops before the first document that would push the total over the budget, so the total
  is ``<= budget`` and adding the next document would exceed it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.stats import rankdata

from megatron_cpt.errors import UserError

BUDGET_KINDS = ("fraction", "documents", "tokens")


@dataclass(frozen=True)
class Budget:
    kind: str
    value: float

    def __post_init__(self) -> None:
        if self.kind not in BUDGET_KINDS:
            raise UserError(f"budget kind must be one of {BUDGET_KINDS}, got {self.kind!r}")
        if self.kind == "fraction" and not 0.0 < self.value <= 1.0:
            raise UserError(f"--fraction must be in (0, 1], got {self.value}")
        if self.kind != "fraction" and (self.value < 1 or self.value != int(self.value)):
            # 0 would write an empty selection with exit 0
            raise UserError(f"--{self.kind} must be a positive integer, got {self.value}")

    def describe(self) -> str:
        return f"{self.kind}={self.value:g}"


def normalized_ranks(scores: np.ndarray) -> np.ndarray:
    """``rank / n`` with 1 for the best score; NaN scores get 0."""
    scores = np.asarray(scores, dtype=np.float64)
    out = np.zeros(len(scores))
    ok = ~np.isnan(scores)
    if ok.any():
        out[ok] = rankdata(scores[ok], method="average") / len(scores)
    return out


def combine(metric_scores: list[np.ndarray]) -> np.ndarray:
    """One metric: its scores unchanged. Several: the mean of their normalised ranks."""
    if len(metric_scores) == 1:
        return np.asarray(metric_scores[0], dtype=np.float64)
    return np.mean([normalized_ranks(s) for s in metric_scores], axis=0)


def ranking_order(scores: np.ndarray) -> np.ndarray:
    """Indices by descending score, NaN last, ties in input order."""
    scores = np.asarray(scores, dtype=np.float64)
    key = np.where(np.isnan(scores), -np.inf, scores)
    return np.lexsort((np.arange(len(scores)), -key)) if len(scores) else np.arange(0)


def soft_order(weights: np.ndarray, seed: int) -> np.ndarray:
    """Efraimidis–Spirakis order: any prefix is a weighted sample without replacement."""
    weights = np.asarray(weights, dtype=np.float64)
    u = np.random.default_rng(seed).random(len(weights))
    u = np.where(u == 0.0, np.nextafter(0.0, 1.0), u)  # log(0) would tie at -inf
    positive = np.nan_to_num(weights, nan=0.0) > 0
    keys = np.full(len(weights), -np.inf)
    keys[positive] = np.log(u[positive]) / weights[positive]
    return np.lexsort((np.arange(len(weights)), -keys)) if len(weights) else np.arange(0)


def budget_prefix(order: np.ndarray, budget: Budget, tokens: np.ndarray | None = None) -> int:
    """How many documents of ``order`` the budget admits."""
    n = len(order)
    if budget.kind == "documents":
        return min(n, int(budget.value))
    if budget.kind == "fraction":
        return min(n, math.floor(round(budget.value * n, 9)))
    if tokens is None:
        raise ValueError("a token budget needs token counts")
    cumulative = np.cumsum(np.asarray(tokens, dtype=np.int64)[order])
    return int(np.searchsorted(cumulative, int(budget.value), side="right"))


def select(
    scores: np.ndarray,
    sampling: str,
    budget: Budget,
    *,
    seed: int = 0,
    tokens: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``(order, selected)``: the sampling order and the selected indices (a prefix of it)."""
    if sampling == "hard":
        order = ranking_order(scores)
    elif sampling == "soft":
        order = soft_order(scores, seed)
    else:
        raise UserError(f"--sampling must be 'hard' or 'soft', got {sampling!r}")
    return order, order[: budget_prefix(order, budget, tokens)]
