"""The evaluation-results JSON: written atomically by ``tools/evaluate.py``, read by the report.

One file per model (base, CPT, merged, ...)::

    {"model": "...", "backend": "hf" | "megatron", "created": "...",
     "perplexity": {SET: {"docs", "tokens", "bytes", "nll", "ppl", "bpb", ...}},
     "tasks": {TASK: {"acc", "f1", ..., "num_fewshot", "samples"}},
     "config": {...}}

A crash mid-write must never leave a truncated file that the report would then read as a
model with no scores, hence temp-file + rename.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

from megatron_cpt.errors import UserError

SET_FIELDS = ("tokens", "bytes", "nll", "ppl", "bpb")


def write_json_atomic(path: str | Path, obj) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates 0600; a results file is shared like any other output (0644 by umask)
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(obj, fh, indent=2, sort_keys=False, allow_nan=False)  # NaN is not JSON
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_results(path: str | Path) -> dict:
    """Read and check an evaluation JSON; problems name the file and the field."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: no such evaluation results file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path}: expected a JSON object of evaluation results")
    ppl = obj.get("perplexity", {})
    tasks = obj.get("tasks", {})
    if not isinstance(ppl, dict) or not isinstance(tasks, dict):
        raise UserError(f"{path}: 'perplexity' and 'tasks' must be objects")
    if not ppl and not tasks and not obj.get("instruct") and not obj.get("tatqa"):
        raise UserError(f"{path}: has no 'perplexity', 'tasks', 'instruct' or 'tatqa' results")
    for name, row in ppl.items():
        for field in SET_FIELDS:
            value = row.get(field) if isinstance(row, dict) else None
            if not isinstance(value, int | float) or not math.isfinite(value):
                raise UserError(f"{path}: perplexity.{name}.{field} missing or not a number")
    for name, row in tasks.items():
        if not isinstance(row, dict):
            raise UserError(f"{path}: tasks.{name} must be an object of metrics")
    return obj
