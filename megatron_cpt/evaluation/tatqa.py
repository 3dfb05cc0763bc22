"""TAT-QA's published metric (Zhu et al. 2021): exact match and numeracy-focused F1.

Written from the paper's definition and matched, case by case, to the behaviour of the official
``tatqa_metric.py`` / ``tatqa_utils.py`` (github NExTplusplus/TAT-QA), so scores are comparable
with published TAT-QA numbers:

- every answer (gold or predicted) is rendered to one string per its *scale*: a number becomes
  ``'%.4f' % (round(value, 2) * scale)`` (thousand = 1e3, million = 1e6, billion = 1e9,
  percent = 0.01); a number written with ``%`` is already a fraction and is not scaled again;
  a non-number gets the scale word appended;
- number normalisation: ``$ € £ ¥ % ( ) , [ ] ' "`` are ignored inside numbers, so
  ``"1,234.5"`` and ``"1234.50"`` are the same number; ``(123)`` is ``-123`` (accounting
  negatives; unlike the official pattern, also ``(1,024.3)``, ``($5)`` and
  ``$(9.8) million``); ``12%`` is ``0.12``; ``1.5 million`` is ``1500000``;
- a multi-span answer is sorted and joined, so span order does not matter;
- the strings are normalised DROP-style (lower case, punctuation and articles removed unless
  the token is a number) and compared by exact match and by bag-of-words F1, the F1 taken over
  an optimal one-to-one alignment of answer bags (Hungarian assignment);
- for ``arithmetic`` and ``count`` answers F1 equals exact match: a number is right or wrong;
- a bare predicted number with no scale also counts as a fraction of one (``0.2342`` matches
  gold ``23.42`` percent), as the official ``add_percent_pred`` does.

A generative model answers in text; :func:`parse_prediction` turns "1,496.5 million" or
"fixed-price; cost-plus" into the ``(answer, scale)`` pair the metric expects.
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterable, Sequence

import numpy as np

SCALES = ("", "thousand", "million", "billion", "percent")
ANSWER_TYPES = ("span", "multi-span", "arithmetic", "count")
SPAN_SEPARATOR = "; "  # how multi-span answers are written in prompts and split from generations

_NUM_NOISE = set("'\"\\$€£¥%(),[]")
_NUMBER = re.compile(r"([+-]?\d+(\.\d+)?)|([+-]?\.\d+)")
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = set(string.punctuation)


def scale_factor(scale: str) -> float:
    """The multiplier a scale word stands for (1 for none or an unknown word)."""
    s = scale.lower()
    for word, value in (
        ("hundred", 100),
        ("thousand", 1000),
        ("million", 1_000_000),
        ("billion", 1_000_000_000),
        ("percent", 0.01),
    ):
        if word in s:
            return value
    return 1


def _clean_num(text: str) -> str:
    return "".join(ch for ch in str(text) if ch not in _NUM_NOISE)


def is_number(text: str) -> bool:
    """A number, optionally followed by a scale word ("1,234", "(5.2)", "12%", "3 million")."""
    words = " ".join(_clean_num(w) for w in text.split()).split()
    if not words:
        return False
    try:
        value = float(words[0])
    except ValueError:
        return False
    if np.isnan(value):
        return False
    return len(words) < 2 or scale_factor(words[1]) != 1


def to_number(text: str) -> float | None:
    """The value of a number string with its sign, percent and scale word applied, 4 decimals."""
    groups = _NUMBER.findall(_clean_num(text))
    if not groups or groups[0][0] == "":
        return None
    raw = groups[0][0]
    num = float(raw) if "." in raw else int(raw)
    scale = 1
    # official: ``[\d.]+\s?[a-zA-Z]+``; a closing parenthesis is allowed before the word so
    # that "$(9.8) million" (a real dev-set answer) is -9.8e6, not -9.8
    for match in re.finditer(r"([\d.]+\)?\s?[a-zA-Z]+)", text):
        scale = scale_factor(match.group(0))
        break
    # the official pattern is ``\([\d.\s%]+\)``, which misses "(1,024.3)" and "($5)": the
    # thousands separator and currency signs are allowed here (a deliberate, tested deviation)
    sign = -1 if re.findall(r"(\([$€£¥\d.,\s%]+\))", text.strip()) else 1
    percent = 0.01 if re.findall(r"([\d.\s]+%)", text.strip()) else 1
    return round(num * scale * sign * percent, 4)


def normalize_answer(text: str) -> str:
    """DROP-style normalisation per space-separated token; numbers become their value."""
    parts = []
    for token in text.split(" "):
        token = token.lower()
        if not is_number(token):
            token = "".join(ch for ch in token if ch not in _PUNCT)
        if is_number(token):
            token = str(to_number(token))
        token = " ".join(_ARTICLES.sub(" ", token).split())
        if token.strip():
            parts.append(token)
    return " ".join(parts).strip()


def answer_string(answers: Sequence, scale: str) -> str:
    """One comparable string for an answer (list of spans or numbers) under its scale."""
    rendered = []
    for ans in sorted(str(a) for a in answers):
        if is_number(ans):
            value = to_number(ans)
            if value is None:
                rendered.append(f"{ans} {scale}" if scale else ans)
            elif "%" in ans:  # the answer itself is a percentage, already a fraction
                rendered.append(f"{value:.4f}")
            else:
                rendered.append(f"{round(value, 2) * scale_factor(scale):.4f}")
        else:
            rendered.append(f"{ans} {scale}" if scale else ans)
    return " ".join(rendered)


def _bag_f1(predicted: set[str], gold: set[str]) -> float:
    common = len(gold & predicted)
    precision = common / len(predicted) if predicted else 1.0
    recall = common / len(gold) if gold else 1.0
    if precision == 0.0 and recall == 0.0:
        return 0.0
    return 2 * precision * recall / (precision + recall)


def _align_bags(predicted: list[set[str]], gold: list[set[str]]) -> np.ndarray:
    """Best one-to-one alignment of predicted and gold bags; per-gold-bag F1 (unmatched = 0)."""
    from scipy.optimize import linear_sum_assignment

    scores = np.zeros((len(gold), len(predicted)))
    for g, gold_bag in enumerate(gold):
        for p, pred_bag in enumerate(predicted):
            scores[g, p] = _bag_f1(pred_bag, gold_bag)
    rows, cols = linear_sum_assignment(-scores)
    best = np.zeros(max(len(gold), len(predicted)))
    for r, c in zip(rows, cols):
        best[r] = max(best[r], scores[r, c])
    return best


def em_f1(predicted: str | Sequence[str], gold: str | Sequence[str]) -> tuple[float, float]:
    """Exact match and bag-of-spans F1 (rounded to 2 decimals) of two answer strings/lists."""
    pred_spans = [predicted] if isinstance(predicted, str) else list(predicted)
    gold_spans = [gold] if isinstance(gold, str) else list(gold)
    pred_norm = [normalize_answer(s) for s in pred_spans]
    gold_norm = [normalize_answer(s) for s in gold_spans]
    exact = float(set(pred_norm) == set(gold_norm) and len(pred_norm) == len(gold_norm))
    f1 = float(
        np.mean(
            _align_bags([set(s.split()) for s in pred_norm], [set(s.split()) for s in gold_norm])
        )
    )
    return exact, round(f1, 2)


def gold_answers(record: dict) -> list[str]:
    """The gold answer of a TAT-QA record as a list of strings (count answers as integers)."""
    answer = record["answer"]
    kind = record["answer_type"]
    if kind in ("span", "multi-span"):
        return [str(a) for a in (answer if isinstance(answer, list) else [answer])]
    if kind == "count":
        return [str(int(float(answer)))]
    return [str(answer)]


def score(record: dict, prediction: str | Sequence[str] | None, pred_scale: str = "") -> dict:
    """EM, F1 and scale match of one prediction against one TAT-QA record."""
    scale_ok = float(pred_scale == record["scale"])
    if not prediction:
        return {"em": 0.0, "f1": 0.0, "scale": scale_ok}
    preds = [prediction] if isinstance(prediction, str) else list(prediction)
    gold = answer_string(gold_answers(record), record["scale"])
    candidates = [answer_string(preds, pred_scale)]
    if len(preds) == 1 and not pred_scale and "%" not in preds[0] and is_number(preds[0]):
        value = to_number(preds[0])  # a bare fraction may be a percentage written as 0.xx
        if value is not None:
            candidates.append(f"{value:.4f}")
    em, f1 = max(em_f1(c, gold) for c in candidates)
    if record["answer_type"] in ("arithmetic", "count"):
        f1 = em
    return {"em": em, "f1": f1, "scale": scale_ok}


_SCALE_SUFFIX = re.compile(r"\s*\b(thousand|million|billion|percent)s?\s*$", re.IGNORECASE)


def _strip_period(span: str) -> str:
    """Drop a sentence-final period only where it breaks a number ("12.5." -> "12.5")."""
    bare = span.rstrip(".").strip()
    return bare if is_number(bare) and not is_number(span) else span


def parse_prediction(text: str) -> tuple[list[str], str]:
    """A generated answer -> (spans, scale), the pair the official metric scores.

    First line only; spans split on ``;``; a scale word ending *every* span goes to the scale
    slot, as a TAT-QA model predicts it: "1,496.5 million" -> (["1,496.5"], "million"),
    "1 thousand; 2 thousand" -> (["1", "2"], "thousand"). "12.5%" keeps its ``%`` (the number
    parser makes it 0.125), "a; b" -> (["a", "b"], "").
    """
    line = text.strip().split("\n")[0].strip()
    if line.lower().startswith("answer:"):
        line = line[len("answer:") :].strip()
    spans = [s.strip() for s in line.split(SPAN_SEPARATOR.strip())]
    spans = [_strip_period(s) for s in spans if s]
    matches = [_SCALE_SUFFIX.search(s) for s in spans]
    scale = ""
    if spans and all(matches) and len({m.group(1).lower() for m in matches}) == 1:
        bare = [s[: m.start()].strip() for s, m in zip(spans, matches)]
        if all(is_number(b) for b in bare):  # "in thousands" stays a span
            scale, spans = matches[0].group(1).lower(), bare
    return [s for s in spans if s], scale


def format_answer(record: dict) -> str:
    """A gold answer as written in a few-shot prompt (the form :func:`parse_prediction` reads).

    The scale word follows every span ("1,234 thousand; 5,678 thousand"); a percent number is
    written with ``%``.
    """
    scale = record["scale"]
    out = []
    for span in gold_answers(record):
        if scale == "percent" and is_number(span):
            out.append(span if "%" in span else span + "%")
        elif scale:
            out.append(f"{span} {scale}")
        else:
            out.append(span)
    return SPAN_SEPARATOR.join(out)


class TatqaTotals:
    """Running EM/F1/scale sums, overall and per answer type."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, dict]] = []

    def add(self, answer_type: str, result: dict) -> None:
        self.rows.append((answer_type, result))

    def summary(self) -> dict:
        def mean(rows: Iterable[dict], key: str) -> float:
            rows = list(rows)
            return float(sum(r[key] for r in rows) / len(rows)) if rows else float("nan")

        out = {
            "em": mean((r for _, r in self.rows), "em"),
            "f1": mean((r for _, r in self.rows), "f1"),
            "scale_acc": mean((r for _, r in self.rows), "scale"),
            "samples": len(self.rows),
            "by_type": {},
        }
        for kind in ANSWER_TYPES:
            rows = [r for t, r in self.rows if t == kind]
            if rows:
                out["by_type"][kind] = {
                    "em": mean(rows, "em"),
                    "f1": mean(rows, "f1"),
                    "samples": len(rows),
                }
        return out
