"""TAT-QA metric on hand-worked cases (values worked out from the paper/official-script rules)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from megatron_cpt.evaluation import tatqa


def rec(answer, kind, scale=""):
    return {"answer": answer, "answer_type": kind, "scale": scale}


def test_number_parsing():
    assert tatqa.to_number("1,234.5") == 1234.5
    assert tatqa.to_number("1234.50") == 1234.5
    assert tatqa.to_number("(123)") == -123
    assert tatqa.to_number("$(1,024.3)") == -1024.3
    assert tatqa.to_number("12%") == 0.12
    assert tatqa.to_number("1.5 million") == 1_500_000
    assert tatqa.to_number("$(9.8) million") == -9_800_000
    assert tatqa.is_number("3 thousand") and not tatqa.is_number("3 apples")
    assert not tatqa.is_number("fixed-price")


def test_percent_vs_scale():
    gold = rec(-22.22, "arithmetic", "percent")  # renders as -0.2222
    assert tatqa.score(gold, ["-22.22%"], "") == {"em": 1.0, "f1": 1.0, "scale": 0.0}
    assert tatqa.score(gold, ["-22.22"], "percent")["em"] == 1.0
    # a bare fraction counts as the percentage it spells (official add_percent_pred)
    assert tatqa.score(gold, ["-0.2222"], "")["em"] == 1.0
    # the number without its percent is a different number
    assert tatqa.score(gold, ["-22.22"], "")["em"] == 0.0
    # a thousand-scale answer is not a percent answer
    assert tatqa.score(gold, ["-22.22"], "thousand")["em"] == 0.0


def test_thousands_separator_and_trailing_zero():
    gold = rec(["1,234.5"], "span", "thousand")
    assert tatqa.score(gold, ["1234.50"], "thousand") == {"em": 1.0, "f1": 1.0, "scale": 1.0}
    # the scale written in the answer text instead of the scale slot is the same number
    assert tatqa.score(gold, ["1,234.5 thousand"], "")["em"] == 1.0
    # missing scale: 1234.5 is not 1,234,500
    assert tatqa.score(gold, ["1,234.5"], "") == {"em": 0.0, "f1": 0.0, "scale": 0.0}


def test_negative_in_parentheses():
    gold = rec(-123, "arithmetic", "million")
    assert tatqa.score(gold, ["(123)"], "million")["em"] == 1.0
    assert tatqa.score(gold, ["123"], "million")["em"] == 0.0


def test_multi_span_order_and_partial_credit():
    gold = rec(["2019", "2018"], "multi-span")
    assert tatqa.score(gold, ["2018", "2019"], "")["em"] == 1.0
    # one of two year bags: precision 1, recall 1/2 -> F1 2/3, rounded to 0.67
    assert tatqa.score(gold, ["2019"], "") == {"em": 0.0, "f1": 0.67, "scale": 1.0}
    text = rec(["fixed-price type", "cost-plus type"], "multi-span")
    assert tatqa.score(text, ["Cost-plus type", "fixed-price type."], "")["em"] == 1.0


def test_span_f1_and_arithmetic_f1_is_em():
    gold = rec(["our allowable incurred costs"], "span")
    # "our allowable incurred costs" vs "allowable costs": 2 common, P=1, R=2/4 -> 0.67
    assert tatqa.score(gold, ["the allowable costs"], "") == {"em": 0.0, "f1": 0.67, "scale": 1.0}
    near = rec(1.5, "arithmetic")
    assert tatqa.score(near, ["1.6"], "") == {"em": 0.0, "f1": 0.0, "scale": 1.0}
    assert tatqa.score(rec("4", "count"), ["4"], "")["em"] == 1.0
    assert tatqa.score(rec("4", "count"), [], "")["em"] == 0.0


def test_bag_alignment_is_one_to_one():
    # two predicted bags cannot both match the same gold bag: mean over max(len) bags
    em, f1 = tatqa.em_f1(["net sales", "net sales"], ["net sales", "cost of sales"])
    # {net, sales} vs {net, sales} = 1; {net, sales} vs {cost, of, sales}: 1 common,
    # P=1/2, R=1/3 -> F1 0.4; mean over the two gold bags 0.7
    assert (em, f1) == (0.0, 0.7)


def test_parse_prediction_round_trips_format_answer():
    assert tatqa.parse_prediction(" 1,496.5 million\nQuestion: ...") == (["1,496.5"], "million")
    assert tatqa.parse_prediction("12.5%") == (["12.5%"], "")
    assert tatqa.parse_prediction("Answer: a; b.") == (["a", "b."], "")
    assert tatqa.parse_prediction("12.5.") == (["12.5"], "")
    assert tatqa.parse_prediction("1 thousand; 2 thousand") == (["1", "2"], "thousand")
    assert tatqa.parse_prediction("1 thousand; 2") == (["1 thousand", "2"], "")
    assert tatqa.parse_prediction("in thousands") == (["in thousands"], "")
    for record in (
        rec(["$1,496.5"], "span", "million"),
        rec(-22.22, "arithmetic", "percent"),
        rec(["2019", "2018"], "multi-span"),
        rec("4", "count"),
        rec(["fixed-price type", "cost-plus type"], "multi-span", "thousand"),
    ):
        spans, scale = tatqa.parse_prediction(tatqa.format_answer(record))
        result = tatqa.score(record, spans, scale)
        assert result["em"] == 1.0, (record, tatqa.format_answer(record), spans, scale)


def test_totals_per_answer_type():
    totals = tatqa.TatqaTotals()
    totals.add("span", {"em": 1.0, "f1": 1.0, "scale": 1.0})
    totals.add("span", {"em": 0.0, "f1": 0.5, "scale": 1.0})
    totals.add("count", {"em": 0.0, "f1": 0.0, "scale": 0.0})
    out = totals.summary()
    assert out["samples"] == 3 and out["em"] == pytest.approx(1 / 3)
    assert out["f1"] == pytest.approx(0.5) and out["scale_acc"] == pytest.approx(2 / 3)
    assert out["by_type"]["span"] == {"em": 0.5, "f1": 0.75, "samples": 2}
    assert "arithmetic" not in out["by_type"]


def test_every_gold_answer_in_the_dev_set_scores_itself():
    """The prompt rendering of each real gold answer parses back to an exact match."""
    path = Path(os.environ.get("MEGATRON_CPT_SHARED_DATA", "../shared/data")) / "tasks"
    path = path / "tatqa_dev.jsonl"
    if not path.exists():
        pytest.skip(f"{path} not present")
    misses = []
    for line in path.read_text().splitlines():
        record = json.loads(line)
        spans, scale = tatqa.parse_prediction(tatqa.format_answer(record))
        if tatqa.score(record, spans, scale)["em"] != 1.0:
            misses.append((record["answer"], record["scale"], tatqa.format_answer(record)))
    assert not misses, misses[:5]
