"""Tokenizers behind one small interface shared by preprocessing, training, selection and eval.

Why a wrapper at all: megatron-core's dataset builders only need ``vocab_size``, ``eod``,
``pad`` and ``unique_identifiers``, while preprocessing needs fast *batch* encoding without
BOS/EOS. Each backend does that differently (tiktoken, HF ``tokenizers``, SentencePiece), so the
differences live here and nowhere else.

- ``Llama3Tokenizer`` reproduces Meta's ``llama_models.llama3.tokenizer.Tokenizer`` exactly
  (ranks, pre-tokenizer regex, 256 special tokens, and its 400k-char / 25k-run splitting, which
  changes token boundaries on pathological inputs), but encodes through tiktoken's batch API.
- ``HuggingFaceTokenizer`` uses the Rust ``tokenizers`` backend of any HF tokenizer
  (``tokenizer.json``, an HF directory, or the tokenizer embedded in a GGUF file). Converting a
  GGUF vocabulary takes transformers ~10 s, so the converted ``tokenizer.json`` is cached.
- ``SentencePieceTokenizer`` wraps a ``.model`` file.

All tokenizers pickle cheaply (they rebuild from their file or serialized state), so
multiprocessing workers can receive them under any start method.
"""

from __future__ import annotations

import binascii
import hashlib
import json
import os
import re
from collections.abc import Sequence
from functools import cached_property
from itertools import chain
from pathlib import Path

import numpy as np

from megatron_cpt.errors import UserError

TOKENIZER_TYPES = ("Llama3Tokenizer", "HuggingFaceTokenizer", "SentencePieceTokenizer")


class Tokenizer:
    """The interface every tokenizer type implements (also what megatron-core datasets need)."""

    name: str
    vocab_size: int
    eod: int
    bos: int | None = None
    pad: int | None = None

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def encode_batch_flat(self, texts: list[str], dtype) -> tuple[np.ndarray, np.ndarray]:
        """Every text's ids end to end in ``dtype``, and each text's id count (int64): what a
        shard writer wants. (tiktoken's ``encode_to_numpy`` was measured here and was not
        faster: bench/tokenizer_paths.py.)"""
        ids = self.encode_batch(texts)
        lengths = np.fromiter(map(len, ids), np.int64, count=len(ids))
        flat = np.fromiter(chain.from_iterable(ids), dtype, count=int(lengths.sum()))
        return flat, lengths

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def _fingerprint(self) -> str:
        raise NotImplementedError

    @cached_property
    def _identity(self) -> dict:
        return {
            "class": self.name,
            "fingerprint": self._fingerprint(),
            "vocab_size": self.vocab_size,
            "eod": self.eod,
        }

    @property
    def unique_identifiers(self) -> dict:
        """Content-based identity (not the path), so dataset caches survive moving files."""
        return dict(self._identity)

    # Megatron-LM spellings, so code written against its tokenizers also works here.
    def tokenize(self, text: str) -> list[int]:
        return self.encode(text)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.decode(ids)

    def __repr__(self) -> str:
        return f"{self.name}(vocab_size={self.vocab_size}, eod={self.eod})"


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _require_file(path: Path, what: str) -> Path:
    if not path.exists():
        raise UserError(f"--tokenizer-model {path}: no such file ({what})")
    return path


# ---------------------------------------------------------------------------------------------
# Llama-3 (tiktoken)

# Meta's constants (llama_models/llama3/tokenizer.py); kept verbatim so encodings match bit for bit.
LLAMA3_PAT_STR = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_NUM_RESERVED_SPECIAL_TOKENS = 256
TIKTOKEN_MAX_ENCODE_CHARS = 400_000
MAX_NO_WHITESPACES_CHARS = 25_000
# Runs of whitespace / non-whitespace; ``re``'s ``\s`` is exactly ``str.isspace`` for str patterns.
_SPACE_RUN = re.compile(r"\s*")
_WORD_RUN = re.compile(r"\S*")


def _has_long_run(s: str, limit: int) -> bool:
    """Whether ``s`` has a run longer than ``limit`` of whitespace or of non-whitespace.

    Only documents with such a run need Meta's slow per-character splitter. Any run of ``limit``
    or more characters covers a multiple of ``limit``, so probing the run around each multiple
    is exact and costs a string reversal instead of a regex scan over every character.
    """
    n = len(s)
    if n <= limit:
        return False
    reverse = s[::-1]
    for p in range(0, n, limit):
        run = _SPACE_RUN if s[p].isspace() else _WORD_RUN
        right = run.match(s, p).end()
        left = n - run.match(reverse, n - 1 - p).end()
        if right - left > limit:
            return True
    return False


def llama3_special_tokens() -> list[str]:
    named = [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|reserved_special_token_0|>",
        "<|reserved_special_token_1|>",
        "<|finetune_right_pad_id|>",
        "<|step_id|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eom_id|>",
        "<|eot_id|>",
        "<|python_tag|>",
        "<|image|>",
    ]
    reserved = [
        f"<|reserved_special_token_{2 + i}|>"
        for i in range(LLAMA3_NUM_RESERVED_SPECIAL_TOKENS - len(named))
    ]
    return named + reserved


def _split_long_runs(s: str, max_len: int) -> list[str]:
    """Meta's ``_split_whitespaces_or_nonwhitespaces``, same cut points (tiktoken issue 195)."""
    if not _has_long_run(s, max_len):
        return [s]
    out = []
    current_len = 0
    current_is_space = s[0].isspace()
    start = 0
    for i, ch in enumerate(s):
        is_space = ch.isspace()
        if current_is_space ^ is_space:
            current_len = 1
            current_is_space = is_space
        else:
            current_len += 1
            if current_len > max_len:
                out.append(s[start:i])
                start = i
                current_len = 1
    out.append(s[start:])
    return out


def _llama3_pieces(text: str) -> list[str]:
    if len(text) <= MAX_NO_WHITESPACES_CHARS:
        return [text]
    return [
        piece
        for i in range(0, len(text), TIKTOKEN_MAX_ENCODE_CHARS)
        for piece in _split_long_runs(
            text[i : i + TIKTOKEN_MAX_ENCODE_CHARS], MAX_NO_WHITESPACES_CHARS
        )
    ]


def _load_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    """``<base64 token> <rank>`` per line, validated (tiktoken's own loader trusts the file).

    One read and ``binascii`` directly: this runs at every start of a preprocessing or training
    job, and ``base64.b64decode(validate=True)`` (a regex per line) took ~0.2 s of a ~1 s
    preprocessing run on 128k ranks.
    """
    text = path.read_text(encoding="utf-8")  # a binary file raises UnicodeDecodeError
    ranks: dict[bytes, int] = {}
    decode = binascii.a2b_base64
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        try:
            token, rank = fields
            ranks[decode(token, strict_mode=True)] = int(rank)
        except ValueError:  # binascii.Error is a ValueError
            raise UserError(
                f"{path}:{number}: not a tiktoken ranks file (expected '<base64> <rank>')"
            ) from None
    if not ranks:
        raise UserError(f"{path}: empty tiktoken ranks file")
    return ranks


class Llama3Tokenizer(Tokenizer):
    """Meta's Llama-3 tokenizer (tiktoken BPE, 128k ranks + 256 special tokens)."""

    name = "Llama3Tokenizer"

    def __init__(self, model_path: str | Path, num_threads: int = 1):
        import tiktoken

        self.model_path = _require_file(Path(model_path), "a Llama-3 tiktoken tokenizer.model")
        try:
            ranks = _load_tiktoken_ranks(self.model_path)
        except UnicodeDecodeError:
            raise UserError(
                f"--tokenizer-model {self.model_path}: not a tiktoken ranks file (binary; "
                "a SentencePiece .model needs --tokenizer-type SentencePieceTokenizer)"
            ) from None
        base = len(ranks)
        self.special_tokens = {tok: base + i for i, tok in enumerate(llama3_special_tokens())}
        self.model = tiktoken.Encoding(
            name=self.model_path.name,
            pat_str=LLAMA3_PAT_STR,
            mergeable_ranks=ranks,
            special_tokens=self.special_tokens,
        )
        self.num_threads = num_threads
        self.vocab_size = base + len(self.special_tokens)
        self.bos = self.special_tokens["<|begin_of_text|>"]
        self.eod = self.special_tokens["<|end_of_text|>"]
        self.eot = self.special_tokens["<|eot_id|>"]
        self.pad = self.special_tokens["<|finetune_right_pad_id|>"]

    def __getstate__(self):
        return {"model_path": self.model_path, "num_threads": self.num_threads}

    def __setstate__(self, state):
        self.__init__(state["model_path"], state["num_threads"])

    def encode(self, text: str) -> list[int]:
        pieces = _llama3_pieces(text)
        if len(pieces) == 1:
            return self.model.encode_ordinary(text)
        return [tok for piece in pieces for tok in self.model.encode_ordinary(piece)]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if all(len(t) <= MAX_NO_WHITESPACES_CHARS for t in texts):
            return self._encode_pieces(texts)
        pieces: list[str] = []
        owners: list[int] = []
        for i, text in enumerate(texts):
            split = _llama3_pieces(text)
            pieces.extend(split)
            owners.extend([i] * len(split))
        out: list[list[int]] = [[] for _ in texts]
        for owner, ids in zip(owners, self._encode_pieces(pieces)):
            out[owner].extend(ids)
        return out

    def _encode_pieces(self, pieces: list[str]) -> list[list[int]]:
        if self.num_threads > 1:
            return self.model.encode_ordinary_batch(pieces, num_threads=self.num_threads)
        encode = self.model.encode_ordinary
        return [encode(p) for p in pieces]

    def decode(self, ids: Sequence[int]) -> str:
        return self.model.decode(list(ids))

    def _fingerprint(self) -> str:
        return _sha256_file(self.model_path)


# ---------------------------------------------------------------------------------------------
# Hugging Face (tokenizers backend)

_EOS_CANDIDATES = ("<|end_of_text|>", "<|endoftext|>", "</s>", "<eos>", "<|eot_id|>", "<|im_end|>")


def _token_content(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _gguf_cache_dir(path: Path) -> Path:
    from megatron_cpt.assets import cache_dir

    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()
    return cache_dir() / "gguf_tokenizers" / key[:24]


def _load_hf_directory(path: Path, gguf_file: str | None = None):
    """(backend tokenizer, special-token dict) from an HF directory or a GGUF file."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    kwargs = {"local_files_only": True}
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    try:
        hf = AutoTokenizer.from_pretrained(str(path), **kwargs)
    except Exception as exc:  # transformers raises many types; the user needs one line
        where = path / gguf_file if gguf_file else path
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"--tokenizer-model {where}: cannot load an HF tokenizer ({first})"
        ) from None
    backend = getattr(hf, "backend_tokenizer", None)
    if backend is None:
        raise UserError(
            f"--tokenizer-model {path}: only fast (Rust) HF tokenizers are supported; "
            "this one has no tokenizer.json"
        )
    specials = {
        "eos": hf.eos_token,
        "bos": hf.bos_token,
        "pad": hf.pad_token,
    }
    return backend, specials


def _load_gguf(path: Path):
    cache = _gguf_cache_dir(path)
    if (cache / "tokenizer.json").exists() and (cache / "specials.json").exists():
        from tokenizers import Tokenizer as RustTokenizer

        return (
            RustTokenizer.from_file(str(cache / "tokenizer.json")),
            json.loads((cache / "specials.json").read_text()),
        )
    backend, specials = _load_hf_directory(path.parent, gguf_file=path.name)
    cache.mkdir(parents=True, exist_ok=True)
    for name, text in (
        ("tokenizer.json", backend.to_str()),
        ("specials.json", json.dumps(specials)),
    ):
        tmp = cache / f"{name}.{os.getpid()}.tmp"
        tmp.write_text(text)
        os.replace(tmp, cache / name)
    return backend, specials


def _load_tokenizer_json(path: Path):
    from tokenizers import Tokenizer as RustTokenizer

    try:
        backend = RustTokenizer.from_file(str(path))
    except Exception as exc:
        raise UserError(f"--tokenizer-model {path}: not a tokenizer.json ({exc})") from None
    specials: dict = {}
    config = path.parent / "tokenizer_config.json"
    if config.exists():
        try:
            cfg = json.loads(config.read_text())
            specials = {k: _token_content(cfg.get(f"{k}_token")) for k in ("eos", "bos", "pad")}
        except json.JSONDecodeError as exc:
            raise UserError(f"{config}: invalid JSON ({exc.msg})") from None
    return backend, specials


class HuggingFaceTokenizer(Tokenizer):
    """Any fast HF tokenizer: ``tokenizer.json``, an HF directory, or a ``.gguf`` file."""

    name = "HuggingFaceTokenizer"

    def __init__(self, model_path: str | Path, *, _state: dict | None = None):
        self.model_path = Path(model_path)
        if _state is not None:
            from tokenizers import Tokenizer as RustTokenizer

            backend = RustTokenizer.from_str(_state["backend"])
            specials = _state["specials"]
        else:
            path = _require_file(self.model_path, "tokenizer.json, an HF directory or a .gguf")
            if path.is_dir():
                backend, specials = _load_hf_directory(path)
            elif path.suffix == ".gguf":
                backend, specials = _load_gguf(path)
            else:
                backend, specials = _load_tokenizer_json(path)
        self.backend = backend
        self.specials = specials
        vocab = backend.get_vocab(with_added_tokens=True)
        self.vocab_size = max(
            backend.get_vocab_size(with_added_tokens=True), max(vocab.values()) + 1
        )
        eos = specials.get("eos") or next((t for t in _EOS_CANDIDATES if t in vocab), None)
        if eos is None or eos not in vocab:
            raise UserError(
                f"--tokenizer-model {self.model_path}: no end-of-document token found "
                f"(no eos_token in tokenizer_config.json and none of {', '.join(_EOS_CANDIDATES)})"
            )
        self.eod = vocab[eos]
        self.bos = vocab.get(specials.get("bos")) if specials.get("bos") else None
        self.pad = vocab.get(specials.get("pad")) if specials.get("pad") else None

    def __getstate__(self):
        return {
            "model_path": self.model_path,
            "backend": self.backend.to_str(),
            "specials": self.specials,
        }

    def __setstate__(self, state):
        self.__init__(state["model_path"], _state=state)

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # encode_batch_fast (tokenizers >= 0.21) skips character offsets, which we never use.
        encode = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)
        return [e.ids for e in encode(texts, add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=False)

    def _fingerprint(self) -> str:
        return hashlib.sha256(self.backend.to_str().encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# SentencePiece


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece ``.model`` (Llama-2 style); EOD is the model's EOS piece."""

    name = "SentencePieceTokenizer"

    def __init__(self, model_path: str | Path):
        import sentencepiece as spm

        self.model_path = _require_file(Path(model_path), "a SentencePiece .model")
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(str(self.model_path))
        except (OSError, RuntimeError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(
                f"--tokenizer-model {self.model_path}: not a SentencePiece model ({first})"
            ) from None
        self.vocab_size = self.sp.GetPieceSize()
        if self.sp.eos_id() < 0:
            raise UserError(f"--tokenizer-model {self.model_path}: the model has no EOS piece")
        self.eod = self.sp.eos_id()
        self.bos = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        self.pad = self.sp.pad_id() if self.sp.pad_id() >= 0 else None

    def __getstate__(self):
        return {"model_path": self.model_path}

    def __setstate__(self, state):
        self.__init__(state["model_path"])

    def encode(self, text: str) -> list[int]:
        return self.sp.EncodeAsIds(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.sp.Encode(texts, out_type=int, num_threads=1)

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.DecodeIds(list(ids))

    def _fingerprint(self) -> str:
        return _sha256_file(self.model_path)


class NullTokenizer(Tokenizer):
    """Megatron-LM's ``NullTokenizer``: no vocabulary file, token ids are the text's integers;
    ``--vocab-size V`` ids plus one EOD id ``V``. For ``--mock-data`` runs and pre-tokenized
    shards whose vocabulary is only a size."""

    name = "NullTokenizer"

    def __init__(self, vocab_size: int):
        if vocab_size is None or int(vocab_size) < 1:
            raise UserError("--tokenizer-type NullTokenizer needs --vocab-size >= 1")
        self.eod = int(vocab_size)
        self.vocab_size = int(vocab_size) + 1

    def encode(self, text: str) -> list[int]:
        return [int(x) for x in text.split()]

    def decode(self, ids: Sequence[int]) -> str:
        return " ".join(str(int(i)) for i in ids)

    def _fingerprint(self) -> str:
        return f"null-{self.eod}"


_BUILDERS = {
    "Llama3Tokenizer": Llama3Tokenizer,
    "HuggingFaceTokenizer": HuggingFaceTokenizer,
    "SentencePieceTokenizer": SentencePieceTokenizer,
}


def build_tokenizer(tokenizer_type: str, tokenizer_model: str | Path) -> Tokenizer:
    """Build a tokenizer by its Megatron-style type name; a bad type or file is a UserError."""
    if tokenizer_type not in _BUILDERS:
        raise UserError(
            f"--tokenizer-type {tokenizer_type!r}: unknown; choose one of {', '.join(TOKENIZER_TYPES)}"
        )
    if tokenizer_model is None or str(tokenizer_model) == "":
        raise UserError(f"--tokenizer-type {tokenizer_type} needs --tokenizer-model")
    return _BUILDERS[tokenizer_type](tokenizer_model)
