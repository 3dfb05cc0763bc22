"""The demo's optional SFT set: instruction/label conversations from financial sentiment
training items, never from the items the demo evaluates.

The ``--sft`` stage of ``make demo`` fine-tunes the CPT checkpoint to get its instruction
following back and then evaluates it on the same axes as base / CPT / merged. Its training
conversations are the instruction axis's own prompts (``instruct.INSTRUCT_TASKS``: one user
turn with the instruction, the label word as the answer), so what is trained is exactly the
format the axis measures, on other items:

- FiQA-SA: ``fiqasa_train.jsonl`` (the axis samples ``fiqasa_test.jsonl``);
- FPB: ``fpb.jsonl`` (no separate train file);

each minus every item whose text is in the axis's ``--instruct-items`` sample of that task
(``instruct.load_items``, same seed and limit): FPB's sample comes from the same file, and 16
FiQA-SA texts occur in both its train and test files.

Items alternate between the two sources in a seeded order (``n`` in all). Headlines is not
trained on; its score after SFT shows whether the gain transfers to a task it never saw.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SOURCES = ("fiqasa", "fpb")


def sft_rows(n: int, eval_items: int, seed: int = 17, data_dir: str | None = None) -> list[dict]:
    """``n`` ``{prompt, response, source}`` rows; none is a demo evaluation item."""
    from megatron_cpt.evaluation.instruct import INSTRUCT_TASKS, InstructConfig, load_items
    from megatron_cpt.evaluation.tasks.utils import _records, finance_data_dir

    directory = finance_data_dir(data_dir)
    pools = {}
    for name in SOURCES:
        task = INSTRUCT_TASKS[name]
        labels = [x.lower() for x in task.labels]
        held_texts = set()
        if eval_items > 0:  # the axis's fixed-seed sample, compared by text (duplicates too)
            cfg = InstructConfig(tasks=[name], limit=eval_items, data_dir=data_dir)
            held_texts = {r["text"] for r in load_items(name, cfg)}
        source = "fiqasa_train.jsonl" if name == "fiqasa" else task.file
        rows = [r for r in _records(directory / source, labels, ("text",))
                if r["text"] not in held_texts]  # fmt: skip
        random.Random(f"{seed}:{name}").shuffle(rows)
        pools[name] = [
            {"prompt": task.instruction.format(**r), "response": task.labels[r["gold"]],
             "source": name}
            for r in rows
        ]  # fmt: skip
    out = []
    for i in range(max(len(p) for p in pools.values())):
        for name in SOURCES:
            if i < len(pools[name]) and len(out) < n:
                out.append(pools[name][i])
    return out


def write_sft_set(path: Path, n: int, eval_items: int, seed: int = 17) -> dict:
    """Write the rows as JSONL (``tools/preprocess_sft.py`` input); counts per source."""
    rows = sft_rows(n, eval_items, seed)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(
        "".join(
            json.dumps({"prompt": r["prompt"], "response": r["response"]}) + "\n" for r in rows
        )  # fmt: skip
    )
    tmp.replace(path)
    return {name: sum(r["source"] == name for r in rows) for name in SOURCES}
