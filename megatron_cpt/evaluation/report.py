"""The CPT report: did the domain get better, and what did general ability lose?

Reads training runs (``metrics.jsonl`` from :mod:`megatron_cpt.training.logging`, or the
TensorBoard event files it also writes) and evaluation JSONs (:mod:`.results`) of base / CPT /
merged models, and writes ``report.md`` with PNG plots: training loss, per-dataset validation
loss split into domain vs general, and a side-by-side comparison with deltas against the first
model given (the base). Which sets are "general" is decided by name patterns (replay corpora
such as wikitext, RedPajama, FineWeb by default; ``--general`` overrides), because the trainer
and the evaluator only know set names, not their role in CPT.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from megatron_cpt.errors import BadInputError, UserError
from megatron_cpt.evaluation.results import load_results
from megatron_cpt.output_paths import check_output_dir

DEFAULT_GENERAL = [
    "*general*",
    "*wiki*",
    "*replay*",
    "*redpajama*",
    "*pile*",
    "*c4*",
    "*fineweb*",
    "*slimpajama*",
    "*dolma*",
    "*web*",
]
LOWER_IS_BETTER = {"ppl", "bpb", "nll", "word_perplexity", "byte_perplexity", "bits_per_byte"}


@dataclass
class ReportConfig:
    runs: list[str] = field(default_factory=list)  # RUN_DIR or LABEL=RUN_DIR
    evals: list[str] = field(default_factory=list)  # LABEL=results.json, base first
    out_dir: str = "report"
    general: list[str] = field(default_factory=lambda: list(DEFAULT_GENERAL))  # fnmatch, lower
    title: str = "Continual pre-training report"
    smooth: float = 0.9  # EMA weight for the smoothed training-loss line (0 = none)
    dpi: int = 120


# -- inputs -----------------------------------------------------------------------------------


@dataclass
class RunMetrics:
    label: str
    path: str
    train: list[dict]  # sorted by iteration, one record per iteration (a resume's re-log wins)
    valid: dict[str, list[tuple[int, float]]]  # set name -> [(iteration, lm_loss)]
    source: str  # metrics.jsonl | tensorboard


def _label_spec(spec: str, what: str) -> tuple[str | None, str]:
    label, sep, path = spec.partition("=")
    if not sep:
        return None, spec
    if not label or not path:
        raise UserError(f"{what} {spec!r}: expected LABEL=PATH")
    return label, path


def read_metrics_jsonl(path: Path) -> tuple[list[dict], dict[str, list[tuple[int, float]]]]:
    from megatron_cpt.data.jsonl import iter_jsonl

    train: dict[int, dict] = {}
    valid: dict[str, dict[int, float]] = {}
    for rec in iter_jsonl([path]):
        obj, kind = rec.obj, rec.obj.get("kind")
        it = obj.get("iteration")
        if kind not in ("train", "valid"):
            continue  # other kinds (future additions) are not ours to judge
        if not isinstance(it, int):
            raise BadInputError(
                rec.path, rec.line, "field 'iteration' missing or not an integer", "bad_field"
            )
        loss = obj.get("lm_loss")
        if loss is not None and not isinstance(loss, int | float):
            raise BadInputError(rec.path, rec.line, "field 'lm_loss' is not a number", "bad_field")
        if kind == "train":
            train[it] = obj
        else:
            name = obj.get("name")
            if not isinstance(name, str):
                raise BadInputError(
                    rec.path, rec.line, "field 'name' missing on a valid record", "bad_field"
                )
            if loss is not None and math.isfinite(loss):
                valid.setdefault(name, {})[it] = float(loss)
    return (
        [train[i] for i in sorted(train)],
        {name: sorted(points.items()) for name, points in valid.items()},
    )


def read_tensorboard(run_dir: Path) -> tuple[list[dict], dict[str, list[tuple[int, float]]]]:
    """The same curves from the trainer's TensorBoard scalars (``lm loss``, ``NAME lm loss``)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train: dict[int, dict] = {}
    valid: dict[str, dict[int, float]] = {}
    dirs = sorted({p.parent for p in run_dir.rglob("events.out.tfevents.*")})
    for d in dirs:
        acc = EventAccumulator(str(d), size_guidance={"scalars": 0})
        acc.Reload()
        tags = acc.Tags().get("scalars", [])
        for tag in tags:
            if tag == "lm loss":
                for ev in acc.Scalars(tag):
                    train.setdefault(ev.step, {"kind": "train", "iteration": ev.step})[
                        "lm_loss"
                    ] = ev.value
            elif tag == "tokens-per-second":
                for ev in acc.Scalars(tag):
                    train.setdefault(ev.step, {"kind": "train", "iteration": ev.step})[
                        "tokens_per_s"
                    ] = ev.value
            elif tag.endswith(" lm loss") and tag != "lm loss vs samples":
                name = tag[: -len(" lm loss")]
                for ev in acc.Scalars(tag):
                    if math.isfinite(ev.value):
                        valid.setdefault(name, {})[ev.step] = float(ev.value)
    return (
        [train[i] for i in sorted(train)],
        {name: sorted(points.items()) for name, points in valid.items()},
    )


def load_run(spec: str) -> RunMetrics:
    label, path = _label_spec(spec, "RUN_DIR")
    p = Path(path).expanduser()
    if p.is_file():
        train, valid = read_metrics_jsonl(p)
        source, p_dir = "metrics.jsonl", p.parent
    elif (p / "metrics.jsonl").exists():
        train, valid = read_metrics_jsonl(p / "metrics.jsonl")
        source, p_dir = "metrics.jsonl", p
    elif p.is_dir() and any(p.rglob("events.out.tfevents.*")):
        train, valid = read_tensorboard(p)
        source, p_dir = "tensorboard", p
    elif p.exists():
        raise UserError(f"{p}: no metrics.jsonl or TensorBoard event files (not a run directory?)")
    else:
        raise UserError(f"{p}: no such run directory")
    if not train and not valid:
        raise UserError(f"{p}: the run logged no train or valid records yet")
    return RunMetrics(label or p_dir.name, str(p), train, valid, source)


def is_general(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatch(name.lower(), pat.lower()) for pat in patterns)


# -- plots ------------------------------------------------------------------------------------


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _ema(values: list[float], weight: float) -> list[float]:
    """TensorBoard's debiased EMA, its window capped at a tenth of the run so a short run's
    smoothed line does not lag behind the raw one."""
    weight = min(weight, max(0.0, 1 - 10 / max(len(values), 1)))
    out, acc = [], 0.0
    for i, v in enumerate(values, start=1):
        acc = weight * acc + (1 - weight) * v
        out.append(acc / (1 - weight**i) if weight > 0 else v)
    return out


def plot_training_loss(runs: list[RunMetrics], path: Path, cfg: ReportConfig) -> bool:
    curves = [
        (r, [(t["iteration"], t["lm_loss"]) for t in r.train if t.get("lm_loss") is not None])
        for r in runs
    ]
    curves = [(r, pts) for r, pts in curves if pts]
    if not curves:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (run, pts) in enumerate(curves):
        xs, ys = zip(*pts)
        color = colors[i % len(colors)]
        smoothed = cfg.smooth > 0 and len(ys) > 5
        ax.plot(xs, ys, color=color, alpha=0.3 if smoothed else 1.0, linewidth=1,
                label=None if smoothed else run.label)  # fmt: skip
        if smoothed:
            ax.plot(xs, _ema(list(ys), cfg.smooth), color=color, linewidth=2,
                    label=f"{run.label} (smoothed)")  # fmt: skip
    ax.set_title("Training loss")
    ax.set_xlabel("iteration")
    ax.set_ylabel("lm loss (nats/token)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=cfg.dpi)
    plt.close(fig)
    return True


def plot_validation(runs: list[RunMetrics], path: Path, cfg: ReportConfig) -> bool:
    series = [(r, name, pts) for r in runs for name, pts in sorted(r.valid.items()) if pts]
    if not series:
        return False
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    panels = {False: axes[0][0], True: axes[0][1]}
    used = {False: 0, True: 0}
    for i, (run, name, pts) in enumerate(series):
        general = is_general(name, cfg.general)
        ax = panels[general]
        xs, ys = zip(*pts)
        label = name if len(runs) == 1 else f"{run.label}: {name}"
        ax.plot(xs, ys, marker="o", markersize=3, color=colors[i % len(colors)],
                linestyle="--" if general else "-", label=label)  # fmt: skip
        used[general] += 1
    for general, ax in panels.items():
        ax.set_title("General (replay) validation loss — forgetting" if general
                      else "Domain validation loss — adaptation")  # fmt: skip
        ax.set_xlabel("iteration")
        ax.set_ylabel("lm loss (nats/token)")
        ax.grid(True, alpha=0.3)
        if used[general]:
            ax.legend(fontsize=8)
        else:
            ax.text(
                0.5, 0.5, "no sets in this group", ha="center", va="center", transform=ax.transAxes
            )
    fig.tight_layout()
    fig.savefig(path, dpi=cfg.dpi)
    plt.close(fig)
    return True


def plot_comparison(models: list[tuple[str, dict]], path: Path, cfg: ReportConfig) -> bool:
    import numpy as np

    sets = _ordered_keys(m["perplexity"] for _, m in models)
    task_metrics = [
        (task, metric)
        for task in _ordered_keys(m["tasks"] for _, m in models)
        for metric in _ordered_keys(m["tasks"].get(task, {}) for _, m in models)
        if metric not in ("num_fewshot", "samples")
        and metric not in LOWER_IS_BETTER
        # bars share a 0-1 axis; unbounded task metrics (word_perplexity) stay in the table
        and all(
            0.0 <= v <= 1.0
            for _, m in models
            if isinstance(v := m["tasks"].get(task, {}).get(metric), int | float)
        )
    ]
    panels = [p for p in ("ppl", "bpb") if sets] + (["tasks"] if task_metrics else [])
    if not panels:
        return False
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.8), squeeze=False)
    width = 0.8 / len(models)
    for ax, panel in zip(axes[0], panels):
        if panel == "tasks":
            groups = [f"{t}\n{m}" for t, m in task_metrics]
            values = [[m["tasks"].get(t, {}).get(k) for t, k in task_metrics] for _, m in models]
            ax.set_title("Task scores (higher is better)")
            ax.set_ylabel("score")
        else:
            groups = [
                f"{s}\n({'general' if is_general(s, cfg.general) else 'domain'})" for s in sets
            ]
            values = [[m["perplexity"].get(s, {}).get(panel) for s in sets] for _, m in models]
            present = [v for row in values for v in row if v]
            if panel == "ppl" and present and max(present) / min(present) > 20:
                ax.set_yscale("log")  # a random-init base next to a trained model
            ax.set_title(
                {"ppl": "Perplexity (lower is better)", "bpb": "Bits per byte (lower is better)"}[
                    panel
                ]
            )
            ax.set_ylabel({"ppl": "perplexity (per token)", "bpb": "bits per UTF-8 byte"}[panel])
        x = np.arange(len(groups))
        for j, (label, _) in enumerate(models):
            vals = [np.nan if v is None else v for v in values[j]]
            bars = ax.bar(x + (j - (len(models) - 1) / 2) * width, vals, width, label=label)
            ax.bar_label(bars, labels=[_fmt(v) for v in values[j]], fontsize=7, padding=1)
        ax.set_xticks(x, groups, fontsize=8)
        ax.grid(True, axis="y", alpha=0.3)
        top = max((v for row in values for v in row if v is not None), default=1.0)
        if ax.get_yscale() == "log":
            ax.set_ylim(top=top * 5)  # headroom for labels and legend
        else:
            ax.set_ylim(0, (1.0 if panel == "tasks" else top) * 1.25)
        ax.legend(fontsize=8, loc="upper left", ncol=len(models))
    fig.suptitle(" vs ".join(label for label, _ in models))
    fig.tight_layout()
    fig.savefig(path, dpi=cfg.dpi)
    plt.close(fig)
    return True


# -- tables -----------------------------------------------------------------------------------


def _ordered_keys(dicts) -> list[str]:
    seen: dict[str, None] = {}
    for d in dicts:
        for k in d:
            seen.setdefault(k, None)
    return list(seen)


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.1f}" if abs(v) >= 1000 else f"{v:.3f}"
    return str(v)


def _delta(new, old, metric: str) -> str:
    if new is None or old is None:
        return "–"
    lower = metric in LOWER_IS_BETTER
    diff = new - old
    if metric in ("ppl", "bpb") and old:
        text = f"{100 * diff / old:+.1f}%"
    else:
        text = f"{diff:+.3f}"
    if abs(diff) < 1e-12:
        return text
    better = diff < 0 if lower else diff > 0
    return f"{text} {'better' if better else 'worse'}"


def _geomean(values: list[float]) -> float | None:
    values = [v for v in values if v is not None and v > 0]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else None


def comparison_rows(
    models: list[tuple[str, dict]], cfg: ReportConfig
) -> list[tuple[str, str, list]]:
    """``(row label, metric kind, [value per model])`` for the table, headline rows first."""
    rows = []
    sets = _ordered_keys(m["perplexity"] for _, m in models)
    for group in ("domain", "general"):
        members = [s for s in sets if is_general(s, cfg.general) == (group == "general")]
        if len(members) > 1:  # a summary of one set would repeat that set's rows
            rows.append((f"**{group} bpb** (mean of {len(members)} set(s))", "bpb",
                         [_mean([m["perplexity"].get(s, {}).get("bpb") for s in members]) for _, m in models]))  # fmt: skip
            rows.append((f"**{group} ppl** (geo-mean)", "ppl",
                         [_geomean([m["perplexity"].get(s, {}).get("ppl") for s in members]) for _, m in models]))  # fmt: skip
    for s in sets:
        group = "general" if is_general(s, cfg.general) else "domain"
        for metric in ("ppl", "bpb"):
            rows.append(
                (
                    f"{s} {metric} ({group})",
                    metric,
                    [m["perplexity"].get(s, {}).get(metric) for _, m in models],
                )
            )
    for task in _ordered_keys(m["tasks"] for _, m in models):
        for metric in _ordered_keys(m["tasks"].get(task, {}) for _, m in models):
            if metric in ("num_fewshot", "samples"):
                continue
            shots = next(
                (m["tasks"][task].get("num_fewshot") for _, m in models if task in m["tasks"]), None
            )
            label = f"{task} {metric}" + (f" ({shots}-shot)" if shots is not None else "")
            rows.append((label, metric, [m["tasks"].get(task, {}).get(metric) for _, m in models]))
    return rows


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def _run_summary(run: RunMetrics, cfg: ReportConfig) -> list[str]:
    losses = [t["lm_loss"] for t in run.train if t.get("lm_loss") is not None]
    tail = losses[-max(1, len(losses) // 10) :] if losses else []
    last = run.train[-1] if run.train else {}
    tps = sorted(
        t["tokens_per_s"] for t in run.train if isinstance(t.get("tokens_per_s"), int | float)
    )
    rows = [
        ["source", run.source],
        ["iterations logged", str(len(run.train))],
        ["last iteration", str(last.get("iteration", "–"))],
        ["consumed samples", str(last.get("consumed_samples", "–"))],
        [
            "first → final train loss",
            f"{_fmt(losses[0])} → {_fmt(sum(tail) / len(tail))} (mean of last {len(tail)})"
            if losses
            else "–",
        ],
        ["median tokens/s", _fmt(tps[len(tps) // 2]) if tps else "–"],
        ["skipped iterations", str(last.get("skipped_iters", "–"))],
        ["elapsed (s)", _fmt(last.get("elapsed_s"))],
    ]
    lines = [f"### Run `{run.label}`", "", *_md_table(["", ""], rows), ""]
    if run.valid:
        vrows = []
        for name, pts in sorted(run.valid.items()):
            (i0, l0), (i1, l1) = pts[0], pts[-1]
            group = "general" if is_general(name, cfg.general) else "domain"
            vrows.append([name, group, f"{_fmt(l0)} @ {i0}", f"{_fmt(l1)} @ {i1}",
                          _delta(l1, l0, "nll"), _fmt(math.exp(min(l1, 50)))])  # fmt: skip
        lines += _md_table(
            ["validation set", "group", "first loss", "last loss", "Δ loss", "last ppl"], vrows
        )
        lines.append("")
    return lines


# -- the report -------------------------------------------------------------------------------


def build_report(cfg: ReportConfig) -> Path:
    if not cfg.runs and not cfg.evals:
        raise UserError("nothing to report: give RUN_DIR(s) and/or --eval LABEL=results.json")
    if not 0 <= cfg.smooth < 1:
        raise UserError(f"--smooth {cfg.smooth}: must be in [0, 1) (0 = no smoothing)")
    check_output_dir(cfg.out_dir, "--out")
    runs = [load_run(spec) for spec in cfg.runs]
    models: list[tuple[str, dict]] = []
    for spec in cfg.evals:
        label, path = _label_spec(spec, "--eval")
        label = label or Path(path).stem
        if label in {m[0] for m in models}:
            raise UserError(f"--eval {spec!r}: label {label!r} given twice")
        models.append((label, load_results(path)))

    out = Path(cfg.out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        md = [f"# {cfg.title}", ""]
        if runs:
            md += ["## Training", ""]
            if plot_training_loss(runs, tmp / "train_loss.png", cfg):
                md += ["![Training loss](train_loss.png)", ""]
            if plot_validation(runs, tmp / "valid_loss.png", cfg):
                md += [
                    "![Validation loss, domain vs general](valid_loss.png)",
                    "",
                    "Domain sets (left) should fall; general/replay sets (right, dashed) show "
                    "forgetting when they rise.",
                    "",
                ]
            for run in runs:
                md += _run_summary(run, cfg)
        if models:
            md += _comparison_section(models, tmp, cfg)
            from megatron_cpt.evaluation.report_tasks import instruct_section

            md += instruct_section(models, tmp, cfg.dpi)
        md += [
            "---",
            f"General (replay) sets are those matching: `{', '.join(cfg.general)}`; all others "
            "are domain sets. Deltas are against the first model. bpb = summed NLL / ln 2 / UTF-8 "
            "bytes, comparable across tokenizers.",
            "",
        ]
        (tmp / "report.md").write_text("\n".join(md), encoding="utf-8")
        out.mkdir(parents=True, exist_ok=True)
        for f in sorted(tmp.iterdir(), key=lambda p: p.name == "report.md"):  # report.md last
            os.replace(f, out / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out / "report.md"


def _comparison_section(models: list[tuple[str, dict]], tmp: Path, cfg: ReportConfig) -> list[str]:
    base = models[0][0]
    md = ["## Base vs CPT vs merged", ""]
    md += _md_table(
        ["model", "source"], [[label, f"`{m.get('model', '?')}`"] for label, m in models]
    )
    md.append("")
    rows = comparison_rows(models, cfg)
    header = [
        "metric",
        *[label for label, _ in models],
        *[f"Δ {label} vs {base}" for label, _ in models[1:]],
    ]
    body = [
        [label, *[_fmt(v) for v in values], *[_delta(v, values[0], metric) for v in values[1:]]]
        for label, metric, values in rows
    ]
    md += _md_table(header, body)
    md.append("")
    if plot_comparison(models, tmp / "comparison.png", cfg):
        md += ["![Base vs CPT vs merged](comparison.png)", ""]
    md += _settings_note(models)
    return md


def _settings_note(models: list[tuple[str, dict]]) -> list[str]:
    """Numbers are only comparable under the same evaluation settings: say so when they differ."""
    settings = {
        label: json.dumps(
            {
                k: (m.get("config") or {}).get("perplexity", {}).get(k)
                for k in ("seq_length", "stride", "max_docs", "prefix")
            },
            sort_keys=True,
        )  # fmt: skip
        for label, m in models
    }
    if len(set(settings.values())) > 1:
        return ["**Warning:** perplexity settings differ between models: "
                + "; ".join(f"{k}: `{v}`" for k, v in settings.items()), ""]  # fmt: skip
    return []
