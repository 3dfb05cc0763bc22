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
from megatron_cpt.evaluation.instruct import InstructConfig
from megatron_cpt.evaluation.perplexity import PerplexityConfig, evaluate_set
from megatron_cpt.evaluation.tasks_runner import TasksConfig, run_tasks, task_manager
from megatron_cpt.evaluation.tatqa_task import TatqaConfig


@dataclass
class EvaluateConfig:
    model: BackendSpec
    data: dict[str, list[str]] = field(default_factory=dict)  # set name -> JSONL paths/globs
    perplexity: PerplexityConfig = field(default_factory=PerplexityConfig)
    tasks: TasksConfig | None = None  # k-shot plain-prompt lm-eval tasks
    instruct: InstructConfig | None = None  # zero-shot chat-template classification
    tatqa: TatqaConfig | None = None  # k-shot TAT-QA generation


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
    if not cfg.data and cfg.tasks is None and cfg.instruct is None and cfg.tatqa is None:
        raise UserError(
            "nothing to evaluate: give --data NAME=PATH, --tasks, --instruct and/or --tatqa"
        )
    cfg.perplexity.validate()
    if cfg.instruct is not None:  # bad task names / missing files before the model loads
        cfg.instruct.validate()
        from megatron_cpt.evaluation.instruct import load_items

        for name in cfg.instruct.tasks:
            load_items(name, cfg.instruct)
    if cfg.tatqa is not None:
        cfg.tatqa.validate()
        cfg.tatqa.data_path()
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
            "instruct": asdict(cfg.instruct) if cfg.instruct else None,
            "tatqa": asdict(cfg.tatqa) if cfg.tatqa else None,
        },
    }
    for name, paths in cfg.data.items():
        result["perplexity"][name] = evaluate_set(backend, name, paths, cfg.perplexity).to_json()
    if cfg.tasks is not None:
        from megatron_cpt.evaluation.lm_eval_adapter import MegatronCPTLM

        lm = MegatronCPTLM(backend=backend, batch_size=cfg.perplexity.batch_size)
        result["tasks"] = run_tasks(lm, cfg.tasks, manager)
    if cfg.instruct is not None:
        from megatron_cpt.evaluation.instruct import run_instruct

        result["instruct"] = run_instruct(backend, cfg.instruct)
    if cfg.tatqa is not None:
        from megatron_cpt.evaluation.tatqa_task import run_tatqa

        result["tatqa"] = run_tatqa(backend, cfg.tatqa)
    check_finite(result)
    return result


def check_finite(result: dict) -> None:
    """A NaN/inf score means a broken model (NaN weights, overflow): an error, not a result.

    Writing ``NaN`` into the JSON would let a broken merge or checkpoint pass unnoticed into the
    report; the user needs to hear that the model itself is broken.
    """
    for section in ("perplexity", "tasks", "instruct", "tatqa"):
        for name, row in (result.get(section) or {}).items():
            if not isinstance(row, dict):
                continue
            for key, value in row.items():
                if isinstance(value, float) and not math.isfinite(value):
                    raise UserError(
                        f"{result.get('model')}: {key} on {name!r} is {value}; the model produces "
                        "non-finite outputs (NaN/inf weights?); no results written"
                    )


AXES = ("perplexity", "tasks", "instruct", "tatqa")


def evaluate_model(
    model: str,
    axes: tuple[str, ...] = ("perplexity", "instruct", "tatqa"),
    data: dict[str, list[str]] | None = None,
    perplexity: PerplexityConfig | None = None,
    tasks: TasksConfig | None = None,
    instruct: InstructConfig | None = None,
    tatqa: TatqaConfig | None = None,
    backend: Backend | None = None,
) -> dict:
    """Python entry point: one HF directory / ``.gguf`` file (or a loaded ``backend``) on the
    chosen axes, with each axis's defaults unless its config is given; the same results dict
    ``tools/evaluate.py`` writes. ``perplexity`` needs ``data`` (``{name: [paths]}``)."""
    unknown = [a for a in axes if a not in AXES]
    if unknown:
        raise UserError(f"axes: unknown {', '.join(unknown)}; choose from {', '.join(AXES)}")
    if "perplexity" in axes and not data:
        raise UserError("axes: 'perplexity' needs data={name: [jsonl paths]}")
    cfg = EvaluateConfig(
        model=BackendSpec(hf=model),
        data=dict(data or {}) if "perplexity" in axes else {},
        perplexity=perplexity or PerplexityConfig(),
        tasks=(tasks or TasksConfig(tasks=["finance"])) if "tasks" in axes else None,
        instruct=(instruct or InstructConfig()) if "instruct" in axes else None,
        tatqa=(tatqa or TatqaConfig()) if "tatqa" in axes else None,
    )
    return run_evaluation(cfg, backend=backend)


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
    for task, row in result.get("instruct", {}).items():
        lines.append(
            f"{task + ' (chat)':<24} n={row['samples']:<5} acc_ll {row['acc_ll']:.4f}  "
            f"f1_ll {row['f1_ll']:.4f}  acc_gen {row['acc_gen']:.4f}  f1_gen {row['f1_gen']:.4f}  "
            f"invalid {row['invalid_rate']:.4f}  chat_nll {row['chat_nll']:.4f}"
        )
    qa = result.get("tatqa")
    if qa:
        kinds = "  ".join(f"{k} {v['em']:.3f}/{v['f1']:.3f}" for k, v in qa["by_type"].items())
        lines.append(
            f"{'tatqa':<24} {qa['num_fewshot']}-shot n={qa['samples']}  em {qa['em']:.4f}  "
            f"f1 {qa['f1']:.4f}  scale {qa['scale_acc']:.4f}  (em/f1: {kinds})"
        )
    return lines
