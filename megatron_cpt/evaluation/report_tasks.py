"""The report's "instruction & tasks" section: what CPT forgot and what the merge restored.

Perplexity alone cannot show why Llama-3-SEC merges the CPT model back onto the instruct model:
raw prose of any kind lowers an instruct model's raw-text loss. This section puts the axes that
can show it side by side for base / CPT / merged (the order the ``--eval`` files are given):
chat-template instruction following (label log-likelihood, parsed generations, invalid-answer
rate, chat-format NLL) and TAT-QA numeric QA (EM / F1, per answer type), with deltas, a chart,
and a plain reading. A difference is called a change only when it exceeds twice the standard
error of a difference of two proportions on the sample size (the subsets are small: 100-200
items), so the reading does not narrate noise.
"""

from __future__ import annotations

import math
from pathlib import Path

# metric -> (label, higher is better, is a proportion)
INSTRUCT_METRICS = {
    "acc_ll": ("accuracy, label likelihood", True, True),
    "f1_ll": ("macro-F1, label likelihood", True, False),
    "acc_gen": ("accuracy, generated answer", True, True),
    "f1_gen": ("macro-F1, generated answer", True, False),
    "invalid_rate": ("invalid answers (not a label)", False, True),
    "chat_nll": ("chat-format answer NLL / token", False, False),
}
TATQA_METRICS = {"em": ("exact match", True, True), "f1": ("F1", True, False),
                 "scale_acc": ("scale accuracy", True, True)}  # fmt: skip


def axis_rows(models: list[tuple[str, dict]]) -> list[tuple[str, str, bool, bool, int, list]]:
    """``(label, metric, higher_is_better, is_proportion, n, [value per model])``."""
    rows = []
    tasks: dict[str, None] = {}
    for _, m in models:
        for t in m.get("instruct") or {}:
            tasks.setdefault(t, None)
    for task in tasks:
        n = min((m.get("instruct") or {}).get(task, {}).get("samples") or 0 for _, m in models)
        for key, (text, higher, prop) in INSTRUCT_METRICS.items():
            values = [(m.get("instruct") or {}).get(task, {}).get(key) for _, m in models]
            rows.append((f"{task} (chat, 0-shot): {text}", key, higher, prop, n, values))
    if any(m.get("tatqa") for _, m in models):
        qa = [m.get("tatqa") or {} for _, m in models]
        shots = next((q.get("num_fewshot") for q in qa if q), None)
        n = min(q.get("samples") or 0 for q in qa)
        for key, (text, higher, prop) in TATQA_METRICS.items():
            rows.append((f"TAT-QA ({shots}-shot): {text}", key, higher, prop, n,
                         [q.get(key) for q in qa]))  # fmt: skip
        kinds: dict[str, None] = {}
        for q in qa:
            for k in q.get("by_type") or {}:
                kinds.setdefault(k, None)
        for kind in kinds:
            per = [(q.get("by_type") or {}).get(kind, {}) for q in qa]
            nk = min(p.get("samples") or 0 for p in per)
            rows.append((f"TAT-QA {kind} (n={nk}): exact match", "em", True, True, nk,
                         [p.get("em") for p in per]))  # fmt: skip
            rows.append((f"TAT-QA {kind} (n={nk}): F1", "f1", True, False, nk,
                         [p.get("f1") for p in per]))  # fmt: skip
    return rows


def noise(a: float | None, b: float | None, n: int, proportion: bool) -> float | None:
    """Two standard errors of the difference of two proportions on ``n`` items each."""
    if not proportion or a is None or b is None or n < 1:
        return None
    p = min(max((a + b) / 2, 1 / n), 1 - 1 / n) if n > 1 else 0.5
    return 2 * math.sqrt(2 * p * (1 - p) / n)


def _changed(new, old, higher: bool, tol: float | None) -> int:
    """+1 better, -1 worse, 0 no (significant) change."""
    if new is None or old is None:
        return 0
    diff = new - old
    if abs(diff) <= (tol if tol is not None else 1e-9):
        return 0
    return 1 if (diff > 0) == higher else -1


def reading(models: list[tuple[str, dict]], rows) -> list[str]:
    """Plain sentences: forgotten by CPT (model 2 vs model 1), restored by the merge (model 3)."""
    if len(models) < 2:
        return []
    base, cpt = models[0][0], models[1][0]
    merged = models[2][0] if len(models) > 2 else None
    forgot, gained, restored, kept_loss, same = [], [], [], [], 0
    for label, _, higher, prop, n, values in rows:
        b, c = values[0], values[1]
        step = _changed(c, b, higher, noise(c, b, n, prop))
        if step == 0:
            same += 1
            continue
        text = f"{label} {b:.3f} → {c:.3f}"
        if step < 0:
            if merged is not None and values[2] is not None:
                m = values[2]
                back = (m - c) / (b - c) if b != c else 0.0
                text += f" ({merged}: {m:.3f}, {100 * back:.0f}% of the loss recovered)"
                (restored if back >= 0.5 else kept_loss).append(text)
            else:
                forgot.append(text)
        else:
            gained.append(text)
    out = [f"**Reading** ({base} → {cpt}" + (f" → {merged}" if merged else "") + "; a change "
           "counts only beyond twice the sampling standard error where the metric is a "
           "proportion):", ""]  # fmt: skip
    if restored:
        out += [f"- Forgotten by {cpt} and restored by {merged}: " + "; ".join(restored) + "."]
    if kept_loss:
        out += [f"- Forgotten by {cpt}, not (or less than half) restored by {merged}: "
                + "; ".join(kept_loss) + "."]  # fmt: skip
    if forgot:
        out += [f"- Forgotten by {cpt}: " + "; ".join(forgot) + "."]
    if gained:
        out += [f"- Improved by {cpt}: " + "; ".join(gained) + "."]
    if not (restored or kept_loss or forgot or gained):
        out += [f"- No metric of these axes changed beyond sampling noise from {base} to {cpt}."]
    out += [f"- {same} of {len(rows)} metrics did not change beyond noise.", ""]
    return out


def plot_axes(models: list[tuple[str, dict]], path: Path, dpi: int = 120) -> bool:
    """Bars per model: chat accuracy (likelihood / generated), invalid rate, TAT-QA by type."""
    import numpy as np

    from megatron_cpt.evaluation.report import _fmt, _plt

    def chat(task, metric):
        return lambda m: (m.get("instruct") or {}).get(task, {}).get(metric)

    def qa(kind, metric):
        if kind is None:
            return lambda m: (m.get("tatqa") or {}).get(metric)
        return lambda m: (m.get("tatqa") or {}).get("by_type", {}).get(kind, {}).get(metric)

    tasks = list(dict.fromkeys(t for _, m in models for t in (m.get("instruct") or {})))
    panels = []  # (title, [(x label, value getter)])
    if tasks:
        panels.append(("Chat instructions: accuracy (higher is better)",
                       [(f"{t}\nlikelihood", chat(t, "acc_ll")) for t in tasks]
                       + [(f"{t}\ngenerated", chat(t, "acc_gen")) for t in tasks]))  # fmt: skip
        panels.append(("Invalid generated answers (lower is better)",
                       [(t, chat(t, "invalid_rate")) for t in tasks]))  # fmt: skip
    if any(m.get("tatqa") for _, m in models):
        kinds = list(dict.fromkeys(k for _, m in models for k in (m.get("tatqa") or {}).get("by_type", {})))  # fmt: skip
        panels.append(("TAT-QA exact match (higher is better)",
                       [("all", qa(None, "em"))] + [(k, qa(k, "em")) for k in kinds]))  # fmt: skip
    if not panels:
        return False

    plt = _plt()
    widths = [max(4.5, 1.2 * len(groups)) for _, groups in panels]
    fig, axes = plt.subplots(1, len(panels), figsize=(sum(widths), 4.8), squeeze=False,
                             gridspec_kw={"width_ratios": widths})  # fmt: skip
    width = 0.8 / len(models)
    for ax, (title, groups) in zip(axes[0], panels):
        x = np.arange(len(groups))
        for j, (label, m) in enumerate(models):
            vals = [get(m) for _, get in groups]
            bars = ax.bar(x + (j - (len(models) - 1) / 2) * width,
                          [np.nan if v is None else v for v in vals], width, label=label)  # fmt: skip
            ax.bar_label(bars, labels=[_fmt(v) for v in vals], fontsize=7, padding=1)
        ax.set_xticks(x, [g for g, _ in groups], fontsize=8)
        ax.set_ylim(0, 1.25)
        ax.set_ylabel("fraction of items")
        ax.set_title(title, fontsize=10)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=8, loc="upper left", ncol=len(models))
    fig.suptitle("Instruction following & TAT-QA: " + " vs ".join(label for label, _ in models))
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return True


def instruct_section(models: list[tuple[str, dict]], tmp: Path, dpi: int = 120) -> list[str]:
    from megatron_cpt.evaluation.report import _delta, _fmt, _md_table

    rows = axis_rows(models)
    if not rows:
        return []
    base = models[0][0]
    md = ["## Instruction & tasks", "",
          "Chat rows ask each item as a zero-shot user turn under the model's own chat template; "
          "TAT-QA rows are k-shot generations scored with TAT-QA's metric. The k-shot "
          "plain-prompt finance tasks (if run) are in the table above.", ""]  # fmt: skip
    header = ["metric", "n", *[label for label, _ in models],
              *[f"Δ {label} vs {base}" for label, _ in models[1:]]]  # fmt: skip
    body = []
    for label, _metric, higher, _prop, n, values in rows:
        kind = "acc" if higher else "nll"  # how _delta knows the better direction
        deltas = [_delta(v, values[0], kind) for v in values[1:]]
        body.append([label, str(n), *[_fmt(v) for v in values], *deltas])
    md += _md_table(header, body)
    md.append("")
    if plot_axes(models, tmp / "instruct_tasks.png", dpi):
        md += ["![Instruction following and TAT-QA](instruct_tasks.png)", ""]
    md += reading(models, rows)
    return md
