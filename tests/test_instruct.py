"""Chat-template prompts (vs the tokenizer's own apply_chat_template on SmolLM2), label scoring
on a hand-worked bigram model, answer parsing and macro-F1 with invalid answers."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_cpt.evaluation.chat import (
    chat_template_of,
    end_of_turn,
    gguf_chat_template,
    render_chat,
)
from megatron_cpt.evaluation.instruct import (
    INSTRUCT_TASKS,
    InstructConfig,
    label_choice,
    label_forms,
    label_logprobs,
    load_items,
    macro_f1,
    parse_label,
    prompt_text,
)

CONVERSATIONS = [
    [{"role": "user", "content": "Classify the sentiment: 'Profit rose 12 %'. One word."}],
    [
        {"role": "system", "content": "You are a terse analyst."},
        {"role": "user", "content": "Yes or No?"},
        {"role": "assistant", "content": "Yes"},
        {"role": "user", "content": "And now?\nTwo lines."},
    ],
]


class CharTokenizer:
    def __init__(self, alphabet: str):
        self.alphabet = alphabet
        self.bos_id = self.eos_id = None

    def encode(self, text):
        return [self.alphabet.index(c) for c in text]

    def decode(self, ids):
        return "".join(self.alphabet[i] for i in ids)


class Bigram:
    """Next-token distribution depends on the previous character only (a table we choose)."""

    def __init__(self, alphabet: str, table: dict[str, dict[str, float]]):
        self.tokenizer = CharTokenizer(alphabet)
        self.name, self.max_length = "bigram", 64
        v = len(alphabet)
        self.logp = torch.full((v, v), math.log(1e-6))
        for prev, nexts in table.items():
            rest = (1 - sum(nexts.values())) / (v - len(nexts))
            row = torch.full((v,), math.log(rest))
            for ch, p in nexts.items():
                row[alphabet.index(ch)] = math.log(p)
            self.logp[alphabet.index(prev)] = row

    def logits(self, ids):
        return self.logp[ids]


def test_label_scoring_hand_worked():
    # p(x|q)=0.5 > p(y|q)=0.4, but the whole answer "y!" (label + end of turn) is likelier:
    # x! = 0.5 * 0.5 = 0.25, y! = 0.4 * 0.9 = 0.36
    model = Bigram("qxy!", {"q": {"x": 0.5, "y": 0.4}, "x": {"!": 0.5}, "y": {"!": 0.9}})
    enc = model.tokenizer.encode
    (scores,) = label_logprobs(model, [enc("qq")], [enc("x!"), enc("y!")])
    assert scores[0].logprob == pytest.approx(math.log(0.25), abs=1e-5)
    assert scores[1].logprob == pytest.approx(math.log(0.36), abs=1e-5)
    assert max(range(2), key=lambda k: scores[k].logprob) == 1
    assert scores[1].ntokens == 2  # chat NLL per token of the reference "y!" = -ln(0.36)/2


def test_label_probability_sums_its_casings_hand_worked():
    # the instruction spells the labels "X" and "y"; the model writes "x" more often than "X".
    # p(X!) = 0.2 * 0.9 = 0.18, p(x!) = 0.3 * 0.9 = 0.27 -> label 0: 0.45
    # p(y!) = 0.4 * 0.9 = 0.36, p(Y!) ~ 0 -> label 1: 0.36
    # Scoring the instruction's spelling only picks "y" (0.36 > 0.18): a casing preference,
    # not the model's answer. The label is the sum over both casings: label 0.
    model = Bigram(
        "qxXyY!",
        {
            "q": {"X": 0.2, "x": 0.3, "y": 0.4},
            "x": {"!": 0.9},
            "X": {"!": 0.9},
            "y": {"!": 0.9},
        },
    )
    enc = model.tokenizer.encode
    assert label_forms("X") == ("X", "x") and label_forms("y") == ("y", "Y")
    assert label_forms("7") == ("7",)
    forms = [[enc(f + "!") for f in label_forms(label)] for label in ("X", "y")]
    preds, reference = label_choice(model, [enc("qq")], forms)
    assert preds == [0]
    # the chat-NLL reference is the instruction's spelling: "X!" and "y!"
    assert reference[0][0].logprob == pytest.approx(math.log(0.18), abs=1e-5)
    assert reference[0][1].logprob == pytest.approx(math.log(0.36), abs=1e-5)


def test_parse_label_and_macro_f1_with_invalid_answers():
    labels = ("negative", "neutral", "positive")
    assert parse_label(" Positive.", labels) == 2
    assert parse_label("neutral\n", labels) == 1
    assert parse_label("The sentiment is negative", labels) is None  # not one word: a failure
    assert parse_label("", labels) is None
    assert parse_label("Yes", ("No", "Yes")) == 1
    # class 0: P=1 R=1/2 F=2/3; class 1: P=1/2 R=1 F=2/3; class 2: F=0 -> macro 4/9;
    # the invalid prediction (3) is a wrong answer, not a class of the average
    assert macro_f1([0, 1, 2, 0], [0, 1, 3, 1], 3) == pytest.approx(4 / 9)


def test_items_are_a_fixed_sample_with_gold_labels(shared_data):
    cfg = InstructConfig(limit=20, seed=7)
    first = load_items("headlines", cfg)
    assert first == load_items("headlines", cfg) and len(first) == 20
    assert first != load_items("headlines", InstructConfig(limit=20, seed=8))
    assert {r["gold"] for r in first} <= {0, 1} and all(r["question"] for r in first)
    full = load_items("fpb", InstructConfig(limit=None))
    assert len(full) == 774


@pytest.fixture(scope="module")
def smol_tokenizer(smollm2_gguf):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)


def test_chat_prompt_equals_apply_chat_template_on_smollm2(smollm2_gguf, smol_tokenizer):
    template = gguf_chat_template(smollm2_gguf)
    assert template and template == smol_tokenizer.chat_template
    for messages in CONVERSATIONS:
        for gen in (True, False):
            ours = render_chat(template, messages, add_generation_prompt=gen)
            want = smol_tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=gen
            )
            assert ours == want
    assert ours.startswith("<|im_start|>system\nYou are a terse analyst.<|im_end|>")
    assert end_of_turn(template) == "<|im_end|>"
    # the prompt's token ids are the tokenizer's own too (special tokens parsed as such)
    ids = smol_tokenizer.encode(render_chat(template, CONVERSATIONS[0]), add_special_tokens=False)
    want_ids = smol_tokenizer.apply_chat_template(
        CONVERSATIONS[0], tokenize=True, add_generation_prompt=True
    )
    assert ids == list(getattr(want_ids, "input_ids", want_ids))
    assert ids[0] == smol_tokenizer.convert_tokens_to_ids("<|im_start|>")


def test_instruct_prompt_through_backend_template(smollm2_gguf, smol_tokenizer):
    class GGUFBackend:  # only what chat_template_of reads: the model path and its tokenizer
        name = str(smollm2_gguf)
        tokenizer = None

    template = chat_template_of(GGUFBackend())
    row = {"text": "Sales fell 5 %.", "label": "negative", "gold": 0}
    text = prompt_text(template, INSTRUCT_TASKS["fpb"], row, "", "")
    content = INSTRUCT_TASKS["fpb"].instruction.format(**row)
    assert text == smol_tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
    )
    assert text.endswith("Sentence: Sales fell 5 %.<|im_end|>\n<|im_start|>assistant\n")


SIMPLE_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant: {% endif %}"
)


def test_cli_runs_instruct_and_tatqa_axes(tmp_path, shared_data, capsys):
    """tools/evaluate.py --instruct --tatqa end to end on a tiny Llama given a chat template."""
    import json as _json

    from tests.test_eval_scoring import load_tool, make_tiny_llama

    model_dir = make_tiny_llama(tmp_path / "tiny")
    config = _json.loads((model_dir / "tokenizer_config.json").read_text())
    config["chat_template"] = SIMPLE_TEMPLATE
    (model_dir / "tokenizer_config.json").write_text(_json.dumps(config))
    out = tmp_path / "r.json"
    args = ["--hf", str(model_dir), "--instruct", "fpb,headlines", "--instruct-limit", "6",
            "--tatqa", "--tatqa-limit", "3", "--tatqa-shots", "1", "--output", str(out)]  # fmt: skip
    assert load_tool("evaluate").main(args) == 0
    result = _json.loads(out.read_text())
    assert set(result["instruct"]) == {"fpb", "headlines"}
    for row in result["instruct"].values():
        assert row["samples"] == 6
        assert 0 <= row["acc_ll"] <= 1 and 0 <= row["invalid_rate"] <= 1
        assert row["chat_nll"] > 0 and abs(row["chat_ppl"] - math.exp(row["chat_nll"])) < 1e-6
        # an invalid answer is never right: accuracy of answers <= share of valid answers
        assert row["acc_gen"] <= 1 - row["invalid_rate"] + 1e-9
    qa = result["tatqa"]
    assert qa["samples"] == 3 and qa["num_fewshot"] == 1
    assert sum(v["samples"] for v in qa["by_type"].values()) == 3
    assert "fpb (chat)" in capsys.readouterr().out
    # a model without a chat template: one line naming the model
    plain = make_tiny_llama(tmp_path / "plain")
    from megatron_cpt.errors import UserError

    with pytest.raises(UserError, match="no chat template"):
        load_tool("evaluate").main(["--hf", str(plain), "--instruct", "fpb", "--instruct-limit",
                                    "2", "--output", str(tmp_path / "x.json")])  # fmt: skip
    assert not (tmp_path / "x.json").exists()
