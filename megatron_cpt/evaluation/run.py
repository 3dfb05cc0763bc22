"""One evaluation of one model: perplexity/bpb sets and lm-eval tasks into one results JSON.

Base, CPT and merged models are evaluated by the same call with the same settings, and the
report diffs the files; keeping both kinds of score in one file per model is what makes that
diff a join on names instead of a search through lm-eval's output folders.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

from megatron_cpt.data.jsonl import expand_inputs
from megatron_cpt.errors import UserError
from megatron_cpt.evaluation.backend import Backend, BackendSpec, load_backend
from megatron_cpt.evaluation.perplexity import PerplexityConfig, evaluate_set
from megatron_cpt.evaluation.tasks_runner import TasksConfig, run_tasks, task_manager


@dataclass
class EvaluateConfig:
    model: BackendSpec
    data: dict[str, list[str]] = field(default_factory=dict)  # set name -> JSONL paths/globs
    perplexity: PerplexityConfig = field(default_factory=PerplexityConfig)
    tasks: TasksConfig | None = None


def parse_data_specs(specs: list[str]) -> dict[str, list[str]]:
    """``NAME=PATH[,PATH...]`` -> ``{NAME: [PATH, ...]}``; a bare PATH is named by its stem."""
    from pathlib import Path

    out: dict[str, list[str]] = {}
    for spec in specs:
        name, sep, paths = spec.partition("=")
        if not sep:
            name, paths = Path(spec).name.split(".")[0], spec
        name = name.strip()
        if not name or not paths:
            raise UserError(f"--data {spec!r}: expected NAME=PATH[,PATH...]")
        if name in out:
            raise UserError(f"--data {spec!r}: set name {name!r} given twice")
        out[name] = [p for p in paths.split(",") if p]
    return out


def run_evaluation(cfg: EvaluateConfig, backend: Backend | None = None) -> dict:
    if not cfg.data and cfg.tasks is None:
        raise UserError("nothing to evaluate: give --data NAME=PATH and/or --tasks")
    cfg.perplexity.validate()
    for name, paths in cfg.data.items():  # fail on a typo before minutes of model loading
        try:
            expand_inputs(paths)
        except UserError as exc:
            raise UserError(f"--data {name}: {exc}") from None
    manager = task_manager(cfg.tasks) if cfg.tasks is not None else None
    backend = backend or load_backend(cfg.model)
    result: dict = {
        "model": cfg.model.hf or cfg.model.megatron or backend.name,
        "backend": "hf" if cfg.model.hf else "megatron" if cfg.model.megatron else backend.name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "perplexity": {},
        "tasks": {},
        "config": {
            "model": asdict(cfg.model),
            "perplexity": asdict(cfg.perplexity),
            "tasks": asdict(cfg.tasks) if cfg.tasks else None,
        },
    }
    for name, paths in cfg.data.items():
        result["perplexity"][name] = evaluate_set(backend, name, paths, cfg.perplexity).to_json()
    if cfg.tasks is not None:
        from megatron_cpt.evaluation.lm_eval_adapter import MegatronCPTLM

        lm = MegatronCPTLM(backend=backend, batch_size=cfg.perplexity.batch_size)
        result["tasks"] = run_tasks(lm, cfg.tasks, manager)
    check_finite(result)
    return result


def check_finite(result: dict) -> None:
    """A NaN/inf score means a broken model (NaN weights, overflow): an error, not a result.

    Writing ``NaN`` into the JSON would let a broken merge or checkpoint pass unnoticed into the
    report; the user needs to hear that the model itself is broken.
    """
    for section in ("perplexity", "tasks"):
        for name, row in result.get(section, {}).items():
            for key, value in row.items():
                if isinstance(value, float) and not math.isfinite(value):
                    raise UserError(
                        f"{result.get('model')}: {key} on {name!r} is {value}; the model produces "
                        "non-finite outputs (NaN/inf weights?); no results written"
                    )


def is_main_process() -> bool:
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


def summary_lines(result: dict) -> list[str]:
    lines = []
    for name, row in result["perplexity"].items():
        lines.append(
            f"{name:<24} docs {row['docs']:>6}  tokens {row['tokens']:>9}  "
            f"ppl {row['ppl']:>9.3f}  bpb {row['bpb']:.4f}"
        )
    for task, row in result["tasks"].items():
        metrics = "  ".join(
            f"{k} {v:.4f}" for k, v in row.items() if k not in ("num_fewshot", "samples")
        )
        lines.append(f"{task:<24} {row.get('num_fewshot')}-shot n={row.get('samples')}  {metrics}")
    return lines
