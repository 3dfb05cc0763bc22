"""Sentence splitting for ``--split-sentences`` with NLTK punkt, fully offline.

Megatron-LM loads the pretrained ``punkt/english.pickle``; that data lives on NLTK's own server,
not on any package registry, so it cannot be fetched here. Punkt's untrained defaults know no
abbreviations ("Inc.", "Mr.", "U.S." all end sentences), which wrecks financial text. So the
splitter is trained *unsupervised on the input itself* (punkt was designed for exactly that),
from the first ``train_chars`` characters, and a short list of abbreviations common in filings is
added so that small samples still get them right. Training happens once in the main process and
the parameters are shipped to workers, so every worker splits identically.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

# Lower-case, without the final period, as punkt stores them.
COMMON_ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof inc corp co ltd llc l.l.c l.p n.a jr sr st u.s u.k e.g i.e vs approx "
    "dept govt no nos sec jan feb mar apr jun jul aug sep sept oct nov dec".split()
)


# Megatron-LM's ``--keep-newlines`` variant: trailing whitespace stays with its sentence.
_KEEP_NEWLINES_PERIOD_CONTEXT = r"""
        \S*                          # some word material
        %(SentEndChars)s             # a potential sentence ending
        \s*                          # keep the whitespace, newlines included
        (?=(?P<after_tok>
            %(NonWord)s              # either other punctuation
            |
            (?P<next_tok>\S+)        # or some other token
        ))"""


def _language_vars(keep_newlines: bool):
    # nltk is imported lazily: it costs seconds and only --split-sentences needs it.
    from nltk.tokenize.punkt import PunktLanguageVars

    if not keep_newlines:
        return PunktLanguageVars()

    class KeepNewlinesLanguageVars(PunktLanguageVars):
        _period_context_fmt = _KEEP_NEWLINES_PERIOD_CONTEXT

    return KeepNewlinesLanguageVars()


@dataclass(frozen=True)
class SentenceSplitterConfig:
    train_chars: int = 1_000_000  # input characters punkt learns from; 0 = defaults + list only
    keep_newlines: bool = False
    add_common_abbreviations: bool = True


class SentenceSplitter:
    """Picklable punkt splitter; build it with :meth:`train` from a sample of the corpus."""

    def __init__(self, params, keep_newlines: bool = False):
        from nltk.tokenize.punkt import PunktSentenceTokenizer

        self.params = params
        self.keep_newlines = keep_newlines
        self._punkt = PunktSentenceTokenizer(params, lang_vars=_language_vars(keep_newlines))

    @classmethod
    def train(cls, texts: Iterable[str], config: SentenceSplitterConfig) -> SentenceSplitter:
        from nltk.tokenize.punkt import PunktParameters, PunktTrainer

        sample: list[str] = []
        size = 0
        if config.train_chars > 0:
            for text in texts:
                sample.append(text)
                size += len(text)
                if size >= config.train_chars:
                    break
        if sample:
            trainer = PunktTrainer()
            trainer.train("\n\n".join(sample)[: config.train_chars], finalize=True)
            params = trainer.get_params()
        else:
            params = PunktParameters()
        if config.add_common_abbreviations:
            params.abbrev_types.update(COMMON_ABBREVIATIONS)
        return cls(params, config.keep_newlines)

    def split(self, text: str) -> list[str]:
        return self._punkt.tokenize(text)

    def __getstate__(self):
        return {"params": self.params, "keep_newlines": self.keep_newlines}

    def __setstate__(self, state):
        self.__init__(state["params"], state["keep_newlines"])
