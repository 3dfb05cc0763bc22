"""SFT data on SmolLM2's real chat template: assistant-only masks, packing layout, over-length
policy and every bad-input class (one file:line error naming the field, or counted skips)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron_cpt.data.sft import (
    ChatEncoder,
    SftConfig,
    SftSamples,
    chat_template_for,
    packed_attention_mask,
    run_sft_preprocess,
)
from megatron_cpt.errors import BadInputError, UserError
from megatron_cpt.evaluation.chat import render_chat
from megatron_cpt.tokenizers import build_tokenizer

REPO = Path(__file__).resolve().parent.parent

MULTI_TURN = [
    {"role": "system", "content": "You answer in one word."},
    {"role": "user", "content": "Is revenue up 12% good news?"},
    {"role": "assistant", "content": "positive"},
    {"role": "user", "content": "And a profit warning?"},
    {"role": "assistant", "content": "negative"},
]


@pytest.fixture(scope="module")
def tok(smollm2_gguf):
    return build_tokenizer("HuggingFaceTokenizer", smollm2_gguf)


@pytest.fixture(scope="module")
def encoder(tok, smollm2_gguf):
    return ChatEncoder(tok, chat_template_for(smollm2_gguf))


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def config(tmp_path, inputs, gguf, **kw) -> SftConfig:
    kw.setdefault("seq_length", 64)
    return SftConfig(
        inputs=[str(inputs)],
        output_prefix=str(tmp_path / "out"),
        tokenizer_type="HuggingFaceTokenizer",
        tokenizer_model=str(gguf),
        **kw,
    )


def test_mask_covers_only_assistant_answers_and_end_of_turn(encoder, tok):
    ids, mask = encoder.encode(MULTI_TURN)
    # the pieces tokenize to exactly the tokens of the whole rendered conversation
    full = render_chat(encoder.template, MULTI_TURN, add_generation_prompt=False)
    assert ids.tolist() == tok.encode(full)
    assert encoder.end_of_turn == "<|im_end|>"
    # the trained tokens are the answers and their end-of-turn token, nothing else
    assert tok.decode(ids[mask == 1]) == "positive<|im_end|>negative<|im_end|>"
    # every run of trained tokens is one answer, preceded by the assistant header
    runs = np.flatnonzero(np.diff(np.concatenate([[0], mask, [0]])))
    spans = list(zip(runs[::2], runs[1::2]))
    assert [tok.decode(ids[a:b]) for a, b in spans] == ["positive<|im_end|>", "negative<|im_end|>"]
    for a, _ in spans:
        assert tok.decode(ids[:a]).endswith("<|im_start|>assistant\n")
    untrained = tok.decode(ids[mask == 0])
    assert "You answer in one word." in untrained and "profit warning" in untrained
    assert "positive" not in untrained and "negative" not in untrained


def test_prompt_response_form_equals_messages_form(tmp_path, tok, smollm2_gguf):
    rows = [
        {"prompt": "Q?", "response": "A."},
        {"messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}]},
    ]
    summary = run_sft_preprocess(
        config(tmp_path, write_jsonl(tmp_path / "in.jsonl", rows), smollm2_gguf, packing="pad"),
        tokenizer=tok,
    )
    assert summary["samples"] == 2 and summary["conversations"] == 2
    samples = SftSamples(tmp_path / "out")
    for key in ("tokens", "labels", "loss_mask"):
        np.testing.assert_array_equal(samples[0][key], samples[1][key])


def test_packing_layout_positions_segments_and_padding(tmp_path, tok, encoder, smollm2_gguf):
    rows = [{"prompt": f"question number {i}?", "response": f"answer {i}"} for i in range(9)]
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    lengths = [
        encoder.encode(conv)[0].size
        for conv in [
            [
                {"role": "user", "content": r["prompt"]},
                {"role": "assistant", "content": r["response"]},
            ]
            for r in rows
        ]
    ]
    seq = 2 * max(lengths) + 3  # room for two conversations, not three
    assert 3 * max(lengths) > seq + 1
    packed = run_sft_preprocess(config(tmp_path, path, smollm2_gguf, seq_length=seq), tokenizer=tok)
    samples = SftSamples(tmp_path / "out")
    assert samples.sample_tokens == seq + 1
    assert packed["samples"] == len(samples) == 5  # 2+2+2+2+1, greedily in order
    assert packed["padding_tokens"] == 5 * (seq + 1) - sum(lengths)
    item = samples[0]
    a = lengths[0]
    assert all(item[k].shape == (seq,) for k in item)
    np.testing.assert_array_equal(item["position_ids"][: a + 3], [*range(a), 0, 1, 2])
    assert set(item["segment_ids"][:a]) == {1} and item["segment_ids"][a] == 2
    assert item["loss_mask"][a - 1] == 0  # the label crossing into the next conversation
    assert tok.decode(item["labels"][item["loss_mask"] > 0]) == (
        "answer 0<|im_end|>answer 1<|im_end|>"
    )
    # padding has segment 0 and no loss
    tail = item["segment_ids"] == 0
    assert tail.any() and not item["loss_mask"][tail].any()
    # the attention mask is causal and block-diagonal per conversation
    blocked = packed_attention_mask(item["segment_ids"])[0, 0]
    assert blocked[a, a - 1] and not blocked[a - 1, 0] and not blocked[a + 1, a] and blocked[0, 1]
    # padding mode: one conversation per sample
    padded = run_sft_preprocess(
        config(tmp_path, path, smollm2_gguf, seq_length=seq, packing="pad"), tokenizer=tok
    )
    assert padded["samples"] == 9 and padded["conversation_tokens"] == sum(lengths)


def test_overlong_truncated_or_skipped_and_counted(tmp_path, tok, smollm2_gguf):
    rows = [
        {"prompt": "short?", "response": "yes"},
        {"prompt": "long " * 10, "response": "word " * 200},  # answer survives truncation
        {"prompt": "long " * 200, "response": "cut"},  # answer truncated away
    ]
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    t = run_sft_preprocess(config(tmp_path, path, smollm2_gguf), tokenizer=tok)
    assert (t["truncated_overlong"], t["skipped_no_loss_tokens"], t["conversations"]) == (2, 1, 2)
    s = run_sft_preprocess(config(tmp_path, path, smollm2_gguf, overlong="skip"), tokenizer=tok)
    assert (s["skipped_overlong"], s["truncated_overlong"], s["conversations"]) == (2, 0, 1)


BAD = {
    "invalid_json": ('{"prompt": "x', "invalid JSON"),
    "not_an_object": ('["prompt"]', "expected a JSON object"),
    "no_form": ({"text": "plain"}, "missing key 'messages'"),
    "missing_response": ({"prompt": "x"}, "missing key 'response'"),
    "non_string_prompt": ({"prompt": 3, "response": "y"}, "key 'prompt' is int"),
    "messages_not_list": ({"messages": "hi"}, "field 'messages' must be a non-empty list"),
    "message_not_object": ({"messages": ["hi"]}, "field 'messages[0]' is str"),
    "bad_role": (
        {"messages": [{"role": "bot", "content": "x"}]},
        "field 'messages[0]'.role is 'bot'",
    ),
    "content_not_string": (
        {"messages": [{"role": "user", "content": None}]},
        "field 'messages[0]'.content is NoneType",
    ),
    "no_assistant": (
        {"messages": [{"role": "user", "content": "x"}]},
        "no assistant turn",
    ),
    "assistant_first": (
        {"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]},
        "an assistant turn before any user turn",
    ),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_line_names_file_line_and_field_and_leaves_nothing(tmp_path, tok, smollm2_gguf, name):
    bad, words = BAD[name]
    good = {"prompt": "fine?", "response": "yes"}
    path = write_jsonl(tmp_path / "in.jsonl", [good, good, bad, good])
    with pytest.raises(BadInputError) as err:
        run_sft_preprocess(config(tmp_path, path, smollm2_gguf), tokenizer=tok)
    assert str(err.value).startswith(f"{path}:3: ") and words in str(err.value)
    assert list(tmp_path.iterdir()) == [path]  # no shard, no temporary left behind
    summary = run_sft_preprocess(
        config(tmp_path, path, smollm2_gguf, skip_bad_lines=True), tokenizer=tok
    )
    assert sum(summary["skipped_bad_lines"].values()) == 1 and summary["conversations"] == 3


def test_no_usable_conversation_and_bad_flags(tmp_path, tok, smollm2_gguf):
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "long " * 300, "response": "x"}])
    with pytest.raises(UserError, match="no usable conversation"):
        run_sft_preprocess(config(tmp_path, path, smollm2_gguf), tokenizer=tok)
    with pytest.raises(UserError, match="--seq-length 1"):
        run_sft_preprocess(config(tmp_path, path, smollm2_gguf, seq_length=1), tokenizer=tok)
    with pytest.raises(UserError, match="no chat template"):
        chat_template_for(tmp_path / "tokenizer.json")


def test_cli_bad_line_is_one_error_line_exit_2(tmp_path, smollm2_gguf):
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "q", "response": "a"}, {"prompt": 1}])
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "preprocess_sft.py"),
            "--input",
            str(path),
            "--output-prefix",
            str(tmp_path / "out"),
            "--tokenizer-type",
            "HuggingFaceTokenizer",
            "--tokenizer-model",
            str(smollm2_gguf),
            "--seq-length",
            "64",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {path}:2: key 'prompt' is int, expected a string"]
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]
