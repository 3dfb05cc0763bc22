"""Each tokenizer type against its reference implementation on real and adversarial text."""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from megatron_cpt.errors import UserError
from megatron_cpt.tokenizers import (
    MAX_NO_WHITESPACES_CHARS,
    HuggingFaceTokenizer,
    Llama3Tokenizer,
    SentencePieceTokenizer,
    build_tokenizer,
)

EDGE_TEXTS = [
    "plain ascii text.",
    "émigré naïve café — “quotes” ‘single’ … ellipsis",
    "e\u0301 a\u0308 n\u0303 combining marks Z\u0351\u0352a\u0353l\u0354g\u0355o",
    "日本語のテキストと中文文本，还有한국어 텍스트。",
    "emoji 😀👩‍👩‍👧‍👦🇺🇸 and 1️⃣ keycaps",
    "tabs\tand\r\nCRLF\n\n\nnewlines   spaces",
    "<|end_of_text|> <|begin_of_text|> special-looking text stays text </s> <|im_end|>",
    " leading and trailing spaces ",
    "\u200b zero width \ufeff bom \u00a0 nbsp",
    "1234567890 $12.5 million 3.14159 -42%",
]


def real_texts(shared_data: Path, limit: int = 200) -> list[str]:
    out = []
    for name in (
        "domain/annual_reports.jsonl",
        "domain/sec_agreements.jsonl",
        "general/wikitext2.jsonl",
    ):
        with open(shared_data / name, encoding="utf-8") as fh:
            out += [json.loads(line)["text"] for _, line in zip(range(limit), fh)]
    return out


def train_sentencepiece(texts: list[str], target: Path, vocab_size: int = 2000) -> Path:
    """A small real SentencePiece BPE model (byte fallback, so any text is encodable)."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        num_threads=1,
        minloglevel=2,
    )
    target.write_bytes(model.getvalue())
    return target


@pytest.fixture(scope="module")
def llama3(llama3_tokenizer_model):
    return build_tokenizer("Llama3Tokenizer", llama3_tokenizer_model)


@pytest.fixture(scope="module")
def sp_model(shared_data, tmp_path_factory):
    return train_sentencepiece(real_texts(shared_data), tmp_path_factory.mktemp("sp") / "sp.model")


def test_llama3_matches_meta_reference(llama3, llama3_tokenizer_model, shared_data):
    from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer

    meta = MetaTokenizer(Path(llama3_tokenizer_model))
    assert llama3.vocab_size == meta.n_words == 128256
    assert (llama3.bos, llama3.eod, llama3.eot) == (128000, 128001, 128009)
    assert llama3.special_tokens == meta.special_tokens
    assert llama3.pad == meta.pad_id
    # Long runs exercise Meta's 25k-run and 400k-chunk splitting (token boundaries change there).
    long_runs = [
        "x" * (MAX_NO_WHITESPACES_CHARS + 7) + " " * (MAX_NO_WHITESPACES_CHARS * 2 + 3) + "tail",
        ("word " * 90_000) + "end",
    ]
    texts = real_texts(shared_data) + EDGE_TEXTS + long_runs + [""]
    expected = [meta.encode(t, bos=False, eos=False) for t in texts]
    assert llama3.encode_batch(texts) == expected
    assert [llama3.encode(t) for t in EDGE_TEXTS + long_runs] == expected[
        -len(long_runs) - 1 - len(EDGE_TEXTS) : -1
    ]
    for text, ids in zip(texts, expected):
        assert llama3.decode(ids) == meta.decode(ids) == text
    # the shard writer's path (one flat array), with and without long runs
    short = texts[: -len(long_runs) - 1]
    for batch, want in ((short, expected[: len(short)]), (texts, expected)):
        flat, lengths = llama3.encode_batch_flat(batch, np.int32)
        assert flat.dtype == np.int32 and lengths.tolist() == [len(x) for x in want]
        assert flat.tolist() == [i for x in want for i in x]


def test_llama3_threads_do_not_change_ids(llama3_tokenizer_model, shared_data):
    texts = real_texts(shared_data, 50)
    one = Llama3Tokenizer(llama3_tokenizer_model, num_threads=1).encode_batch(texts)
    assert Llama3Tokenizer(llama3_tokenizer_model, num_threads=2).encode_batch(texts) == one


def test_hf_directory_matches_transformers(tmp_path, shared_data, smollm2_gguf):
    """GGUF-embedded tokenizer, saved as an HF directory: our ids == transformers' own ids."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from_gguf = build_tokenizer("HuggingFaceTokenizer", smollm2_gguf)
    assert from_gguf.vocab_size == 49152
    hf = PreTrainedTokenizerFast(
        tokenizer_object=from_gguf.backend, eos_token="<|im_end|>", bos_token="<|im_start|>"
    )
    hf.save_pretrained(tmp_path / "hfdir")
    reference = AutoTokenizer.from_pretrained(tmp_path / "hfdir", local_files_only=True)
    for path in (tmp_path / "hfdir", tmp_path / "hfdir" / "tokenizer.json"):
        ours = build_tokenizer("HuggingFaceTokenizer", path)
        assert ours.eod == reference.eos_token_id == from_gguf.eod
        assert ours.vocab_size == len(reference)
        texts = real_texts(shared_data, 50) + EDGE_TEXTS
        expected = [reference.encode(t, add_special_tokens=False) for t in texts]
        assert ours.encode_batch(texts) == expected
        assert [ours.encode(t) for t in texts] == expected
        assert ours.decode(expected[0]) == reference.decode(expected[0])


@pytest.mark.slow
def test_gguf_tokenizer_matches_transformers_gguf_loader(smollm2_gguf, shared_data):
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    ours = build_tokenizer("HuggingFaceTokenizer", smollm2_gguf)
    assert ours.eod == reference.eos_token_id
    texts = real_texts(shared_data) + EDGE_TEXTS
    assert ours.encode_batch(texts) == [
        reference.encode(t, add_special_tokens=False) for t in texts
    ]


def test_sentencepiece_matches_library(sp_model, shared_data):
    import sentencepiece as spm

    reference = spm.SentencePieceProcessor(model_file=str(sp_model))
    ours = build_tokenizer("SentencePieceTokenizer", sp_model)
    assert (ours.vocab_size, ours.eod, ours.bos) == (2000, reference.eos_id(), reference.bos_id())
    texts = real_texts(shared_data, 50) + EDGE_TEXTS
    expected = [reference.encode(t) for t in texts]
    assert ours.encode_batch(texts) == expected
    assert [ours.encode(t) for t in texts] == expected
    assert ours.decode(expected[3]) == reference.decode(expected[3])


def test_pickle_roundtrip_and_identity(llama3, sp_model, smollm2_gguf):
    for tok in (
        llama3,
        build_tokenizer("SentencePieceTokenizer", sp_model),
        build_tokenizer("HuggingFaceTokenizer", smollm2_gguf),
    ):
        clone = pickle.loads(pickle.dumps(tok))
        assert clone.encode_batch(EDGE_TEXTS) == tok.encode_batch(EDGE_TEXTS)
        assert clone.unique_identifiers == tok.unique_identifiers
        assert json.dumps(tok.unique_identifiers)  # megatron-core hashes it as JSON
        assert (clone.vocab_size, clone.eod) == (tok.vocab_size, tok.eod)


def test_identity_depends_on_content(sp_model, tmp_path, shared_data):
    other = train_sentencepiece(
        real_texts(shared_data, 30), tmp_path / "other.model", vocab_size=1000
    )
    a = SentencePieceTokenizer(sp_model).unique_identifiers
    assert a != SentencePieceTokenizer(other).unique_identifiers
    copy = tmp_path / "copy.model"
    copy.write_bytes(Path(sp_model).read_bytes())
    assert SentencePieceTokenizer(copy).unique_identifiers == a


@pytest.mark.parametrize(
    "kind, model, message",
    [
        ("GPT2BPETokenizer", "x", "unknown"),
        ("Llama3Tokenizer", "/nonexistent/tokenizer.model", "no such file"),
        ("HuggingFaceTokenizer", "/nonexistent/tokenizer.json", "no such file"),
        ("SentencePieceTokenizer", "/nonexistent/sp.model", "no such file"),
    ],
)
def test_bad_type_or_file_is_one_line_user_error(kind, model, message):
    with pytest.raises(UserError, match=message) as info:
        build_tokenizer(kind, model)
    assert "\n" not in str(info.value)


def test_wrong_file_kind_is_user_error(sp_model, llama3_tokenizer_model, tmp_path):
    with pytest.raises(UserError, match="not a tiktoken ranks file"):
        Llama3Tokenizer(sp_model)
    with pytest.raises(UserError, match="not a SentencePiece model"):
        SentencePieceTokenizer(llama3_tokenizer_model)
    junk = tmp_path / "tokenizer.json"
    junk.write_text("{not json")
    with pytest.raises(UserError, match="not a tokenizer.json"):
        HuggingFaceTokenizer(junk)


def test_tiktoken_ranks_equal_tiktokens_own_loader_and_bad_lines_are_named(
    llama3_tokenizer_model, tmp_path
):
    """Our validating ranks loader (binascii, one read) gives tiktoken's own loader's dict on the
    real Llama-3 file, and names the line of a malformed entry."""
    from tiktoken.load import load_tiktoken_bpe

    from megatron_cpt.tokenizers import _load_tiktoken_ranks

    ranks = _load_tiktoken_ranks(Path(llama3_tokenizer_model))
    assert len(ranks) == 128000
    assert ranks == load_tiktoken_bpe(str(llama3_tokenizer_model))
    good = Path(llama3_tokenizer_model).read_text().splitlines()[:3]
    for bad in ("IQ== 3 extra", "!!!! 3", "IQ== three", "IQ="):
        path = tmp_path / "tokenizer.model"
        path.write_text("\n".join([*good, bad, *good]) + "\n")
        with pytest.raises(UserError, match=r"tokenizer.model:4: not a tiktoken ranks file"):
            _load_tiktoken_ranks(path)
