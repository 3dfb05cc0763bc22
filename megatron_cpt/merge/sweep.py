"""Merge sweep: pick the merge parameters against domain gain and general retention.

Llama-3-SEC's TIES density and weight are unpublished, and mergekit-evolve tunes against lm-eval
tasks, not domain perplexity. The sweep merges the CPT model back into the base over a grid
(density x weight x lambda), evaluates every candidate on the user's domain and general sets,
and reports the Pareto front (lower domain bpb vs lower general bpb), a table, and the best
domain point under the user's constraints (e.g. ``general_bpb<=base*1.01``).

Candidates merge in the inputs' own space (Megatron checkpoints give Megatron candidates, so a
70B sweep needs no HF export per point) and are cached by a hash of everything that determines
their scores (recipe, seed, the inputs' files, the evaluation settings): a re-run, or a grid
widened by one value, evaluates only the new points. Merged weights are deleted once scored
unless ``keep_models`` (a 70B candidate is 140 GB).

Adding an evaluation axis is one entry in :data:`AXES` (a name, a group, and how to read it from
an evaluation result): every table, constraint and JSON row picks it up.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from megatron_cpt.errors import UserError
from megatron_cpt.evaluation.perplexity import PerplexityConfig
from megatron_cpt.merge import methods
from megatron_cpt.merge.config import parse_config
from megatron_cpt.merge.engine import MergeOptions, merge_checkpoints
from megatron_cpt.merge.megatron_io import is_megatron_checkpoint

# Methods the grid understands: density (where the method sparsifies) x weight x lambda.
SWEEP_METHODS = tuple(methods.TASK_ARITHMETIC_FAMILY)
_SPARSIFYING = {m for m, s in methods.TASK_ARITHMETIC_FAMILY.items() if s.sparsify != "none"}


@dataclass(frozen=True)
class Axis:
    """One scored quantity: ``read(result, sweep)`` -> float, from an evaluation result JSON."""

    name: str
    group: str  # "domain" | "general": which side of the trade-off it measures
    read: Callable[[dict, SweepConfig], float]
    higher_is_better: bool = False


def _mean_bpb(group: str) -> Callable[[dict, SweepConfig], float]:
    def read(result: dict, sweep: SweepConfig) -> float:
        names = sweep.domain if group == "domain" else sweep.general
        return sum(result["perplexity"][n]["bpb"] for n in names) / len(names)

    return read


# The primary axes (the Pareto plot's): mean bits-per-byte over the domain / general sets.
# Instruction/task axes from the evaluation tools go here, e.g.
#   Axis("fpb_acc", "general", lambda r, s: r["tasks"]["fpb"]["acc"], higher_is_better=True),
AXES: list[Axis] = [
    Axis("domain_bpb", "domain", _mean_bpb("domain")),
    Axis("general_bpb", "general", _mean_bpb("general")),
]


@dataclass
class SweepConfig:
    base: Path
    models: list[Path]  # the fine-tuned (CPT) checkpoints merged into the base
    domain: dict[str, list[str]]  # set name -> JSONL paths
    general: dict[str, list[str]]
    out_dir: Path
    method: str = "ties"
    densities: list[float] = field(default_factory=lambda: [0.3, 0.5, 0.7])
    weights: list[float] = field(default_factory=lambda: [0.5, 1.0])
    lambdas: list[float] = field(default_factory=lambda: [1.0])
    normalize: bool = False  # TIES's default divides by the weight: a one-model sweep needs False
    perplexity: PerplexityConfig = field(default_factory=PerplexityConfig)
    eval_dtype: str = "float32"
    constraints: list[str] = field(default_factory=list)
    seed: int = 0
    device: str = "cpu"
    keep_models: bool = False
    tokenizer: str | None = None  # Megatron candidates: tokenizer for the evaluator


# --------------------------------------------------------------------------- constraints
_CONSTRAINT = re.compile(
    r"^\s*(?P<metric>\w+)\s*(?P<op><=|>=|<|>)\s*"
    r"(?:(?P<ref>base|cpt)\s*(?:(?P<rop>[*+-])\s*(?P<num>[0-9.eE+-]+)\s*(?P<pct>%)?)?"
    r"|(?P<const>[0-9.eE+-]+))\s*$"
)


@dataclass(frozen=True)
class Constraint:
    text: str
    metric: str
    op: str
    ref: str | None
    rop: str | None
    value: float

    def bound(self, refs: dict[str, dict[str, float]]) -> float:
        if self.ref is None:
            return self.value
        ref = refs[self.ref][self.metric]
        if self.rop is None:
            return ref
        if self.rop == "*":
            return ref * self.value
        return ref + self.value if self.rop == "+" else ref - self.value

    def holds(self, metrics: dict[str, float], refs: dict[str, dict[str, float]]) -> bool:
        x, y = metrics[self.metric], self.bound(refs)
        return {"<=": x <= y, ">=": x >= y, "<": x < y, ">": x > y}[self.op]


def parse_constraint(text: str, metrics: list[str]) -> Constraint:
    """``general_bpb<=base*1.01``, ``general_bpb<=base+1%``, ``domain_bpb<1.05``."""
    match = _CONSTRAINT.match(text)
    if not match:
        raise UserError(
            f"--constraint {text!r}: expected METRIC OP (base|cpt)[*|+|- NUMBER[%]] or "
            "METRIC OP NUMBER, e.g. general_bpb<=base*1.01"
        )
    metric = match["metric"]
    if metric not in metrics:
        raise UserError(
            f"--constraint {text!r}: unknown metric {metric} (use {', '.join(metrics)})"
        )
    try:
        number = float(match["num"] if match["num"] is not None else match["const"] or "nan")
    except ValueError:
        raise UserError(f"--constraint {text!r}: cannot read the number") from None
    rop = match["rop"]
    if match["pct"]:  # base+1% -> base*1.01, base-1% -> base*0.99
        number, rop = 1 + (number if rop == "+" else -number) / 100, "*"
        if match["rop"] == "*":
            raise UserError(f"--constraint {text!r}: % goes with + or -, e.g. base+1%")
    return Constraint(text, metric, match["op"], match["ref"], rop, number)


# --------------------------------------------------------------------------- cache keys
def _fingerprint(path: Path) -> list:
    """Names, sizes and mtimes of a checkpoint's files: a changed input invalidates the cache."""
    files = sorted(p for p in path.rglob("*") if p.is_file())
    return [[str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def _key(payload: dict) -> str:
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class Candidate:
    label: str
    params: dict  # density / weight / lambda (empty for the references)
    recipe: dict | None  # the mergekit recipe; None for base / cpt (evaluated as they are)
    key: str
    cached: bool = False
    metrics: dict[str, float] = field(default_factory=dict)
    pareto: bool = False
    feasible: bool = True


class Sweep:
    def __init__(self, cfg: SweepConfig):
        self.cfg = cfg
        self._validate()
        self.megatron = is_megatron_checkpoint(cfg.base)
        self.eval_settings = {
            "domain": cfg.domain,
            "general": cfg.general,
            "perplexity": asdict(cfg.perplexity),
            "dtype": cfg.eval_dtype,
            "tokenizer": cfg.tokenizer,
        }
        self.inputs = {str(p): _fingerprint(p) for p in [cfg.base, *cfg.models]}
        # a one-set group named like its axis ("domain" -> domain_bpb) is that axis: one column
        names = [a.name for a in AXES] + [f"{n}_bpb" for n in [*cfg.domain, *cfg.general]]
        self.metrics = list(dict.fromkeys(names))
        self.constraints = [parse_constraint(c, self.metrics) for c in cfg.constraints]

    def _validate(self) -> None:
        c = self.cfg
        if c.method not in SWEEP_METHODS:
            raise UserError(f"--method {c.method}: the sweep supports {', '.join(SWEEP_METHODS)}")
        if not c.domain or not c.general:
            raise UserError("give at least one --domain NAME=PATH and one --general NAME=PATH")
        if set(c.domain) & set(c.general):
            raise UserError(
                f"set {sorted(set(c.domain) & set(c.general))[0]} is both domain and general"
            )
        axes = {a.name: a.group for a in AXES}
        for group, sets in (("domain", c.domain), ("general", c.general)):
            for name in sets:
                axis = axes.get(f"{name}_bpb")
                if axis is not None and not (axis == group and len(sets) == 1):
                    raise UserError(
                        f"--{group} {name}=...: {name}_bpb is the mean over the {axis} sets; "
                        "give this set another name"
                    )
        if not c.models:
            raise UserError("give the fine-tuned (CPT) checkpoint with --model")
        if c.method not in _SPARSIFYING and c.densities not in ([], [1.0]):
            raise UserError(f"--density: {c.method} does not sparsify; leave --density out")
        for name, values in (
            ("density", c.densities),
            ("weight", c.weights),
            ("lambda", c.lambdas),
        ):
            if not values and name != "density":
                raise UserError(f"--{name}: give at least one value")
            if name == "density" and any(not 0 < v <= 1 for v in values):
                raise UserError(f"--density: values must be within (0, 1], got {values}")

    # ------------------------------------------------------------------ grid
    def grid(self) -> list[Candidate]:
        c = self.cfg
        densities = c.densities if c.method in _SPARSIFYING else [1.0]
        out = []
        for density, weight, lam in itertools.product(densities, c.weights, c.lambdas):
            params = {"density": density} if c.method in _SPARSIFYING else {}
            params |= {"weight": weight, "lambda": lam}
            model_params = {"weight": weight}
            if c.method in _SPARSIFYING:
                model_params["density"] = density
            recipe = {
                "merge_method": c.method,
                "base_model": str(c.base),
                "models": [{"model": str(m), "parameters": model_params} for m in c.models],
                "parameters": {"lambda": lam, "normalize": c.normalize},
                "dtype": "float32",
                "tokenizer_source": "base",
            }
            label = " ".join(f"{k[0]}{v:g}" for k, v in params.items() if k != "lambda" or lam != 1)
            key = _key({"recipe": recipe, "seed": c.seed, "inputs": self.inputs,
                        "eval": self.eval_settings})  # fmt: skip
            out.append(Candidate(label, params, recipe, key))
        return out

    def references(self) -> list[Candidate]:
        refs = [("base", self.cfg.base)]
        if len(self.cfg.models) == 1:
            refs.append(("cpt", self.cfg.models[0]))
        return [
            Candidate(
                label,
                {},
                None,
                _key(
                    {"model": str(path), "inputs": _fingerprint(path), "eval": self.eval_settings}
                ),
            )  # fmt: skip
            for label, path in refs
        ]

    # ------------------------------------------------------------------ running
    def run(self, log: Callable[[str], None] = print) -> dict:
        c = self.cfg
        cache = c.out_dir / "candidates"
        cache.mkdir(parents=True, exist_ok=True)
        refs = self.references()
        candidates = self.grid()
        paths = {"base": c.base, "cpt": c.models[0] if len(c.models) == 1 else None}
        total = len(refs) + len(candidates)
        for index, cand in enumerate([*refs, *candidates], 1):
            result_path = cache / cand.key / "eval.json"
            if result_path.exists():
                cand.cached = True
                log(f"[{index}/{total}] {cand.label}: cached ({cand.key})")
            else:
                log(f"[{index}/{total}] {cand.label}: merging and evaluating ({cand.key})")
                model = paths[cand.label] if cand.recipe is None else self._merge(cand, cache)
                result = self._evaluate(model)
                _write_json(result_path, result)
                (cache / cand.key / "candidate.json").write_text(
                    json.dumps({"label": cand.label, "params": cand.params,
                                "recipe": cand.recipe}, indent=1))  # fmt: skip
                if cand.recipe is not None and not c.keep_models:
                    shutil.rmtree(model, ignore_errors=True)
            result = json.loads(result_path.read_text())
            cand.metrics = self._metrics(result)
        summary = self._summarize(refs, candidates)
        self._write_outputs(summary)
        return summary

    def _merge(self, cand: Candidate, cache: Path) -> Path:
        out = cache / cand.key / "model"
        config = parse_config(cand.recipe, source=f"sweep point {cand.label}")
        options = MergeOptions(random_seed=self.cfg.seed, progress=False, overwrite=True,
                               device=self.cfg.device)  # fmt: skip
        merge_checkpoints(config, out, options)
        (cache / cand.key / "recipe.yml").write_text(yaml.safe_dump(cand.recipe, sort_keys=False))
        return out

    def _evaluate(self, model: Path) -> dict:
        from megatron_cpt.evaluation.backend import BackendSpec
        from megatron_cpt.evaluation.run import EvaluateConfig, run_evaluation

        if self.megatron:
            spec = BackendSpec(megatron=str(model), tokenizer=self.cfg.tokenizer,
                               dtype=self.cfg.eval_dtype)  # fmt: skip
        else:
            spec = BackendSpec(hf=str(model), dtype=self.cfg.eval_dtype)
        data = {**self.cfg.domain, **self.cfg.general}
        return run_evaluation(EvaluateConfig(model=spec, data=data, perplexity=self.cfg.perplexity))

    def _metrics(self, result: dict) -> dict[str, float]:
        out = {axis.name: float(axis.read(result, self.cfg)) for axis in AXES}
        for name in [*self.cfg.domain, *self.cfg.general]:
            out[f"{name}_bpb"] = float(result["perplexity"][name]["bpb"])
        return out

    # ------------------------------------------------------------------ analysis
    def _summarize(self, refs: list[Candidate], candidates: list[Candidate]) -> dict:
        ref_metrics = {r.label: r.metrics for r in refs}
        for cand in candidates:
            cand.feasible = all(k.holds(cand.metrics, ref_metrics) for k in self.constraints)
        for cand in candidates:
            cand.pareto = not any(_dominates(o.metrics, cand.metrics) for o in candidates)
        feasible = [x for x in candidates if x.feasible]
        best = min(feasible, key=lambda x: x.metrics["domain_bpb"], default=None)
        base = ref_metrics["base"]

        def row(cand: Candidate) -> dict:
            m = cand.metrics
            return {
                "label": cand.label,
                "params": cand.params,
                "key": cand.key,
                "cached": cand.cached,
                "metrics": m,
                "domain_gain_pct": 100
                * (base["domain_bpb"] - m["domain_bpb"])
                / base["domain_bpb"],
                "general_change_pct": 100
                * (m["general_bpb"] - base["general_bpb"])
                / base["general_bpb"],
                "pareto": cand.pareto,
                "feasible": cand.feasible,
            }

        return {
            "method": self.cfg.method,
            "base": str(self.cfg.base),
            "models": [str(m) for m in self.cfg.models],
            "constraints": [k.text for k in self.constraints],
            "references": [row(r) for r in refs],
            "candidates": [row(c) for c in candidates],
            "recommended": row(best) if best else None,
            "evaluated": sum(not c.cached for c in [*refs, *candidates]),
            "cached": sum(c.cached for c in [*refs, *candidates]),
        }

    def _write_outputs(self, summary: dict) -> None:
        out = self.cfg.out_dir
        _write_json(out / "sweep.json", summary)
        _write_text(out / "sweep.md", markdown_table(summary, self.metrics))
        plot_pareto(summary, out / "pareto.png")


def _dominates(a: dict[str, float], b: dict[str, float]) -> bool:
    """a is no worse on both primary axes and better on one (lower bpb is better)."""
    keys = ("domain_bpb", "general_bpb")
    return all(a[k] <= b[k] for k in keys) and any(a[k] < b[k] for k in keys)


def markdown_table(summary: dict, metrics: list[str]) -> str:
    cols = ["point", *metrics, "domain gain %", "general change %", "Pareto", "meets constraints"]
    lines = [
        f"# Merge sweep: {summary['method']}",
        "",
        f"base: `{summary['base']}`; models: {', '.join(f'`{m}`' for m in summary['models'])}",
        f"constraints: {', '.join(f'`{c}`' for c in summary['constraints']) or 'none'}",
        "",
        "| " + " | ".join(cols) + " |",
        "|" + "---|" * len(cols),
    ]
    for kind, rows in (("ref", summary["references"]), ("cand", summary["candidates"])):
        for r in rows:
            cells = [r["label"] if kind == "cand" else f"*{r['label']}*"]
            cells += [f"{r['metrics'][m]:.4f}" for m in metrics]
            cells += [f"{r['domain_gain_pct']:+.2f}", f"{r['general_change_pct']:+.2f}"]
            cells += ["" if kind == "ref" else ("yes" if r["pareto"] else ""),
                      "" if kind == "ref" else ("yes" if r["feasible"] else "no")]  # fmt: skip
            lines.append("| " + " | ".join(cells) + " |")
    rec = summary["recommended"]
    lines += ["", "**Recommended:** " + (
        f"`{rec['label']}` ({json.dumps(rec['params'])}): domain bpb "
        f"{rec['metrics']['domain_bpb']:.4f} ({rec['domain_gain_pct']:+.2f} % vs base), general "
        f"bpb {rec['metrics']['general_bpb']:.4f} ({rec['general_change_pct']:+.2f} %)"
        if rec else "no candidate meets the constraints"
    ), ""]  # fmt: skip
    return "\n".join(lines)


def plot_pareto(summary: dict, path: Path) -> None:
    """Domain gain (y, up is better) against general change (x, left is better)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5.5), dpi=120)
    cands = summary["candidates"]
    xs = [r["general_change_pct"] for r in cands]
    ys = [r["domain_gain_pct"] for r in cands]
    colors = ["tab:blue" if r["feasible"] else "tab:gray" for r in cands]
    ax.scatter(xs, ys, c=colors, s=36, zorder=3, label="candidates (gray: violates constraint)")
    for r, x, y in zip(cands, xs, ys):
        ax.annotate(r["label"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    front = sorted((r for r in cands if r["pareto"]), key=lambda r: r["general_change_pct"])
    if front:
        ax.plot([r["general_change_pct"] for r in front], [r["domain_gain_pct"] for r in front],
                "-", color="tab:orange", lw=1.5, zorder=2, label="Pareto front")  # fmt: skip
    for r, marker in zip(summary["references"], ("s", "D")):
        ax.scatter([r["general_change_pct"]], [r["domain_gain_pct"]], marker=marker, s=60,
                   color="black", zorder=4, label=r["label"])  # fmt: skip
        ax.annotate(r["label"], (r["general_change_pct"], r["domain_gain_pct"]),
                    textcoords="offset points", xytext=(5, -10), fontsize=8)  # fmt: skip
    rec = summary["recommended"]
    if rec:
        ax.scatter([rec["general_change_pct"]], [rec["domain_gain_pct"]], marker="*", s=260,
                   color="tab:red", zorder=5, label=f"recommended: {rec['label']}")  # fmt: skip
    for text in summary["constraints"]:
        m = _CONSTRAINT.match(text)
        if m and m["metric"] == "general_bpb" and m["ref"] == "base" and m["op"] in ("<=", "<"):
            c = parse_constraint(text, ["general_bpb"])
            pct = 100 * (c.value - 1) if c.rop == "*" else None
            if pct is not None and math.isfinite(pct):
                ax.axvline(pct, ls="--", color="tab:red", lw=1, label=text)
    ax.axhline(0, color="0.8", lw=0.8, zorder=1)
    ax.axvline(0, color="0.8", lw=0.8, zorder=1)
    ax.set_xlabel("general bpb change vs base, %  (left = better retention)")
    ax.set_ylabel("domain bpb reduction vs base, %  (up = more domain gain)")
    ax.set_title(f"Merge sweep ({summary['method']}): domain gain vs general retention")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def _write_json(path: Path, data: dict) -> None:
    _write_text(path, json.dumps(data, indent=1) + "\n")


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
