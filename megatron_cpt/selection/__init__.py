"""Efficient domain-adaptive continual pre-training (DACP) data selection.

FinPythia (Xie et al. 2023) showed that training on a well-chosen 10% of a domain corpus beats
training on all of it. This package implements their selection recipe as streaming components:
near-duplicate removal (:mod:`.dedup`), per-document metrics (:mod:`.similarity`,
:mod:`.perplexity`, :mod:`.pos_entropy`), a resumable score cache (:mod:`.cache`), ranking and
hard/soft sampling under a budget (:mod:`.sampling`), and the pipeline that ties them together
(:mod:`.pipeline`).
"""
