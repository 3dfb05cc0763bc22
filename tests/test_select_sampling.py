"""Ranking, hard/soft sampling and exact budgets (no models needed)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy.stats import chi2, rankdata

from megatron_cpt.errors import UserError
from megatron_cpt.selection.sampling import (
    Budget,
    budget_prefix,
    combine,
    normalized_ranks,
    ranking_order,
    select,
    soft_order,
)


def _real_token_counts(shared_data) -> np.ndarray:
    from megatron_cpt.data.jsonl import read_texts

    return np.array(
        [len(t.split()) for _, t in read_texts(str(shared_data / "domain" / "*.jsonl"))]
    )


def test_hard_is_the_top_of_the_ranking_with_nan_last_and_stable_ties():
    scores = np.array([0.3, np.nan, 0.9, 0.3, -1.0, 0.9])
    order, chosen = select(scores, "hard", Budget("documents", 4))
    assert order.tolist() == [2, 5, 0, 3, 4, 1]
    assert chosen.tolist() == [2, 5, 0, 3]


@pytest.mark.parametrize("fraction", [0.1, 0.29, 0.5, 1.0])
def test_fraction_and_document_budgets_are_exact(shared_data, fraction):
    tokens = _real_token_counts(shared_data)
    n = len(tokens)
    scores = tokens.astype(float)  # any real per-document number works as a score here
    for sampling in ("hard", "soft"):
        _, chosen = select(scores, sampling, Budget("fraction", fraction), seed=3)
        assert len(chosen) == int(np.floor(round(fraction * n, 9)))
        _, chosen = select(scores, sampling, Budget("documents", 37), seed=3)
        assert len(chosen) == 37 and len(set(chosen.tolist())) == 37
    assert budget_prefix(np.arange(100), Budget("fraction", 0.29)) == 29  # not 28 (float error)
    assert budget_prefix(np.arange(5), Budget("documents", 50)) == 5


@pytest.mark.parametrize("sampling", ["hard", "soft"])
def test_token_budget_is_greedy_in_order_until_the_next_doc_would_exceed(shared_data, sampling):
    tokens = _real_token_counts(shared_data)
    scores = np.random.default_rng(0).random(len(tokens))
    for budget in (1, 999, 5000, 12345, int(tokens.sum()) - 1):
        order, chosen = select(scores, sampling, Budget("tokens", budget), seed=1, tokens=tokens)
        total = int(tokens[chosen].sum())
        assert total <= budget
        assert chosen.tolist() == order[: len(chosen)].tolist()  # a prefix of the order
        if len(chosen) < len(order):
            assert total + tokens[order[len(chosen)]] > budget
    _, chosen = select(scores, sampling, Budget("tokens", int(tokens.sum())), tokens=tokens)
    assert len(chosen) == len(tokens)


def test_soft_sampling_is_seeded_reproducible():
    weights = np.random.default_rng(7).random(500)
    a = select(weights, "soft", Budget("documents", 50), seed=11)[1]
    b = select(weights, "soft", Budget("documents", 50), seed=11)[1]
    c = select(weights, "soft", Budget("documents", 50), seed=12)[1]
    assert a.tolist() == b.tolist()
    assert set(a.tolist()) != set(c.tolist())


def _pair_probabilities(weights: np.ndarray) -> dict[tuple[int, int], float]:
    """Exact law of successive weighted draws without replacement, k = 2."""
    total = weights.sum()
    probs = {}
    for i, j in itertools.combinations(range(len(weights)), 2):
        probs[(i, j)] = weights[i] / total * weights[j] / (total - weights[i]) + weights[
            j
        ] / total * weights[i] / (total - weights[j])
    return probs


def _chi_square(counts: dict, probs: dict, draws: int) -> float:
    return sum((counts.get(k, 0) - draws * p) ** 2 / (draws * p) for k, p in probs.items())


def test_soft_sampling_follows_the_weights_chi_square():
    """Pairs drawn over 4000 seeds vs the exact without-replacement law (dof 9, alpha 0.001)."""
    weights = np.array([1.0, 2.0, 3.0, 4.0, 10.0])
    draws = 4000
    counts: dict[tuple[int, int], int] = {}
    for seed in range(draws):
        pair = tuple(sorted(soft_order(weights, seed)[:2].tolist()))
        counts[pair] = counts.get(pair, 0) + 1
    critical = chi2.ppf(0.999, df=9)
    assert _chi_square(counts, _pair_probabilities(weights), draws) < critical
    # The same test rejects a sampler that ignores the weights, so it has power.
    uniform = _pair_probabilities(np.ones(5))
    assert _chi_square(counts, uniform, draws) > critical
    # Zero-weight documents come only after all positive ones.
    assert soft_order(np.array([0.0, 1.0, np.nan, 2.0]), 0)[:2].tolist() in ([1, 3], [3, 1])


def test_combined_is_the_mean_of_normalized_ranks():
    a = np.array([0.1, 0.5, 0.3, 0.3])
    b = np.array([10.0, 1.0, np.nan, 5.0])
    expected = (rankdata(a) / 4 + np.array([3, 1, 0, 2]) / 4) / 2
    np.testing.assert_allclose(combine([a, b]), expected)
    np.testing.assert_allclose(normalized_ranks(a), rankdata(a) / 4)
    assert ranking_order(combine([a])).tolist() == [1, 2, 3, 0]


def test_bad_budgets_are_user_errors():
    with pytest.raises(UserError, match="--fraction"):
        Budget("fraction", 1.5)
    with pytest.raises(UserError, match="--documents"):
        Budget("documents", 2.5)
    with pytest.raises(UserError, match="sampling"):
        select(np.ones(3), "lukewarm", Budget("documents", 1))
