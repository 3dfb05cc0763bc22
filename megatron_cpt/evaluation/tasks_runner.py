"""Run lm-eval tasks (ours in ``evaluation/tasks`` and lm-eval's own) on a backend, offline.

Results are flattened to ``{task: {metric: value, ..., "num_fewshot", "samples"}}`` so the
report can put base / CPT / merged side by side without knowing lm-eval's nested layout.
Nothing downloads: our finance tasks read local JSONL, and lm-eval's built-in tasks run only
where the user's HF datasets cache already holds them (``HF_DATASETS_OFFLINE=1`` is set).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from megatron_cpt.errors import UserError

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
FINANCE_TASKS = ("fpb", "fiqasa", "headlines")


@dataclass
class TasksConfig:
    tasks: list[str]  # task names, tags (finance, finance_5shot) or lm-eval groups
    num_fewshot: int | None = None  # None: each task's own default (0, or 5 for *_5shot)
    limit: int | float | None = None  # per task; lm-eval semantics (int = docs, <1 = fraction)
    data_dir: str | None = None  # finance JSONL dir; default $MEGATRON_CPT_FINANCE_DATA/shared
    seed: int = 1234  # few-shot sampling seed, so runs of base/CPT/merged see the same shots


def _own_task_names() -> set[str]:
    names = {p.stem for p in TASKS_DIR.glob("*.yaml") if not p.stem.startswith("_")}
    return names | {"finance", "finance_5shot"}


def task_manager(cfg: TasksConfig):
    """Validate task names and the finance data dir up front (before a model is loaded)."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from lm_eval.tasks import TaskManager

    if not cfg.tasks:
        raise UserError("--tasks: give at least one task")
    if cfg.num_fewshot is not None and cfg.num_fewshot < 0:
        raise UserError(f"--num-fewshot {cfg.num_fewshot}: must be >= 0")
    own = _own_task_names()
    if cfg.data_dir or any(t in own for t in cfg.tasks):
        from megatron_cpt.evaluation.tasks.utils import finance_data_dir

        finance_data_dir(cfg.data_dir)
    # indexing lm-eval's ~10k bundled YAMLs takes seconds; skip it when only ours are asked for
    defaults = not all(t in own for t in cfg.tasks)
    metadata = {"data_dir": cfg.data_dir} if cfg.data_dir else {}
    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=defaults, metadata=metadata)
    unknown = [t for t in cfg.tasks if t not in manager.all_tasks]
    if unknown:
        raise UserError(f"--tasks: unknown task(s) {', '.join(unknown)}")
    return manager


def run_tasks(lm, cfg: TasksConfig, manager=None) -> dict[str, dict]:
    """Evaluate an lm-eval ``LM`` (e.g. :class:`MegatronCPTLM`) on ``cfg.tasks``."""
    from lm_eval import simple_evaluate

    manager = manager or task_manager(cfg)
    out = simple_evaluate(
        model=lm,
        tasks=list(cfg.tasks),
        num_fewshot=cfg.num_fewshot,
        limit=cfg.limit,
        task_manager=manager,
        log_samples=False,
        bootstrap_iters=0,
        random_seed=cfg.seed,
        numpy_random_seed=cfg.seed,
        torch_random_seed=cfg.seed,
        fewshot_random_seed=cfg.seed,
    )
    return flatten_results(out)


def flatten_results(out: dict) -> dict[str, dict]:
    flat: dict[str, dict] = {}
    for task, metrics in out.get("results", {}).items():
        row: dict = {}
        for key, value in metrics.items():
            metric, _, filt = key.partition(",")
            if filt != "none" or metric.endswith("_stderr") or not isinstance(value, int | float):
                continue
            row[metric] = float(value)
        if not row:
            continue
        row["num_fewshot"] = out.get("n-shot", {}).get(task)
        row["samples"] = out.get("n-samples", {}).get(task, {}).get("effective")
        flat[task] = row
    return flat
