"""TAT-QA as a generation task: k-shot prompts over annual-report tables + text, greedy answers.

This is Llama-3-SEC's "extractive numerical reasoning" axis on ``tasks/tatqa_dev.jsonl``:
each question is preceded by ``num_fewshot`` solved examples whose *contexts differ from the
question's* (a shot from the same report would leak the table), then the model generates one
line, which :func:`megatron_cpt.evaluation.tatqa.parse_prediction` splits into spans and a
scale and the official-rules metric scores (EM, numeracy F1, scale) overall and per answer
type.

CPU sizing: questions are a fixed-seed sample of ``limit`` (the same for every model); shots
are drawn (fixed seed) from questions whose context is at most ``shot_max_chars`` long and
that are never evaluated, one per answer type in turn (span, arithmetic, multi-span, count),
so short prompts still show every answer form. Questions whose context is longer than
``max_context_chars`` can be left out (``None`` keeps all; the default 3000 keeps 83 % of the dev set).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from megatron_cpt.errors import UserError
from megatron_cpt.evaluation import tatqa
from megatron_cpt.evaluation.backend import Backend
from megatron_cpt.evaluation.generation import GenRequest, greedy_generate

INSTRUCTION = (
    "Answer the question using the table and text of the report. Write only the answer: a "
    "span copied from the report, several spans separated by '; ', or a number, followed by "
    "its scale (thousand, million, billion) or % when there is one.\n\n"
)
SHOT_ORDER = ("span", "arithmetic", "multi-span", "count")


@dataclass
class TatqaConfig:
    path: str | None = None  # default: ../shared/data/tasks/tatqa_dev.jsonl
    limit: int | None = 100  # questions (fixed-seed sample); None = all
    num_fewshot: int = 2
    seed: int = 1234
    max_new: int = 32
    batch_size: int = 4
    shot_max_chars: int = 1000
    max_context_chars: int | None = 3000

    def validate(self) -> None:
        if self.limit is not None and self.limit < 1:
            raise UserError(f"--tatqa-limit {self.limit}: must be >= 1")
        if self.num_fewshot < 0:
            raise UserError(f"--tatqa-shots {self.num_fewshot}: must be >= 0")

    def data_path(self) -> Path:
        if self.path:
            path = Path(self.path).expanduser()
        else:
            from megatron_cpt.assets import shared_data_dir

            shared = shared_data_dir()
            if shared is None:
                raise UserError("TAT-QA data not found: pass --tatqa-data tatqa_dev.jsonl")
            path = shared / "tasks" / "tatqa_dev.jsonl"
        if not path.is_file():
            raise UserError(f"--tatqa-data {path}: no such file")
        return path


def load_records(path: Path) -> list[dict]:
    from megatron_cpt.data.jsonl import iter_jsonl
    from megatron_cpt.errors import BadInputError

    rows = []
    for record in iter_jsonl([path]):
        row = record.obj
        for key in ("context_id", "context", "question", "answer", "answer_type", "scale"):
            if key not in row:
                raise BadInputError(record.path, record.line, f"missing field {key!r}", "field")
        if row["answer_type"] not in tatqa.ANSWER_TYPES or row["scale"] not in tatqa.SCALES:
            raise BadInputError(
                record.path,
                record.line,
                f"answer_type {row['answer_type']!r} / scale {row['scale']!r} not TAT-QA's",
                "field",
            )
        rows.append(row)
    if not rows:
        raise UserError(f"{path}: no records")
    return rows


def select(rows: list[dict], cfg: TatqaConfig) -> tuple[list[dict], list[dict]]:
    """(shots, questions): disjoint contexts, both fixed by ``cfg.seed``."""
    rng = random.Random(cfg.seed)
    pool = [r for r in rows if len(r["context"]) <= cfg.shot_max_chars]
    shots: list[dict] = []
    for i in range(cfg.num_fewshot):
        kind = SHOT_ORDER[i % len(SHOT_ORDER)]
        used = {s["context_id"] for s in shots}
        options = [r for r in pool if r["answer_type"] == kind and r["context_id"] not in used]
        options = options or [r for r in pool if r["context_id"] not in used]
        if not options:
            raise UserError(f"TAT-QA: not enough short contexts for {cfg.num_fewshot} shots")
        shots.append(rng.choice(options))
    taken = {s["context_id"] for s in shots}
    candidates = [
        r
        for r in rows
        if r["context_id"] not in taken
        and (cfg.max_context_chars is None or len(r["context"]) <= cfg.max_context_chars)
    ]
    if cfg.limit is not None and cfg.limit < len(candidates):
        picked = sorted(random.Random(cfg.seed + 1).sample(range(len(candidates)), cfg.limit))
        candidates = [candidates[i] for i in picked]
    return shots, candidates


def block(row: dict, answer: str | None) -> str:
    text = f"{row['context']}\n\nQuestion: {row['question']}\nAnswer:"
    return text + (f" {answer}\n\n" if answer is not None else "")


def build_prompt(shots: list[dict], row: dict) -> str:
    return INSTRUCTION + "".join(block(s, tatqa.format_answer(s)) for s in shots) + block(row, None)


def run_tatqa(backend: Backend, cfg: TatqaConfig) -> dict:
    """EM / F1 / scale accuracy overall and per answer type, plus a few raw generations."""
    cfg.validate()
    shots, rows = select(load_records(cfg.data_path()), cfg)
    tok = backend.tokenizer
    prefix = [tok.bos_id] if getattr(tok, "adds_bos", False) and tok.bos_id is not None else []
    budget = backend.max_length - cfg.max_new
    requests = [
        GenRequest((prefix + tok.encode(build_prompt(shots, r)))[-budget:], cfg.max_new, ("\n",))
        for r in rows
    ]
    generated = greedy_generate(
        backend, requests, eos_id=tok.eos_id, batch_size=cfg.batch_size, desc="tatqa"
    )
    totals = tatqa.TatqaTotals()
    examples = []
    for row, ids in zip(rows, generated):
        text = tok.decode(ids).split("\n")[0]
        spans, scale = tatqa.parse_prediction(text)
        result = tatqa.score(row, spans, scale)
        totals.add(row["answer_type"], result)
        if len(examples) < 5:
            examples.append({"question": row["question"], "gold": tatqa.format_answer(row),
                             "generated": text.strip(), **result})  # fmt: skip
    out = totals.summary()
    out["num_fewshot"] = cfg.num_fewshot
    out["prompt_tokens_mean"] = sum(len(r.prompt) for r in requests) / len(requests)
    out["examples"] = examples
    return out
