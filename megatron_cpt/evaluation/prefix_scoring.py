"""Label scoring that runs each prompt once: the prompt's KV cache shared by all its answers.

:func:`megatron_cpt.evaluation.instruct.label_logprobs` scores every (prompt, answer) pair as
its own sequence, so a 3-label task with two casings per label forwards each prompt six
times. That is fine for 25-item demo subsets, but a 5-shot chat prompt is ~450 tokens and the
SFT-vs-few-shot experiment (``bench/sft_vs_fewshot.py``) scores hundreds of them on one CPU
core. Here the prompt (all but its last token) is forwarded once with ``use_cache=True``, the
cache is repeated for the answers, and the answers (each prefixed by the prompt's last token)
are forwarded as one right-padded batch on top of it. Right padding after an answer's last
token cannot change its logits (causal attention), as in ``scoring.py``.

The result is the same ``[item][answer]`` table of :class:`Score` as ``label_logprobs`` (equal
to fp32 rounding; tested on a random Llama and checked on the real model by the bench), so
``instruct.label_choice(..., table_fn=cached_label_logprobs)`` is the same scorer, only
faster. Hugging Face models only: megatron-core's KV-cache inference path needs CUDA.
"""

from __future__ import annotations

import inspect

import torch
from tqdm import tqdm

from megatron_cpt.evaluation.generation import _cache_of
from megatron_cpt.evaluation.scoring import Score


@torch.inference_mode()
def cached_label_logprobs(
    backend,
    prompts: list[list[int]],
    answers: list[list[int]],
    batch_size: int = 8,  # unused: one prompt per forward; kept for label_choice's signature
    desc: str | None = None,
) -> list[list[Score]]:
    """``[item][answer]`` scores of each whole answer after each prompt (an HFBackend)."""
    model = backend.model
    device = backend.device
    if not answers or any(not a for a in answers):
        raise ValueError("every answer needs at least one token")
    width = max(len(a) for a in answers)
    # transformers >= 5.2x names the forward argument ``cache`` (``past_key_values`` deprecated)
    cache_kw = (
        "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    )
    table = []
    for prompt in tqdm(prompts, desc=desc, disable=desc is None, unit="prompt"):
        if len(prompt) < 2:
            raise ValueError("a cached prompt needs at least two tokens")
        if len(prompt) + width - 1 > backend.max_length:
            raise ValueError(f"prompt of {len(prompt)} tokens exceeds max_length")
        head = torch.tensor([prompt[:-1]], dtype=torch.long, device=device)
        cache = _cache_of(model(input_ids=head, use_cache=True))
        cache.batch_repeat_interleave(len(answers))
        batch = torch.zeros((len(answers), width), dtype=torch.long, device=device)
        for row, answer in enumerate(answers):
            batch[row, : len(answer)] = torch.tensor([prompt[-1], *answer[:-1]])
        logits = model(input_ids=batch, use_cache=True, **{cache_kw: cache}).logits
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        row_scores = []
        for row, answer in enumerate(answers):
            want = torch.tensor(answer, dtype=torch.long, device=device)
            lp = logprobs[row, : len(answer)]
            picked = lp.gather(1, want[:, None]).squeeze(1)
            greedy = bool((lp.argmax(dim=-1) == want).all())
            row_scores.append(Score(float(picked.double().sum()), greedy, len(answer)))
        table.append(row_scores)
    return table
