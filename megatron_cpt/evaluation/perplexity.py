"""Perplexity and bits-per-byte of named JSONL sets, with lm-eval-style rolling windows.

Token perplexity depends on the tokenizer, so a CPT model with a different (or extended)
vocabulary cannot be compared with its base by ppl alone; bits-per-byte (total NLL in bits over
the UTF-8 bytes of the scored text) can. Long documents are cut into windows exactly like
lm-eval's ``loglikelihood_rolling`` (its own window generator is reused): every token of a
document is scored exactly once, the first one conditioned on BOS (or EOS, i.e. the document
separator CPT data uses), each with up to ``seq_length`` tokens of context. A ``stride`` below
``seq_length`` gives later windows more context (``seq_length - stride`` extra tokens) at the
cost of more forward passes.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from megatron_cpt.data.jsonl import read_texts
from megatron_cpt.errors import UserError
from megatron_cpt.evaluation.backend import Backend
from megatron_cpt.evaluation.scoring import ScoreRequest, score_requests


@dataclass
class PerplexityConfig:
    seq_length: int = 1024  # model input length per window
    stride: int | None = None  # new tokens scored per later window; None = seq_length (lm-eval)
    batch_size: int = 8
    max_docs: int | None = None  # per set; the first N documents
    text_key: str = "text"
    prefix: str = "bos"  # token conditioning each document's first token: bos | eos
    skip_bad_lines: bool = False

    def validate(self) -> None:
        if self.seq_length < 1:
            raise UserError(f"--seq-length {self.seq_length}: must be >= 1")
        if self.stride is not None and not 1 <= self.stride <= self.seq_length:
            raise UserError(f"--stride {self.stride}: must be in [1, --seq-length]")
        if self.batch_size < 1:
            raise UserError(f"--batch-size {self.batch_size}: must be >= 1")
        if self.max_docs is not None and self.max_docs < 1:
            raise UserError(f"--max-docs {self.max_docs}: must be >= 1")
        if self.prefix not in ("bos", "eos"):
            raise UserError(f"--prefix {self.prefix}: expected bos or eos")


@dataclass
class SetResult:
    name: str
    paths: list[str]
    docs: int
    tokens: int  # scored tokens (every document token exactly once)
    bytes: int  # UTF-8 bytes of the scored texts
    nll: float  # summed negative log-likelihood, nats
    ppl: float  # exp(nll / tokens): tokenizer-dependent
    bpb: float  # nll / ln 2 / bytes: tokenizer-independent
    skipped: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)


def prefix_token(backend: Backend, which: str) -> int:
    tok = backend.tokenizer
    preferred = tok.bos_id if which == "bos" else tok.eos_id
    fallback = tok.eos_id if which == "bos" else tok.bos_id
    token = preferred if preferred is not None else fallback
    if token is None:
        raise UserError(
            "the tokenizer has neither a BOS nor an EOS token to condition documents on"
        )
    return token


def rolling_requests(
    tokens: Sequence[int], prefix: int, seq_length: int, stride: int | None = None
) -> list[ScoreRequest]:
    """Windows that score every token once; ``stride`` = tokens newly scored per later window."""
    stride = stride or seq_length
    windows = get_rolling_token_windows(
        token_list=list(tokens),
        prefix_token=prefix,
        max_seq_len=seq_length,
        context_len=seq_length - stride + 1,
    )
    return [ScoreRequest(*make_disjoint_window(w)) for w in windows]


def score_texts(
    backend: Backend, texts: Iterable[str], cfg: PerplexityConfig, desc: str | None = "ppl"
) -> tuple[int, int, int, float]:
    """``(docs, tokens, bytes, nll)`` summed over texts; empty texts are not documents."""
    if cfg.seq_length > backend.max_length:
        # beyond its trained positions a model's loss says nothing about the data
        raise UserError(
            f"--seq-length {cfg.seq_length} exceeds the model's maximum of {backend.max_length} "
            "positions"
        )
    prefix = prefix_token(backend, cfg.prefix)
    requests: list[ScoreRequest] = []
    docs = nbytes = 0
    for text in texts:
        tokens = backend.tokenizer.encode(text)
        if not tokens:
            continue
        docs += 1
        nbytes += len(text.encode("utf-8"))
        requests.extend(rolling_requests(tokens, prefix, cfg.seq_length, cfg.stride))
    scores = score_requests(backend, requests, cfg.batch_size, cfg.seq_length, desc=desc)
    ntokens = sum(s.ntokens for s in scores)
    nll = -math.fsum(s.logprob for s in scores)
    return docs, ntokens, nbytes, nll


def evaluate_set(
    backend: Backend, name: str, paths: Sequence[str], cfg: PerplexityConfig
) -> SetResult:
    cfg.validate()
    skipped: Counter = Counter()
    texts = []
    for _record, text in read_texts(
        list(paths), cfg.text_key, skip_bad_lines=cfg.skip_bad_lines, skipped=skipped
    ):
        if not text.strip():
            skipped["empty_document"] += 1
            continue
        texts.append(text)
        if cfg.max_docs is not None and len(texts) >= cfg.max_docs:
            break
    if not texts:
        raise UserError(f"--data {name}: no documents with a non-empty {cfg.text_key!r} field")
    docs, ntokens, nbytes, nll = score_texts(backend, texts, cfg, desc=f"ppl {name}")
    return SetResult(
        name=name,
        paths=[str(p) for p in paths],
        docs=docs,
        tokens=ntokens,
        bytes=nbytes,
        nll=nll,
        ppl=math.exp(nll / ntokens),
        bpb=nll / math.log(2) / nbytes,
        skipped=dict(skipped),
    )
