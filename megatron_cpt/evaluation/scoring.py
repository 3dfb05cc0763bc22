"""Batched log-likelihood of target tokens given a context: the single scoring kernel.

Both rolling-window perplexity and lm-eval's ``loglikelihood`` reduce to "score these target
tokens after this context", so both call :func:`score_requests`. Sequences are sorted longest
first and right-padded: with causal attention, padding after the last real token cannot change
the logits of real positions, so no attention mask is needed and the same call works for HF
and Megatron backends alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from tqdm import tqdm

from megatron_cpt.evaluation.backend import Backend


@dataclass(frozen=True)
class ScoreRequest:
    context: Sequence[int]  # at least one token (BOS/EOS when the text has no prefix)
    target: Sequence[int]  # the tokens whose log-probabilities are summed


@dataclass(frozen=True)
class Score:
    logprob: float  # sum of natural-log probabilities of the target tokens
    greedy: bool  # every target token is the argmax continuation
    ntokens: int


def score_requests(
    backend: Backend,
    requests: Sequence[ScoreRequest],
    batch_size: int = 8,
    max_length: int | None = None,
    desc: str | None = "scoring",
) -> list[Score]:
    """Score each request; the input is left-truncated to ``max_length`` like lm-eval does."""
    max_length = max_length or backend.max_length
    prepared = []
    for index, req in enumerate(requests):
        if not req.context or not req.target:
            raise ValueError("a score request needs a non-empty context and target")
        if len(req.target) > max_length:
            raise ValueError(f"target of {len(req.target)} tokens exceeds max_length {max_length}")
        tokens = (list(req.context) + list(req.target))[-(max_length + 1) :][:-1]
        prepared.append((index, tokens, list(req.target)))
    prepared.sort(key=lambda item: -len(item[1]))

    results: list[Score | None] = [None] * len(prepared)
    quiet = desc is None or (dist.is_initialized() and dist.get_rank() != 0)  # TP/PP: one bar
    bar = tqdm(total=len(prepared), desc=desc, disable=quiet, unit="seq")
    for start in range(0, len(prepared), batch_size):
        chunk = prepared[start : start + batch_size]
        width = len(chunk[0][1])
        batch = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, (_, tokens, _) in enumerate(chunk):
            batch[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        logits = backend.logits(batch)
        for row, (index, tokens, target) in enumerate(chunk):
            n = len(target)
            scored = logits[row, len(tokens) - n : len(tokens)].float()
            logprobs = torch.log_softmax(scored, dim=-1)
            want = torch.tensor(target, dtype=torch.long, device=logprobs.device)
            picked = logprobs.gather(1, want[:, None]).squeeze(1)
            greedy = bool((logprobs.argmax(dim=-1) == want).all())
            results[index] = Score(float(picked.double().sum()), greedy, n)
        del logits
        bar.update(len(chunk))
    bar.close()
    return results  # type: ignore[return-value]
