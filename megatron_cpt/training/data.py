"""Training data: a weighted blend of token shards via megatron-core's dataset builders.

megatron-core's ``BlendedMegatronDatasetBuilder`` + ``GPTDataset`` already do what CPT needs:
exact per-dataset sample counts for the requested weights (the domain shards plus 1-5% replay),
deterministic shuffling from a seed, and cached indices. We add what a CPT user asks for on top:
Megatron-LM's ``--data-path`` parsing with clear errors, one validation set per name
(``--valid-data-path sec=/data/sec_valid wiki=/data/wiki_valid``) so that domain gain and
general-knowledge loss are visible separately, and a sampler that starts at
``consumed_samples`` so a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from megatron_cpt.errors import UserError


@dataclass
class DataSettings:
    data_path: list[str] = field(default_factory=list)  # [W1, P1, W2, P2, ...] or [P1, P2, ...]
    train_data_path: list[str] = field(default_factory=list)  # instead of data_path, no split
    split: str = "969,30,1"
    # name -> (prefixes, weights or None); see parse_validation_sets
    valid_sets: dict[str, tuple[list[str], list[float] | None]] = field(default_factory=dict)
    valid_replaces_split: bool = False  # Megatron-LM's --valid-data-path form
    test_data_path: list[str] = field(default_factory=list)
    mock: bool = False  # megatron-core's MockGPTDataset
    data_cache_path: str | None = None
    seq_length: int = 2048
    seed: int = 1234
    eod_mask_loss: bool = False
    reset_position_ids: bool = False
    reset_attention_mask: bool = False
    num_workers: int = 0
    mmap_bin_files: bool = True
    sft: bool = False  # SFT shard pairs (megatron_cpt.training.sft_data)


def parse_blend(data_path: list[str], flag: str = "--data-path") -> tuple[list[str], list[float]]:
    """Megatron-LM's ``--data-path`` grammar: ``W1 P1 W2 P2 ...``, or ``P1 P2 ...`` whose
    weights are left None so that megatron-core weighs each prefix by its size."""
    if not data_path:
        raise UserError(f"{flag}: give at least one shard prefix")
    items = [str(x) for x in data_path]

    def is_number(text: str) -> bool:
        try:
            float(text)
        except ValueError:
            return False
        return True

    if len(items) == 1 or not is_number(items[0]):
        numbers = [x for x in items if is_number(x)]
        if numbers:
            raise UserError(f"{flag}: mixes weights and prefixes ({numbers[0]!r}); use W1 P1 W2 P2")
        return items, None  # type: ignore[return-value]
    if len(items) % 2:
        raise UserError(f"{flag}: expected weight/prefix pairs, got {len(items)} items")
    weights, prefixes = [], []
    for i in range(0, len(items), 2):
        w, p = items[i], items[i + 1]
        if not is_number(w):
            raise UserError(f"{flag}: item {i + 1} should be a weight, got {w!r}")
        if is_number(p):
            raise UserError(f"{flag}: item {i + 2} should be a prefix, got {p!r}")
        weight = float(w)
        if not math.isfinite(weight) or weight < 0:
            raise UserError(f"{flag}: weight {w!r} for {p} must be a finite number >= 0")
        weights.append(weight)
        prefixes.append(p)
    if sum(weights) <= 0:
        raise UserError(f"{flag}: weights sum to 0")
    return prefixes, weights


def parse_named(valid_data_path: list[str]) -> dict[str, str]:
    named: dict[str, str] = {}
    for item in valid_data_path:
        name, sep, prefix = str(item).partition("=")
        if not sep or not name or not prefix:
            raise UserError(f"--valid-data-path: expected NAME=PREFIX, got {item!r}")
        if name in named:
            raise UserError(f"--valid-data-path: name {name!r} given twice")
        named[name] = prefix
    return named


def parse_validation_sets(
    items: list[str], multiple: bool = False
) -> dict[str, tuple[list[str], list[float] | None]]:
    """``--valid-data-path`` in either grammar. Ours, ``NAME=PREFIX ...``: one named set each
    (so domain gain and general-knowledge loss show separately). Megatron-LM's, ``[W1] P1 [W2
    P2 ...]``: one blended set named ``valid``, or with ``--multiple-validation-sets`` one set
    per prefix, named by the prefix's file name."""
    items = [str(x) for x in items or []]
    if not items:
        return {}
    if any("=" in x for x in items):
        return {name: ([prefix], None) for name, prefix in parse_named(items).items()}
    prefixes, weights = parse_blend(items, "--valid-data-path")
    if not multiple:
        return {"valid": (prefixes, weights)}
    sets: dict[str, tuple[list[str], list[float] | None]] = {}
    for prefix in prefixes:
        name = os.path.basename(prefix) or prefix
        if name in sets:
            raise UserError(f"--valid-data-path: two prefixes are named {name!r}")
        sets[name] = ([prefix], None)
    return sets


def check_prefix(prefix: str, flag: str) -> None:
    """Both files must exist before any compute starts (megatron-core would assert later)."""
    for ext in (".bin", ".idx"):
        if not os.path.isfile(prefix + ext):
            raise UserError(f"{flag}: {prefix}{ext} does not exist (shard prefix {prefix!r})")
    try:
        from megatron_cpt.data.indexed import validate_pair
    except ImportError:  # pragma: no cover - the preprocessing module ships with the package
        return
    validate_pair(prefix)


def parse_split(split: str) -> list[float]:
    try:
        parts = [float(x) for x in str(split).replace("/", ",").split(",")]
    except ValueError:
        raise UserError(f"--split: expected e.g. 969,30,1, got {split!r}") from None
    parts = (parts + [0.0, 0.0, 0.0])[:3]
    if any(p < 0 for p in parts) or sum(parts) <= 0 or parts[0] <= 0:
        raise UserError(f"--split {split!r}: the train part must be > 0 and none negative")
    return parts


def _gpt_config(settings: DataSettings, tokenizer, **kwargs):
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig

    return GPTDatasetConfig(
        random_seed=settings.seed,
        sequence_length=settings.seq_length,
        tokenizer=tokenizer,
        reset_position_ids=settings.reset_position_ids,
        reset_attention_mask=settings.reset_attention_mask,
        eod_mask_loss=settings.eod_mask_loss,
        create_attention_mask=settings.reset_attention_mask,  # causal mask is implicit otherwise
        path_to_cache=settings.data_cache_path,
        mmap_bin_files=settings.mmap_bin_files,
        **kwargs,
    )


@dataclass
class Datasets:
    train: object
    valid: dict[str, object]  # name -> dataset ("valid" is the --split part, if any)
    train_prefixes: list[str]
    test: dict[str, object] = field(default_factory=dict)  # "test": --test-data-path


def _always() -> bool:
    return True


def _eval_set(settings, tokenizer, flag, name, prefixes, weights, num_samples):
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset

    cfg = _gpt_config(settings, tokenizer, blend_per_split=[None, (prefixes, weights), None])
    _, ds, _ = BlendedMegatronDatasetBuilder(GPTDataset, [0, num_samples, 0], _always, cfg).build()
    if ds is None or len(ds) == 0:
        raise UserError(
            f"{flag} {name}={' '.join(prefixes)}: too few tokens for one sequence of "
            f"{settings.seq_length}"
        )
    return ds


def build_datasets(
    settings: DataSettings,
    tokenizer,
    train_samples: int,
    valid_samples: int,
    test_samples: int = 0,
) -> Datasets:
    """Train blend plus validation (and test) sets, each sized in samples of seq_length."""
    if settings.sft:
        from megatron_cpt.training.sft_data import build_sft_datasets

        return build_sft_datasets(settings, Datasets)
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, MockGPTDataset

    split = parse_split(settings.split)
    if settings.valid_sets and not settings.valid_replaces_split:
        if "valid" in settings.valid_sets and split[1] > 0:
            raise UserError(
                "--valid-data-path: the name 'valid' is taken by the --split valid part"
            )
    want_split_valid = split[1] > 0 and valid_samples > 0 and not settings.valid_replaces_split
    sizes = [train_samples, valid_samples if want_split_valid else 0, 0]
    if settings.mock:
        prefixes = ["mock"]
        config = _gpt_config(settings, tokenizer, split=",".join(str(x) for x in split))
        train, valid, _ = BlendedMegatronDatasetBuilder(
            MockGPTDataset, sizes, _always, config
        ).build()
    elif settings.train_data_path:
        prefixes, weights = parse_blend(settings.train_data_path, "--train-data-path")
        for p in prefixes:
            check_prefix(p, "--train-data-path")
        config = _gpt_config(settings, tokenizer, blend_per_split=[(prefixes, weights), None, None])
        train, _, _ = BlendedMegatronDatasetBuilder(
            GPTDataset, [train_samples, 0, 0], _always, config
        ).build()
        valid = None
    else:
        prefixes, weights = parse_blend(settings.data_path)
        for p in prefixes:
            check_prefix(p, "--data-path")
        config = _gpt_config(
            settings,
            tokenizer,
            blend=(prefixes, weights),
            split=",".join(str(x) for x in split),
        )
        train, valid, _ = BlendedMegatronDatasetBuilder(GPTDataset, sizes, _always, config).build()
    valid_sets: dict[str, object] = {}
    if want_split_valid and valid is not None:
        valid_sets["valid"] = valid
    for name, (pfx, w) in settings.valid_sets.items() if valid_samples > 0 else ():
        for p in pfx:
            check_prefix(p, "--valid-data-path")
        valid_sets[name] = _eval_set(
            settings, tokenizer, "--valid-data-path", name, pfx, w, valid_samples
        )
    test_sets: dict[str, object] = {}
    if settings.test_data_path and test_samples > 0:
        pfx, w = parse_blend(settings.test_data_path, "--test-data-path")
        test_sets["test"] = _eval_set(
            settings, tokenizer, "--test-data-path", "test", pfx, w, test_samples
        )
    return Datasets(train=train, valid=valid_sets, train_prefixes=prefixes, test=test_sets)


def realized_blend(train_dataset, num_samples: int, prefixes: list[str]) -> dict[str, float]:
    """Fraction of the first ``num_samples`` training samples drawn from each prefix."""
    index = getattr(train_dataset, "dataset_index", None)
    if index is None:  # a single dataset, no blend
        return {prefixes[0]: 1.0}
    counts = np.bincount(np.asarray(index[:num_samples]), minlength=len(prefixes))
    total = max(int(counts.sum()), 1)
    return {p: float(c) / total for p, c in zip(prefixes, counts)}


class MicroBatches:
    """Megatron-LM's pretraining sampler: global batch ``k`` is samples
    ``[consumed + k*gbs, consumed + (k+1)*gbs)``, split into micro-batches of ``mbs * dp``
    consecutive samples of which this DP rank takes its slice. Starting from
    ``consumed_samples`` makes a resumed run continue on exactly the next sample."""

    def __init__(
        self,
        dataset,
        consumed_samples: int,
        micro_batch_size: int,
        dp_rank: int,
        dp_size: int,
        wrap: bool = False,
    ):
        self.dataset = dataset
        self.next_sample = consumed_samples
        self.mbs = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.wrap = wrap

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        start = self.next_sample + self.dp_rank * self.mbs
        n = len(self.dataset)
        if not self.wrap and self.next_sample + self.mbs * self.dp_size > n:
            raise StopIteration
        samples = [self.dataset[(start + i) % n] for i in range(self.mbs)]
        self.next_sample += self.mbs * self.dp_size
        return collate(samples)


class _IndexBatches:
    """The sample indices ``MicroBatches`` would read, one micro-batch per item (a DataLoader
    batch sampler: workers then read and collate the samples ahead of the training step)."""

    def __init__(self, source: MicroBatches):
        self.s = source

    def __iter__(self):
        s = self.s
        n = len(s.dataset)
        while True:
            if not s.wrap and s.next_sample + s.mbs * s.dp_size > n:
                return
            start = s.next_sample + s.dp_rank * s.mbs
            yield [(start + i) % n for i in range(s.mbs)]
            s.next_sample += s.mbs * s.dp_size


def worker_batches(source: MicroBatches, num_workers: int):
    """``source``'s micro-batches, identical and in the same order, read by ``num_workers``
    DataLoader worker processes (``--num-workers``); ``num_workers=0`` returns ``source``."""
    if num_workers <= 0:
        return source
    loader = torch.utils.data.DataLoader(
        source.dataset,
        batch_sampler=_IndexBatches(source),
        num_workers=num_workers,
        collate_fn=collate,
        persistent_workers=True,
    )
    return iter(loader)


def collate(samples: list[dict]) -> dict:
    out = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        out[key] = None if values[0] is None else torch.stack([torch.as_tensor(v) for v in values])
    return out


def shard_tokens(prefix: str) -> int:
    """Total tokens in a shard (for messages and sanity checks)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    return int(IndexedDataset(prefix).sequence_lengths.sum())


def ensure_parent(path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
