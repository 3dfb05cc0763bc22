"""SFT samples as the trainer's micro-batch dicts (tokens, labels, loss mask, positions, mask).

The shards come from :mod:`megatron_cpt.data.sft`; every sample is already exactly
``seq_length + 1`` tokens with its conversations as sequences, so no index building or
shuffling of megatron-core's ``GPTDataset`` is involved: sample ``i`` is document ``i``
(shuffle the JSONL if order matters). The attention mask is megatron-core's boolean
``[1, s, s]`` (True = masked out), causal and block-diagonal per conversation, so packed
conversations never attend to each other; it goes to the model as ``attention_mask`` through
the trainer's forward step unchanged.

Positions: megatron-core's GPTModel computes RoPE from the sequence length, not from
``position_ids`` (those feed only learned absolute embeddings). RoPE scores depend only on
the distance between query and key, and the block-diagonal mask keeps every pair inside one
conversation, so a packed conversation's logits equal those of the conversation alone
(tests/test_sft_training.py checks it in fp32); ``position_ids`` still restart per conversation
for models with absolute position embeddings.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from megatron_cpt.data.sft import SftSamples, packed_attention_mask


class SftDataset(torch.utils.data.Dataset):
    """Training samples of an SFT shard pair ``PREFIX_tokens`` / ``PREFIX_mask``."""

    def __init__(self, prefix: str | Path, seq_length: int | None = None):
        from megatron_cpt.errors import UserError

        self.samples = SftSamples(prefix)
        self.seq_length = self.samples.sample_tokens - 1
        if seq_length is not None and seq_length != self.seq_length:
            raise UserError(
                f"{prefix}: SFT samples hold sequences of {self.seq_length} tokens, the run "
                f"uses --seq-length {seq_length}; preprocess again with --seq-length {seq_length}"
            )

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = self.samples[int(index)]
        return {
            "tokens": torch.from_numpy(item["tokens"]),
            "labels": torch.from_numpy(item["labels"]),
            "loss_mask": torch.from_numpy(item["loss_mask"]),
            "position_ids": torch.from_numpy(item["position_ids"]),
            "attention_mask": torch.from_numpy(
                np.ascontiguousarray(packed_attention_mask(item["segment_ids"])[0])
            ),
        }


def sft_prefix(tokens_prefix: str, flag: str) -> str:
    """The pair prefix of ``PREFIX_tokens`` (what the data flags name, so that the existing
    shard checks see an ordinary megatron-core pair)."""
    from megatron_cpt.errors import UserError

    if not tokens_prefix.endswith("_tokens"):
        raise UserError(
            f"{flag} {tokens_prefix}: with --sft, name the PREFIX_tokens shard written by "
            "tools/preprocess_sft.py"
        )
    return tokens_prefix[: -len("_tokens")]


def check_sft_settings(settings) -> None:
    """--sft's data flags: one training pair (no blend, no mock, no split) and named or single
    validation pairs of held-out conversations; every pair's layout is checked now."""
    from megatron_cpt.errors import UserError
    from megatron_cpt.training.data import parse_blend

    if settings.mock:
        raise UserError("--sft: --mock-data has no loss masks; give --data-path PREFIX_tokens")
    flag = "--train-data-path" if settings.train_data_path else "--data-path"
    prefixes, _ = parse_blend(settings.train_data_path or settings.data_path, flag)
    if len(prefixes) != 1:
        raise UserError(f"{flag}: with --sft, give one PREFIX_tokens (blend SFT data upstream)")
    pairs = [(flag, prefixes[0])]
    for name, (valid, _) in settings.valid_sets.items():
        if len(valid) != 1:
            raise UserError(f"--valid-data-path {name}: with --sft, one PREFIX_tokens per set")
        pairs.append(("--valid-data-path", valid[0]))
    for flag, prefix in pairs:
        SftDataset(sft_prefix(prefix, flag), settings.seq_length)


def build_sft_datasets(settings, datasets_cls):
    """``Datasets`` of SFT samples: training from --data-path, validation from each
    --valid-data-path set (held-out conversations; --split does not apply)."""
    prefix = (settings.train_data_path or settings.data_path)[-1]
    flag = "--train-data-path" if settings.train_data_path else "--data-path"
    train = SftDataset(sft_prefix(prefix, flag), settings.seq_length)
    valid = {
        name: SftDataset(sft_prefix(p[0], "--valid-data-path"), settings.seq_length)
        for name, (p, _) in settings.valid_sets.items()
    }
    return datasets_cls(train=train, valid=valid, train_prefixes=[prefix])
