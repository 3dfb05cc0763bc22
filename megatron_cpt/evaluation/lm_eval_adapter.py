"""lm-evaluation-harness model ``megatron-cpt``: any lm-eval task over our logits backends.

lm-eval ships ``megatron_lm``, but it needs the full Megatron-LM training package, CUDA, and
cannot do pipeline parallelism; our checkpoints load through megatron-core alone (any TP/PP,
CPU or GPU). This adapter implements lm-eval's three request types on the shared scoring
kernel, mirroring ``HFLM``'s conventions (context/continuation split, left truncation, BOS
prefix for empty contexts, disjoint rolling windows) so the numbers are comparable with
``--model hf`` on the same weights.

Use from the lm-eval CLI (after ``import megatron_cpt.evaluation.lm_eval_adapter``, which
``tools/evaluate.py`` does) with ``--model megatron-cpt --model_args hf=DIR_OR_GGUF`` or
``--model_args megatron=CKPT_DIR,tokenizer=...``; from Python pass a built backend.
"""

from __future__ import annotations

from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (
    handle_stop_sequences,
    normalize_gen_kwargs,
    postprocess_generated_text,
)

from megatron_cpt.errors import UserError
from megatron_cpt.evaluation.backend import Backend, BackendSpec, load_backend
from megatron_cpt.evaluation.generation import GenRequest, greedy_generate
from megatron_cpt.evaluation.perplexity import rolling_requests
from megatron_cpt.evaluation.scoring import ScoreRequest, score_requests


def _as_int(value, name: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise UserError(f"--model_args {name}={value!r}: expected an integer") from None


@register_model("megatron-cpt", "megatron_cpt")
class MegatronCPTLM(TemplateLM):
    """Greedy, batched evaluation through a :class:`Backend` (generation KV-cached on HF)."""

    def __init__(
        self,
        backend: Backend | None = None,
        hf: str | None = None,
        megatron: str | None = None,
        tokenizer: str | None = None,
        tp: int = 1,
        pp: int = 1,
        dtype: str = "float32",
        batch_size: int | str | None = 8,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        add_bos_token: bool | None = None,
        **_ignored,  # lm-eval passes device/max_batch_size; placement is the backend's job
    ):
        super().__init__()
        if backend is None:
            backend = load_backend(
                BackendSpec(
                    hf=hf,
                    megatron=megatron,
                    tokenizer=tokenizer,
                    tp=_as_int(tp, "tp"),
                    pp=_as_int(pp, "pp"),
                    dtype=dtype,
                )
            )
        self.backend_impl = backend
        self._batch_size = 8 if batch_size in (None, "auto") else _as_int(batch_size, "batch_size")
        self._max_length = _as_int(max_length, "max_length") if max_length else backend.max_length
        self._max_gen_toks = _as_int(max_gen_toks, "max_gen_toks")
        if isinstance(add_bos_token, str):
            add_bos_token = add_bos_token.lower() in ("1", "true", "yes")
        self.add_bos_token = (
            bool(getattr(backend.tokenizer, "adds_bos", False))
            if add_bos_token is None
            else add_bos_token
        )

    # -- properties lm-eval reads ----------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        tok = self.backend_impl.tokenizer
        return tok.eos_id if tok.eos_id is not None else tok.bos_id

    @property
    def prefix_token_id(self) -> int:
        tok = self.backend_impl.tokenizer
        return tok.bos_id if tok.bos_id is not None else tok.eos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def tokenizer_name(self) -> str:
        return type(self.backend_impl.tokenizer).__name__

    # -- tokenization ------------------------------------------------------------------------
    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs):
        ids = self.backend_impl.tokenizer.encode(string)
        add = self.add_bos_token if add_special_tokens is None else add_special_tokens
        bos = self.backend_impl.tokenizer.bos_id
        if add and bos is not None and (not ids or ids[0] != bos):
            ids = [bos] + ids
        return ids

    def tok_decode(self, tokens: list[int]) -> str:
        return self.backend_impl.tokenizer.decode(list(tokens))

    # -- request types -----------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        scores = score_requests(
            self.backend_impl,
            [ScoreRequest(ctx, cont) for _, ctx, cont in requests],
            batch_size=self.batch_size,
            max_length=self.max_length,
            desc=None if disable_tqdm else "loglikelihood",
        )
        results = [(s.logprob, s.greedy) for s in scores]
        for (key, _, _), answer in zip(requests, results):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows: list[ScoreRequest] = []
        owners: list[int] = []
        for index, request in enumerate(requests):
            (string,) = request.args
            for window in rolling_requests(
                self.tok_encode(string), self.prefix_token_id, self.max_length
            ):
                windows.append(window)
                owners.append(index)
        scores = score_requests(
            self.backend_impl,
            windows,
            batch_size=self.batch_size,
            max_length=self.max_length,
            desc=None if disable_tqdm else "loglikelihood_rolling",
        )
        totals = [0.0] * len(requests)
        for owner, score in zip(owners, scores):
            totals[owner] += score.logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy, batched, with stop sequences; KV-cached on HF backends (see generation.py)."""
        eos_text = self.tok_decode([self.eot_token_id])
        gen: list[GenRequest] = []
        stops: list[list[str]] = []
        for request in requests:
            context, gen_kwargs = request.args
            kwargs = normalize_gen_kwargs(dict(gen_kwargs), self.max_gen_toks)
            if kwargs.get("do_sample"):
                raise UserError("megatron-cpt generates greedily only; set do_sample=false")
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
            max_new = int(kwargs["max_gen_toks"])
            budget = self.max_length - max_new
            if budget < 1:
                raise UserError(
                    f"max_gen_toks {max_new} leaves no room for context in {self.max_length}"
                )
            ids = self.tok_encode(context)[-budget:] or [self.prefix_token_id]
            gen.append(GenRequest(ids, max_new, tuple(until)))
            stops.append(until)
        tokens = greedy_generate(
            self.backend_impl,
            gen,
            eos_id=self.eot_token_id,
            batch_size=self.batch_size,
            desc=None if disable_tqdm else "generate_until",
        )
        out: list[str] = []
        for request, ids, until in zip(requests, tokens, stops):
            text = postprocess_generated_text(self.tok_decode(ids), until, None)
            out.append(text)
            self.cache_hook.add_partial("generate_until", request.args, text)
        return out
