"""Instruction-following axis: FPB, FiQA-SA and Headlines as zero-shot chat instructions.

CPT on raw filings lowers domain perplexity and can still erode what the instruct model was
for: answering a request in the requested form. The k-shot plain-prompt tasks (lm-eval YAMLs
in ``tasks/``) cannot see that, so this axis asks each question the way a user would: one user
turn under the model's own chat template ("Classify the sentiment ...; answer with one word"),
the answer after the assistant header. Three readings per task:

- **label log-likelihood** (``acc_ll``, ``f1_ll``): the label that is most probable as the
  whole assistant answer (label text + the template's end-of-turn text, e.g. ``<|im_end|>``).
  A label's probability is the sum over its two surface forms, as the instruction spells it
  and with the first letter's case swapped ("Neutral" / "neutral"): the answer is the same
  label either way, as in the case-insensitive parse of generated answers. Scoring one
  casing only measured casing preference: on SmolLM2 the lowercase forms are 2-4x less
  likely than the capitalised ones it actually writes;
- **generated answer** (``acc_gen``, ``f1_gen``, ``invalid_rate``): greedy generation, parsed
  as valid only when its first word is one of the labels; anything else is an
  instruction-following failure, counted wrong and reported as a rate;
- **chat-format held-out loss** (``chat_nll`` per token, ``chat_ppl``): the NLL of the
  reference answers (gold label as the instruction spells it + end of turn) with the prompt
  under the chat template.

Macro-F1 is over the gold label set (minority classes count); invalid answers are a class of
their own that is never gold. Items are a fixed-seed sample, the same for every model.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass, field

import torch

from megatron_cpt.errors import UserError
from megatron_cpt.evaluation.backend import Backend
from megatron_cpt.evaluation.chat import chat_template_of, end_of_turn, render_chat
from megatron_cpt.evaluation.generation import GenRequest, greedy_generate
from megatron_cpt.evaluation.scoring import ScoreRequest, score_requests


@dataclass(frozen=True)
class InstructTask:
    file: str
    labels: tuple[str, ...]  # answer words, as the instruction spells them (the reference)
    instruction: str  # format string over the record's fields


# capitalised, as an answer word starts a sentence (and as SmolLM2 writes them)
SENTIMENT = ("Negative", "Neutral", "Positive")
INSTRUCT_TASKS = {
    "fpb": InstructTask(
        "fpb.jsonl",
        SENTIMENT,
        "Classify the sentiment of this sentence from a financial news article. "
        "Answer with one word: Negative, Neutral or Positive.\n\nSentence: {text}",
    ),
    "fiqasa": InstructTask(
        "fiqasa_test.jsonl",
        SENTIMENT,
        "Classify the sentiment of this financial microblog post or news headline. "
        "Answer with one word: Negative, Neutral or Positive.\n\nText: {text}",
    ),
    "headlines": InstructTask(
        "headlines.jsonl",
        ("No", "Yes"),
        "Read this news headline about gold.\n\nHeadline: {text}\n\n{question} "
        "Answer with one word: Yes or No.",
    ),
}


@dataclass
class InstructConfig:
    tasks: list[str] = field(default_factory=lambda: list(INSTRUCT_TASKS))
    limit: int | None = 200  # items per task (fixed-seed sample); None = all
    seed: int = 1234
    data_dir: str | None = None  # default: $MEGATRON_CPT_FINANCE_DATA or ../shared/data/tasks
    max_new: int = 8
    batch_size: int = 8

    def validate(self) -> None:
        unknown = [t for t in self.tasks if t not in INSTRUCT_TASKS]
        if unknown or not self.tasks:
            raise UserError(
                f"--instruct-tasks: unknown task(s) {', '.join(unknown) or '(none)'}; "
                f"choose from {', '.join(INSTRUCT_TASKS)}"
            )
        if self.limit is not None and self.limit < 1:
            raise UserError(f"--instruct-limit {self.limit}: must be >= 1")


def load_items(name: str, cfg: InstructConfig) -> list[dict]:
    """The task's records (validated labels, ``gold`` index), fixed-seed sample of ``limit``."""
    from megatron_cpt.evaluation.tasks.utils import _records, finance_data_dir

    task = INSTRUCT_TASKS[name]
    fields = ("text", "question") if "{question}" in task.instruction else ("text",)
    rows = _records(
        finance_data_dir(cfg.data_dir) / task.file, [x.lower() for x in task.labels], fields
    )
    if cfg.limit is not None and cfg.limit < len(rows):
        picked = sorted(random.Random(f"{cfg.seed}:{name}").sample(range(len(rows)), cfg.limit))
        rows = [rows[i] for i in picked]
    return rows


def parse_label(text: str, labels: tuple[str, ...]) -> int | None:
    """Index of the label a generated answer gives, or None (not a valid one-word label)."""
    words = re.findall(r"[A-Za-z]+", text)
    if not words:
        return None
    lowered = [x.lower() for x in labels]
    first = words[0].lower()
    return lowered.index(first) if first in lowered else None


def macro_f1(golds: list[int], preds: list[int], n_labels: int) -> float:
    from sklearn.metrics import f1_score

    return float(
        f1_score(golds, preds, labels=list(range(n_labels)), average="macro", zero_division=0)
    )


def prompt_text(template: str, task: InstructTask, row: dict, bos: str, eos: str) -> str:
    content = task.instruction.format(**row)
    return render_chat(template, [{"role": "user", "content": content}], True, bos, eos)


def label_logprobs(
    backend: Backend,
    prompts: list[list[int]],
    answers: list[list[int]],
    batch_size: int = 8,
    desc: str | None = None,
) -> list[list]:
    """``[item][label]`` scores of each whole answer (label + end of turn) after each prompt."""
    requests = [ScoreRequest(p, a) for p in prompts for a in answers]
    scores = score_requests(backend, requests, batch_size=batch_size, desc=desc)
    n = len(answers)
    return [scores[i * n : (i + 1) * n] for i in range(len(prompts))]


def label_forms(label: str) -> tuple[str, ...]:
    """The label as spelled, then with its first letter's case swapped (when that differs)."""
    other = label[:1].swapcase() + label[1:]
    return (label,) if other == label else (label, other)


def label_choice(
    backend: Backend,
    prompts: list[list[int]],
    forms: list[list[list[int]]],
    batch_size: int = 8,
    desc: str | None = None,
    table_fn=None,
) -> tuple[list[int], list]:
    """Most probable label per prompt, each label's probability summed over its surface forms
    (``forms[label]`` = token ids of each form + end of turn); also the ``[item][label]``
    score of each label's first form (the reference spelling, for the chat NLL).
    ``table_fn`` computes the ``[item][answer]`` scores (default :func:`label_logprobs`; an
    equal, prompt-cached one for HF models is in ``evaluation.prefix_scoring``)."""
    flat = [f for label in forms for f in label]
    owner = [k for k, label in enumerate(forms) for _ in label]
    table = (table_fn or label_logprobs)(backend, prompts, flat, batch_size, desc=desc)
    first = [owner.index(k) for k in range(len(forms))]
    preds, reference = [], []
    for row in table:
        total = [
            torch.logsumexp(
                torch.tensor(
                    [s.logprob for s, o in zip(row, owner) if o == k], dtype=torch.float64
                ),
                0,
            ).item()
            for k in range(len(forms))
        ]
        preds.append(max(range(len(forms)), key=total.__getitem__))
        reference.append([row[i] for i in first])
    return preds, reference


def run_instruct(backend: Backend, cfg: InstructConfig) -> dict:
    """``{task: {acc_ll, f1_ll, acc_gen, f1_gen, invalid_rate, chat_nll, chat_ppl, samples}}``."""
    cfg.validate()
    tok = backend.tokenizer
    template = chat_template_of(backend)
    bos = tok.decode([tok.bos_id]) if tok.bos_id is not None else ""
    eos = tok.decode([tok.eos_id]) if tok.eos_id is not None else ""
    eot = end_of_turn(template, bos, eos)
    out: dict[str, dict] = {}
    for name in cfg.tasks:
        task = INSTRUCT_TASKS[name]
        rows = load_items(name, cfg)
        prompts = [tok.encode(prompt_text(template, task, r, bos, eos)) for r in rows]
        forms = [[tok.encode(f + eot) for f in label_forms(label)] for label in task.labels]
        ll_pred, table = label_choice(
            backend, prompts, forms, cfg.batch_size, desc=f"{name} labels (chat)"
        )
        n = len(task.labels)
        golds = [r["gold"] for r in rows]
        gold_nll, gold_tokens = 0.0, 0
        for row_scores, gold in zip(table, golds):
            gold_nll -= row_scores[gold].logprob
            gold_tokens += row_scores[gold].ntokens
        until = tuple(s for s in ("\n", eot.strip(), eos) if s)
        gen = greedy_generate(
            backend,
            [GenRequest(p, cfg.max_new, until) for p in prompts],
            eos_id=tok.eos_id,
            batch_size=cfg.batch_size,
            desc=f"{name} answers (chat)",
        )
        parsed = [parse_label(tok.decode(ids), task.labels) for ids in gen]
        gen_pred = [n if p is None else p for p in parsed]  # n = the "invalid" class
        out[name] = {
            "acc_ll": sum(p == g for p, g in zip(ll_pred, golds)) / len(rows),
            "f1_ll": macro_f1(golds, ll_pred, n),
            "acc_gen": sum(p == g for p, g in zip(gen_pred, golds)) / len(rows),
            "f1_gen": macro_f1(golds, gen_pred, n),
            "invalid_rate": sum(p is None for p in parsed) / len(rows),
            "chat_nll": gold_nll / gold_tokens,
            "chat_ppl": math.exp(gold_nll / gold_tokens),
            "samples": len(rows),
            "examples": [tok.decode(ids) for ids in gen[:3]],
        }
    return out
