"""Greedy generation with stop sequences: KV-cached and batched where the backend allows it.

TAT-QA and the chat-template tasks generate answers after prompts of 500-3000 tokens. Re-running
the whole prompt for every new token (the logits seam alone) costs ``O(prompt x new tokens)``;
with a KV cache the prompt is run once and every later token is one position. So:

- :class:`~megatron_cpt.evaluation.backend.HFBackend` (HF directories, GGUF files, and every
  Megatron checkpoint after ``convert_checkpoint.py mcore-to-hf``) generates with the model's
  own cache: prompts left-padded into one batch with an attention mask and explicit position
  ids, the prompt run once with logits for its last position only, then one token per step.
- Any other backend (the Megatron backend) falls back to :func:`greedy_uncached`, a full
  re-forward per token. megatron-core's own inference path (``megatron.core.inference``) is not
  usable without a GPU: its text-generation controller and model wrappers allocate on
  ``torch.cuda.current_device()`` and time steps with CUDA events. To generate fast from a
  Megatron checkpoint on CPU, export it to HF first (what the demo evaluates).

Both paths are greedy (argmax, first index on ties), stop at EOS, at ``max_new`` tokens, or as
soon as the decoded continuation contains a stop string; and both return token ids, so the
test "KV-cached equals uncached, token for token" compares like with like.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from tqdm import tqdm

from megatron_cpt.evaluation.backend import Backend


@dataclass(frozen=True)
class GenRequest:
    prompt: Sequence[int]  # non-empty, already truncated to leave room for max_new tokens
    max_new: int
    until: tuple[str, ...] = ()  # stop strings (checked on the decoded continuation)


def _stopper(decode: Callable[[list[int]], str], until: Sequence[str]):
    stops = [s for s in until if s]

    def hit(tokens: list[int]) -> bool:
        if not stops:
            return False
        text = decode(tokens)
        return any(s in text for s in stops)

    return hit


@torch.inference_mode()
def greedy_uncached(backend: Backend, req: GenRequest, eos_id: int | None) -> list[int]:
    """Reference decoding: one full forward of prompt + continuation per new token."""
    ids = list(req.prompt)
    out: list[int] = []
    stop = _stopper(backend.tokenizer.decode, req.until)
    for _ in range(req.max_new):
        logits = backend.logits(torch.tensor([ids], dtype=torch.long))
        nxt = int(logits[0, -1].argmax())
        if nxt == eos_id:
            break
        ids.append(nxt)
        out.append(nxt)
        if stop(out):
            break
    return out


def supports_kv_cache(backend: Backend) -> bool:
    model = getattr(backend, "model", None)
    return model is not None and hasattr(model, "generation_config") and hasattr(model, "config")


def _cache_of(out):
    cache = getattr(out, "past_key_values", None)
    return cache if cache is not None else getattr(out, "cache", None)


@torch.inference_mode()
def _cached_batch(backend, batch: list[GenRequest], eos_id: int | None) -> list[list[int]]:
    """One left-padded batch through an HF causal LM with its KV cache."""
    model = backend.model
    device = backend.device
    pad = eos_id if eos_id is not None else 0
    width = max(len(r.prompt) for r in batch)
    ids = torch.full((len(batch), width), pad, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, req in enumerate(batch):
        ids[row, width - len(req.prompt) :] = torch.tensor(list(req.prompt), dtype=torch.long)
        mask[row, width - len(req.prompt) :] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(
        input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1
    )
    past = _cache_of(out)
    # transformers >= 5.2x names the forward argument ``cache`` (``past_key_values`` deprecated)
    cache_kw = (
        "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    )
    nxt = out.logits[:, -1].float().argmax(-1)
    stops = [_stopper(backend.tokenizer.decode, r.until) for r in batch]
    produced: list[list[int]] = [[] for _ in batch]
    done = [False] * len(batch)
    steps = max(r.max_new for r in batch)
    for step in range(steps):
        for row, req in enumerate(batch):
            if done[row]:
                continue
            token = int(nxt[row])
            if token == eos_id:
                done[row] = True
                continue
            produced[row].append(token)
            if len(produced[row]) >= req.max_new or stops[row](produced[row]):
                done[row] = True
        if all(done) or step == steps - 1:
            break
        mask = torch.cat([mask, mask.new_ones((len(batch), 1))], dim=1)
        positions = positions[:, -1:] + 1
        out = model(
            input_ids=nxt[:, None],
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            **{cache_kw: past},
        )
        past = _cache_of(out)
        nxt = out.logits[:, -1].float().argmax(-1)
    return produced


def greedy_generate(
    backend: Backend,
    requests: Sequence[GenRequest],
    eos_id: int | None,
    batch_size: int = 8,
    desc: str | None = "generate",
) -> list[list[int]]:
    """Generated token ids per request (EOS and the rest after a stop string not included
    beyond the token that completed the stop string; callers cut the text at the stop)."""
    for req in requests:
        if not req.prompt or req.max_new < 1:
            raise ValueError("a generation request needs a non-empty prompt and max_new >= 1")
    results: list[list[int] | None] = [None] * len(requests)
    bar = tqdm(total=len(requests), desc=desc, disable=desc is None, unit="seq")
    if not supports_kv_cache(backend):
        for index, req in enumerate(requests):
            results[index] = greedy_uncached(backend, req, eos_id)
            bar.update(1)
        bar.close()
        return results  # type: ignore[return-value]
    order = sorted(range(len(requests)), key=lambda i: -len(requests[i].prompt))
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        for index, tokens in zip(
            chunk, _cached_batch(backend, [requests[i] for i in chunk], eos_id)
        ):
            results[index] = tokens
        bar.update(len(chunk))
    bar.close()
    return results  # type: ignore[return-value]
