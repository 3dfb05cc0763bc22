"""Near-duplicate removal with MinHash LSH before scoring.

Filings repeat boilerplate (risk factors, exhibit lists) across years and companies; scoring and
selecting them twice wastes the budget on the same text. We stream documents through a
datasketch ``MinHashLSH`` index and keep the *first* occurrence of every near-duplicate cluster,
so the result does not depend on anything but input order. LSH candidates are confirmed with the
MinHash Jaccard estimate, so a band collision between merely similar documents is not dropped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from datasketch import MinHash, MinHashLSH

_WORD = re.compile(r"\w+", re.UNICODE)


@dataclass(frozen=True)
class DedupConfig:
    enabled: bool = True
    shingle_size: int = 5  # word n-grams; 5 is the usual choice for web/filing dedup
    threshold: float = 0.8  # estimated Jaccard similarity at or above which a doc is a duplicate
    num_perm: int = 128
    seed: int = 1

    def __post_init__(self) -> None:
        from megatron_cpt.errors import UserError

        if self.shingle_size < 1:
            raise UserError(f"--dedup-shingle-size must be >= 1, got {self.shingle_size}")
        if not 0.0 < self.threshold <= 1.0:
            raise UserError(f"--dedup-threshold must be in (0, 1], got {self.threshold}")
        if self.num_perm < 2:
            raise UserError(f"--dedup-num-perm must be >= 2, got {self.num_perm}")


def shingles(text: str, size: int) -> set[bytes]:
    """Lower-cased word n-grams; texts shorter than ``size`` words become one shingle.

    Words (not characters) make the signature insensitive to whitespace and punctuation edits.
    """
    words = _WORD.findall(text.lower())
    if not words:
        return set()
    if len(words) <= size:
        return {" ".join(words).encode("utf-8")}
    return {" ".join(words[i : i + size]).encode("utf-8") for i in range(len(words) - size + 1)}


class NearDuplicateFilter:
    """Streaming first-occurrence filter: ``check(key, text)`` returns the key it duplicates."""

    def __init__(self, config: DedupConfig):
        self.config = config
        self._lsh = MinHashLSH(threshold=config.threshold, num_perm=config.num_perm)
        # Permutations are drawn once; building them per document dominates the cost otherwise.
        self._template = MinHash(num_perm=config.num_perm, seed=config.seed)
        self._signatures: dict[str, tuple[MinHash, int]] = {}  # key -> (MinHash, order)
        self.checked = 0
        self.duplicates = 0

    def signature(self, text: str) -> MinHash | None:
        grams = shingles(text, self.config.shingle_size)
        if not grams:
            return None
        # datasketch >= 2.0 wants the permutation scheme named; 1.x has no such argument.
        scheme = getattr(self._template, "scheme", None)
        mh = MinHash(
            num_perm=self.config.num_perm,
            seed=self.config.seed,
            permutations=self._template.permutations,
            **({"scheme": scheme} if scheme is not None else {}),
        )
        mh.update_batch(list(grams))
        return mh

    def check(self, key: str, text: str) -> str | None:
        """Index ``text`` under ``key`` unless it near-duplicates an earlier one (returned)."""
        self.checked += 1
        mh = self.signature(text)
        if (
            mh is None
        ):  # no words at all: nothing to compare, keep (empty docs are filtered earlier)
            return None
        best: tuple[float, int, str] | None = None
        for candidate in self._lsh.query(mh):
            stored, order = self._signatures[candidate]
            similarity = mh.jaccard(stored)
            # most similar first; on a tie the earliest (not the set's hash order), so the
            # staged dedup (staged_dedup.py) can make the same choice
            if similarity >= self.config.threshold and (
                best is None or (similarity, -order) > (best[0], -best[1])
            ):
                best = (similarity, order, candidate)
        if best is not None:
            self.duplicates += 1
            return best[2]
        self._lsh.insert(key, mh)
        self._signatures[key] = (mh, len(self._signatures))
        return None
