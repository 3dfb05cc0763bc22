"""Evaluation: perplexity/bits-per-byte, an lm-eval adapter, finance tasks, the CPT report.

Everything scores through :mod:`megatron_cpt.evaluation.backend` (logits for token ids), so HF
and Megatron checkpoints share one code path and can be compared number for number.
"""
