"""Supervised fine-tuning data: chat JSONL -> packed token + loss-mask shards.

Why this shape:

- **Chat template from the model.** A conversation is rendered with the model's own chat
  template (:mod:`megatron_cpt.evaluation.chat`: GGUF metadata, an HF directory's tokenizer
  config, or ``--chat-template FILE``), so fine-tuning sees exactly the text the model sees at
  inference.
- **Loss on assistant tokens only.** The rendered text is split at the points where each
  assistant answer begins and where its end-of-turn text (``<|im_end|>``, ``<|eot_id|>``) ends;
  every piece is tokenized separately and only the answer pieces get mask 1. The split points
  come from rendering prefixes of the conversation (``messages[:i]`` with the generation prompt
  is where answer ``i`` starts), so no template is parsed by us. A template whose prefixes are
  not prefixes of the whole conversation is reported, not guessed around.
- **Two parallel shards megatron-core reads.** ``PREFIX_tokens.{bin,idx}`` and
  ``PREFIX_mask.{bin,idx}`` (uint8) have identical layouts: one *document* per training sample
  of exactly ``seq_length + 1`` tokens (inputs and shifted labels), one *sequence* per
  conversation inside it, plus a trailing padding sequence when the sample is not full. The
  conversation boundaries are therefore in the ``.idx`` itself (``sequence_lengths`` /
  ``document_indices``), which is what position-id and attention resets need
  (:func:`read_sample`).
- **Packing or padding.** ``pack`` fills each sample greedily in input order with whole
  conversations; ``pad`` puts one conversation per sample. Padding tokens are the tokenizer's
  pad (else end-of-document) token with mask 0.
- **Over-length conversations** (more than ``seq_length + 1`` tokens) are truncated (the head
  is kept) or skipped, by flag, and counted either way; a conversation left without any loss
  token is skipped and counted.
- **Bad input** follows preprocessing's policy: one ``file:line: field ...`` error, or with
  ``--skip-bad-lines`` a count per reason.

Single process on purpose: SFT sets are small next to CPT corpora, and greedy packing is
sequential.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megatron_cpt.data.indexed import (
    IndexedWriter,
    bin_path,
    idx_path,
    remove_temporaries,
    token_dtype,
)
from megatron_cpt.data.jsonl import JsonlRecord, expand_inputs, iter_jsonl
from megatron_cpt.errors import BadInputError, UserError
from megatron_cpt.evaluation.chat import end_of_turn, gguf_chat_template, render_chat
from megatron_cpt.tokenizers import Tokenizer, build_tokenizer

ROLES = ("system", "user", "assistant")
PACKING_MODES = ("pack", "pad")
OVERLONG_MODES = ("truncate", "skip")

# Skip-counter keys (bad lines) beyond the JSONL reader's.
BAD_CONVERSATION = "bad_conversation"
NO_ASSISTANT = "no_assistant_turn"
# Counted outcomes of valid conversations.
TRUNCATED = "truncated_overlong"
SKIPPED_OVERLONG = "skipped_overlong"
NO_LOSS_TOKENS = "skipped_no_loss_tokens"


@dataclass(frozen=True)
class SftConfig:
    inputs: tuple[str, ...] | list[str]
    output_prefix: str
    tokenizer_type: str
    tokenizer_model: str
    seq_length: int
    packing: str = "pack"
    overlong: str = "truncate"
    chat_template: str | None = None  # a file with the Jinja template; default: the model's
    skip_bad_lines: bool = False


def output_prefixes(output_prefix: str) -> dict[str, str]:
    return {"tokens": f"{output_prefix}_tokens", "mask": f"{output_prefix}_mask"}


# ---------------------------------------------------------------------------------------------
# records -> conversations


def _bad(record: JsonlRecord, problem: str, reason: str = BAD_CONVERSATION) -> BadInputError:
    return BadInputError(record.path, record.line, problem, reason)


def conversation_of(record: JsonlRecord) -> list[dict]:
    """The record as a list of ``{role, content}`` messages, validated field by field.

    Accepts ``{"messages": [{"role", "content"}, ...]}`` (OpenAI/HF chat form) or
    ``{"prompt": str, "response": str}`` (one user turn, one assistant turn).
    """
    obj = record.obj
    if "messages" in obj:
        messages = obj["messages"]
        if not isinstance(messages, list) or not messages:
            raise _bad(record, "field 'messages' must be a non-empty list of {role, content}")
        out = []
        for i, message in enumerate(messages):
            where = f"field 'messages[{i}]'"
            if not isinstance(message, dict):
                raise _bad(record, f"{where} is {type(message).__name__}, expected an object")
            role, content = message.get("role"), message.get("content")
            if role not in ROLES:
                raise _bad(record, f"{where}.role is {role!r}, expected one of {', '.join(ROLES)}")
            if not isinstance(content, str):
                raise _bad(
                    record,
                    f"{where}.content is {type(content).__name__}, expected a string",
                )
            out.append({"role": role, "content": content})
        assistant = [i for i, m in enumerate(out) if m["role"] == "assistant"]
        if not assistant:
            raise _bad(record, "field 'messages' has no assistant turn to learn", NO_ASSISTANT)
        if not any(m["role"] == "user" for m in out[: assistant[0]]):
            raise _bad(
                record,
                f"field 'messages[{assistant[0]}]': an assistant turn before any user turn",
            )
        return out
    if "prompt" in obj or "response" in obj:
        for key in ("prompt", "response"):
            if key not in obj:
                raise _bad(record, f"missing key {key!r} (prompt/response form)", "missing_key")
            if not isinstance(obj[key], str):
                raise _bad(
                    record,
                    f"key {key!r} is {type(obj[key]).__name__}, expected a string",
                    "non_string_key",
                )
        return [
            {"role": "user", "content": obj["prompt"]},
            {"role": "assistant", "content": obj["response"]},
        ]
    raise _bad(record, "missing key 'messages' (or 'prompt' and 'response')", "missing_key")


# ---------------------------------------------------------------------------------------------
# chat template -> tokens + mask


def chat_template_for(tokenizer_model: str | Path, template_file: str | None = None) -> str:
    """The Jinja chat template: ``template_file`` if given, else the tokenizer model's own
    (GGUF metadata; an HF directory's ``chat_template.jinja`` / ``tokenizer_config.json``)."""
    if template_file:
        try:
            return Path(template_file).read_text(encoding="utf-8")
        except OSError as exc:
            raise UserError(f"--chat-template {template_file}: {exc.strerror or exc}") from None
    path = Path(tokenizer_model)
    template = None
    if path.suffix == ".gguf" and path.is_file():
        template = gguf_chat_template(path)
    else:
        directory = path if path.is_dir() else path.parent
        jinja = directory / "chat_template.jinja"
        config = directory / "tokenizer_config.json"
        if jinja.is_file():
            template = jinja.read_text(encoding="utf-8")
        elif config.is_file():
            try:
                template = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
            except json.JSONDecodeError as exc:
                raise UserError(f"{config}: invalid JSON ({exc.msg})") from None
            if isinstance(template, list):  # named templates: the default one
                named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
                template = named.get("default")
    if not isinstance(template, str) or not template.strip():
        raise UserError(
            f"--tokenizer-model {tokenizer_model}: no chat template found (GGUF "
            "tokenizer.chat_template, chat_template.jinja or tokenizer_config.json); "
            "give one with --chat-template FILE"
        )
    return template


class ChatEncoder:
    """Tokenizes a conversation with a chat template; mask 1 on assistant answers + end of turn."""

    def __init__(self, tokenizer: Tokenizer, template: str):
        self.tokenizer = tokenizer
        self.template = template
        eod, bos = getattr(tokenizer, "eod", None), getattr(tokenizer, "bos", None)
        self.eos_text = tokenizer.decode([eod]) if eod is not None else ""
        self.bos_text = tokenizer.decode([bos]) if bos is not None else ""
        self.end_of_turn = end_of_turn(template, self.bos_text, self.eos_text)

    def _render(self, messages: list[dict], generation_prompt: bool) -> str:
        return render_chat(self.template, messages, generation_prompt, self.bos_text, self.eos_text)

    def segments(self, messages: list[dict]) -> list[tuple[str, bool]]:
        """The rendered conversation as ``(text, trained)`` pieces, in order."""
        full = self._render(messages, False)
        pieces: list[tuple[str, bool]] = []
        done = 0
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            start = len(self._render(messages[:i], True))
            turn = self._render(messages[: i + 1], False)
            if not (full.startswith(turn) and len(turn) >= start and start >= done):
                raise UserError(
                    "chat template: rendering a conversation's prefix does not give a prefix "
                    "of the whole conversation, so answer spans cannot be located"
                )
            answer = turn[start:]
            at = answer.find(message["content"]) if message["content"] else 0
            at = max(at, 0) + len(message["content"])
            close = answer.find(self.end_of_turn, at) if self.end_of_turn else -1
            end = start + (close + len(self.end_of_turn) if close >= 0 else len(answer))
            pieces.append((full[done:start], False))
            pieces.append((full[start:end], True))
            done = end
        pieces.append((full[done:], False))
        return [(text, trained) for text, trained in pieces if text]

    def encode(self, messages: list[dict]) -> tuple[np.ndarray, np.ndarray]:
        """``(token ids, loss mask)`` of one conversation."""
        ids: list[int] = []
        mask: list[int] = []
        for text, trained in self.segments(messages):
            piece = self.tokenizer.encode(text)
            ids.extend(piece)
            mask.extend([int(trained)] * len(piece))
        ids_array = np.asarray(ids, dtype=np.int64)
        mask_array = np.asarray(mask, dtype=np.uint8)
        if mask_array.size:
            mask_array[0] = 0  # never a label across a conversation boundary
        return ids_array, mask_array


# ---------------------------------------------------------------------------------------------
# conversations -> samples


class SamplePacker:
    """Groups conversations into samples of ``sample_tokens`` tokens (greedy, in order)."""

    def __init__(self, sample_tokens: int, pad_id: int, packing: str):
        self.sample_tokens = sample_tokens
        self.pad_id = pad_id
        self.packing = packing
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []
        self._used = 0

    def add(self, ids: np.ndarray, mask: np.ndarray) -> Iterator[list]:
        if self._pending and (self.packing == "pad" or self._used + ids.size > self.sample_tokens):
            yield self._flush()
        self._pending.append((ids, mask))
        self._used += ids.size

    def finish(self) -> Iterator[list]:
        if self._pending:
            yield self._flush()

    def _flush(self) -> list[tuple[np.ndarray, np.ndarray]]:
        sample, self._pending = self._pending, []
        free = self.sample_tokens - self._used
        self._used = 0
        if free:
            sample.append((np.full(free, self.pad_id, np.int64), np.zeros(free, np.uint8)))
        return sample


def _write_sample(writers: dict[str, IndexedWriter], sample: list) -> None:
    lengths = np.array([ids.size for ids, _ in sample])
    count = np.array([len(sample)])
    writers["tokens"].add_documents(np.concatenate([ids for ids, _ in sample]), lengths, count)
    writers["mask"].add_documents(np.concatenate([m for _, m in sample]), lengths, count)


def run_sft_preprocess(
    config: SftConfig, tokenizer: Tokenizer | None = None, progress_stream=None
) -> dict:
    """Tokenize chat JSONL into ``PREFIX_tokens`` / ``PREFIX_mask`` shards; the summary dict."""
    if config.seq_length < 2:
        raise UserError(f"--seq-length {config.seq_length}: must be at least 2")
    if config.packing not in PACKING_MODES:
        raise UserError(f"--packing {config.packing}: choose one of {', '.join(PACKING_MODES)}")
    if config.overlong not in OVERLONG_MODES:
        raise UserError(f"--overlong {config.overlong}: choose one of {', '.join(OVERLONG_MODES)}")
    start = time.perf_counter()
    paths = expand_inputs(config.inputs)
    if tokenizer is None:
        tokenizer = build_tokenizer(config.tokenizer_type, config.tokenizer_model)
    encoder = ChatEncoder(
        tokenizer, chat_template_for(config.tokenizer_model, config.chat_template)
    )
    pad_id = tokenizer.pad if getattr(tokenizer, "pad", None) is not None else tokenizer.eod
    sample_tokens = config.seq_length + 1
    packer = SamplePacker(sample_tokens, pad_id, config.packing)
    prefixes = output_prefixes(config.output_prefix)
    skipped: Counter = Counter()
    counts: Counter = Counter()
    writers: dict[str, IndexedWriter] = {}
    try:
        writers["tokens"] = IndexedWriter(prefixes["tokens"], token_dtype(tokenizer.vocab_size))
        writers["mask"] = IndexedWriter(prefixes["mask"], np.uint8)
        records = iter_jsonl(paths, skip_bad_lines=config.skip_bad_lines, skipped=skipped)
        for record in records:
            try:
                messages = conversation_of(record)
            except BadInputError as err:
                if not config.skip_bad_lines:
                    raise
                skipped[err.reason] += 1
                continue
            ids, mask = encoder.encode(messages)
            if ids.size > sample_tokens:
                if config.overlong == "skip":
                    counts[SKIPPED_OVERLONG] += 1
                    continue
                counts[TRUNCATED] += 1
                ids, mask = ids[:sample_tokens], mask[:sample_tokens]
            if not mask.any():
                counts[NO_LOSS_TOKENS] += 1
                continue
            counts["conversations"] += 1
            counts["loss_tokens"] += int(mask.sum())
            counts["conversation_tokens"] += int(ids.size)
            for sample in packer.add(ids, mask):
                _write_sample(writers, sample)
        for sample in packer.finish():
            _write_sample(writers, sample)
        if writers["tokens"].documents == 0:
            raise UserError(
                f"--input {' '.join(map(str, config.inputs))}: no usable conversation "
                f"(skipped: {dict(skipped) or 'none'}, {dict(counts) or 'nothing counted'})"
            )
        for writer in writers.values():
            writer.finalize()
    except BaseException:
        for writer in writers.values():
            writer.abort()
        for prefix in prefixes.values():
            remove_temporaries(prefix)
        raise
    samples = writers["tokens"].documents
    summary = {
        "outputs": {
            name: {"bin": str(bin_path(p)), "idx": str(idx_path(p))} for name, p in prefixes.items()
        },
        "seq_length": config.seq_length,
        "packing": config.packing,
        "samples": samples,
        "conversations": counts["conversations"],
        "conversation_tokens": counts["conversation_tokens"],
        "loss_tokens": counts["loss_tokens"],
        "padding_tokens": samples * sample_tokens - counts["conversation_tokens"],
        "truncated_overlong": counts[TRUNCATED],
        "skipped_overlong": counts[SKIPPED_OVERLONG],
        "skipped_no_loss_tokens": counts[NO_LOSS_TOKENS],
        "skipped_bad_lines": dict(skipped),
        "seconds": round(time.perf_counter() - start, 3),
    }
    if progress_stream is not None:
        print(
            f"sft: {samples} samples from {counts['conversations']} conversations",
            file=progress_stream,
        )
    return summary


# ---------------------------------------------------------------------------------------------
# reading samples back (megatron-core's IndexedDataset)


class SftSamples:
    """Training samples from a ``PREFIX_tokens`` / ``PREFIX_mask`` pair.

    Each item is a dict of ``seq_length``-long numpy arrays: ``tokens`` (inputs), ``labels``
    (next tokens), ``loss_mask`` (1 where the label is an assistant token), ``position_ids``
    (restarting at 0 in every conversation) and ``segment_ids`` (1, 2, ... per conversation,
    0 for padding), from which a block-diagonal causal attention mask is built.
    """

    def __init__(self, prefix: str | Path):
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        names = output_prefixes(str(prefix))
        for name in names.values():
            for path in (bin_path(name), idx_path(name)):
                if not path.is_file():
                    raise UserError(f"{path}: missing (write it with tools/preprocess_sft.py)")
        self.tokens = IndexedDataset(names["tokens"])
        self.mask = IndexedDataset(names["mask"])
        if not (
            np.array_equal(self.tokens.sequence_lengths, self.mask.sequence_lengths)
            and np.array_equal(self.tokens.document_indices, self.mask.document_indices)
        ):
            raise UserError(f"{prefix}: the _tokens and _mask shards do not have the same layout")
        docs = self.tokens.document_indices
        sizes = np.add.reduceat(self.tokens.sequence_lengths, docs[:-1]) if len(docs) > 1 else []
        if len(sizes) and not np.all(sizes == sizes[0]):
            raise UserError(f"{prefix}: samples differ in length; not an SFT shard pair")
        self.sample_tokens = int(sizes[0]) if len(sizes) else 0

    def __len__(self) -> int:
        return len(self.tokens.document_indices) - 1

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return read_sample(self.tokens, self.mask, index)


def read_sample(tokens, mask, index: int) -> dict[str, np.ndarray]:
    """One sample (see :class:`SftSamples`) from the two IndexedDatasets."""
    first, last = tokens.document_indices[index], tokens.document_indices[index + 1]
    seqs = tokens[first:last]
    masks = mask[first:last]
    ids = np.concatenate(seqs).astype(np.int64)
    loss = np.concatenate(masks).astype(np.float32)
    positions = np.concatenate([np.arange(s.size) for s in seqs])
    segments = np.concatenate(
        [np.full(s.size, i + 1 if m.any() else 0) for i, (s, m) in enumerate(zip(seqs, masks))]
    )
    return {
        "tokens": ids[:-1],
        "labels": ids[1:],
        "loss_mask": loss[1:],
        "position_ids": positions[:-1],
        "segment_ids": segments[:-1],
    }


def packed_attention_mask(segment_ids) -> np.ndarray:
    """Megatron-core's boolean attention mask (True = masked out) for packed samples:
    causal and block-diagonal by conversation, shape ``[batch, 1, seq, seq]``."""
    seg = np.asarray(segment_ids)
    if seg.ndim == 1:
        seg = seg[None]
    length = seg.shape[-1]
    causal = np.tril(np.ones((length, length), dtype=bool))
    same = seg[:, :, None] == seg[:, None, :]
    return ~(causal[None] & same)[:, None]
