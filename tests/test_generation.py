"""KV-cached batched greedy generation equals uncached greedy generation, token for token."""

from __future__ import annotations

import pytest

from megatron_cpt.evaluation.backend import BackendSpec, load_backend
from megatron_cpt.evaluation.generation import (
    GenRequest,
    greedy_generate,
    greedy_uncached,
    supports_kv_cache,
)
from tests.test_eval_scoring import CORPUS, make_tiny_llama


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return load_backend(BackendSpec(hf=str(make_tiny_llama(tmp_path_factory.mktemp("gen")))))


def prompts(backend):
    tok = backend.tokenizer
    # different lengths, so the batch is left-padded by different amounts
    return [[tok.bos_id] + tok.encode(text[: 10 + 13 * i]) for i, text in enumerate(CORPUS)]


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_cached_equals_uncached_token_for_token(tiny, batch_size):
    assert supports_kv_cache(tiny)
    reqs = [GenRequest(p, max_new=24) for p in prompts(tiny)]
    got = greedy_generate(tiny, reqs, eos_id=None, batch_size=batch_size, desc=None)
    want = [greedy_uncached(tiny, r, eos_id=None) for r in reqs]
    assert got == want
    assert all(len(g) == 24 for g in got)
    assert len({tuple(g) for g in got}) > 1  # the prompts matter: not one degenerate sequence


def test_stop_strings_and_eos_cut_each_row_alone(tiny):
    base = [GenRequest(p, max_new=16) for p in prompts(tiny)]
    free = [greedy_uncached(tiny, r, eos_id=None) for r in base]
    decode = tiny.tokenizer.decode
    # stop on the text of each row's 3rd generated token: it must end at that token or earlier
    reqs = [GenRequest(r.prompt, 16, (decode(f[2:3]),)) for r, f in zip(base, free)]
    got = greedy_generate(tiny, reqs, eos_id=None, batch_size=4, desc=None)
    assert got == [greedy_uncached(tiny, r, eos_id=None) for r in reqs]
    assert all(1 <= len(g) <= 3 and g == f[: len(g)] for g, f in zip(got, free))
    # EOS = the 5th token of row 0: row 0 stops before it, the other rows run on
    eos = free[0][4]
    got = greedy_generate(tiny, base, eos_id=eos, batch_size=8, desc=None)
    assert got == [greedy_uncached(tiny, r, eos_id=eos) for r in base]
    assert got[0] == free[0][:4]


def test_megatron_style_backend_falls_back_to_uncached(tiny):
    class LogitsOnly:  # the logits seam alone, like MegatronBackend
        name, tokenizer, max_length = "x", tiny.tokenizer, tiny.max_length

        def logits(self, ids):
            return tiny.logits(ids)

    backend = LogitsOnly()
    assert not supports_kv_cache(backend)
    reqs = [GenRequest(p, max_new=8) for p in prompts(tiny)[:3]]
    assert greedy_generate(backend, reqs, None, desc=None) == greedy_generate(
        tiny, reqs, None, desc=None
    )
