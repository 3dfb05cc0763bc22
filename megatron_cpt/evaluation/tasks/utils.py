"""Offline loaders and the macro-F1 aggregation for the finance task YAMLs in this folder.

The YAMLs stay static (usable as ``lm_eval --include_path``) while the data directory moves:
it comes from ``--metadata '{"data_dir": ...}'``, else ``$MEGATRON_CPT_FINANCE_DATA``, else
``../shared/data/tasks``. Records are read with the project's JSONL reader so a bad line is
reported as ``file:line: problem`` and an unknown label names the file, line and field.
"""

from __future__ import annotations

import os
from pathlib import Path

from megatron_cpt.errors import BadInputError, UserError

DATA_ENV = "MEGATRON_CPT_FINANCE_DATA"

SENTIMENT = ["negative", "neutral", "positive"]
YES_NO = ["no", "yes"]


def finance_data_dir(data_dir: str | None = None) -> Path:
    if data_dir is None:
        data_dir = os.environ.get(DATA_ENV)
    if data_dir is None:
        from megatron_cpt.assets import shared_data_dir

        shared = shared_data_dir()
        if shared is None:
            raise UserError(
                f"finance task data not found: set ${DATA_ENV} or pass "
                "--metadata '{\"data_dir\": DIR}' (DIR holds fpb.jsonl, fiqasa_*.jsonl, "
                "headlines.jsonl)"
            )
        return shared / "tasks"
    path = Path(data_dir).expanduser()
    if not path.is_dir():
        raise UserError(f"finance task data dir {path}: no such directory")
    return path


def _records(path: Path, labels: list[str], fields: tuple[str, ...]) -> list[dict]:
    from megatron_cpt.data.jsonl import get_text, iter_jsonl

    if not path.exists():
        raise UserError(f"{path}: no such file (finance task data)")
    rows = []
    for record in iter_jsonl([path]):
        row = {key: get_text(record, key) for key in (*fields, "label")}
        label = row["label"].strip().lower()
        if label not in labels:
            raise BadInputError(
                record.path,
                record.line,
                f"field 'label' is {row['label']!r}, expected one of {labels}",
                "bad_label",
            )
        row["gold"] = labels.index(label)
        rows.append(row)
    if not rows:
        raise UserError(f"{path}: no records")
    return rows


def _dataset(splits: dict[str, Path], labels: list[str], fields=("text",)):
    import datasets

    return datasets.DatasetDict(
        {
            name: datasets.Dataset.from_list(_records(path, labels, fields))
            for name, path in splits.items()
        }
    )


def load_fpb(data_dir: str | None = None, **_metadata):
    root = finance_data_dir(data_dir)
    return _dataset({"test": root / "fpb.jsonl"}, SENTIMENT)


def load_fiqasa(data_dir: str | None = None, **_metadata):
    root = finance_data_dir(data_dir)
    splits = {s: root / f"fiqasa_{s}.jsonl" for s in ("train", "valid", "test")}
    return _dataset(splits, SENTIMENT)


def load_headlines(data_dir: str | None = None, **_metadata):
    root = finance_data_dir(data_dir)
    return _dataset({"test": root / "headlines.jsonl"}, YES_NO, fields=("text", "question"))


def macro_f1(items) -> float:
    """Unweighted mean of per-class F1: minority classes (FPB negative) count as much as
    the majority, which accuracy on these skewed sets hides."""
    from sklearn.metrics import f1_score

    golds, preds = zip(*items)
    return float(f1_score(golds, preds, average="macro"))
