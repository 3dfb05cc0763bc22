"""Refuse a torch_dist checkpoint whose pickles could run code, before anything unpickles them.

A megatron-core checkpoint is not only tensors. torch.distributed.checkpoint reads ``.metadata``
with a plain ``pickle.load``, and loads every non-tensor item (megatron-core ``ShardedObject``s:
RNG state, ``_extra_state``) with ``torch.load(..., weights_only=False)``; megatron-core reads
``common.pt`` with ``torch.load`` and torch's default. Any of them can execute code when the
checkpoint comes from someone else. Neither library offers a safe mode for these reads, so this
module checks each pickle first, with the strictest reader that accepts a legitimate checkpoint:

- ``.metadata``: Python's documented "restricting globals" unpickler, allowing only the classes
  torch.distributed.checkpoint's metadata is made of (and torch sizes, dtypes, layouts, paths);
- each non-tensor item and ``common.pt``: ``torch.load(weights_only=True)``, torch's own safe
  unpickler (tensors, containers, primitive types).

Everything this project writes passes (tests check trainer, converter and merge outputs). A
checkpoint that fails is refused with one line naming the file and the offending global.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import torch

from megatron_cpt.errors import UserError

_METADATA_MODULES = (
    "torch.distributed.checkpoint.metadata",
    "torch.distributed.checkpoint.filesystem",
    "torch.distributed.checkpoint.planner",
)
_ALLOWED_GLOBALS = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # maps "torch.strided" to the layout object
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "object"),
    ("copyreg", "_reconstructor"),
    # placeholders megatron-core defines to read older checkpoints' metadata
    ("megatron.core.dist_checkpointing.strategies.torch", "MCoreMetadata"),
    ("megatron.core.dist_checkpointing.strategies.torch", "MCoreSavePlan"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file, path: Path):
        super().__init__(file)
        self._path = path

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED_GLOBALS or (
            module in _METADATA_MODULES and isinstance(_lookup(module, name), type)
        ):
            return super().find_class(module, name)
        if module == "torch" and isinstance(
            _lookup(module, name), (torch.dtype, torch.layout, torch.memory_format)
        ):
            return super().find_class(module, name)
        raise UserError(
            f"{self._path}: refusing to unpickle {module}.{name} (not part of a "
            "torch.distributed.checkpoint metadata file; the checkpoint may run code when loaded)"
        )


def _lookup(module: str, name: str):
    import importlib

    try:
        return getattr(importlib.import_module(module), name, None)
    except ImportError:
        return None


def read_safe_metadata(iter_dir: Path):
    """torch.distributed.checkpoint ``Metadata`` of ``iter_dir``, unpickled with the allowlist."""
    path = Path(iter_dir) / ".metadata"
    if not path.is_file():
        raise UserError(f"{iter_dir}: no .metadata (not a torch_dist checkpoint directory)")
    try:
        with path.open("rb") as f:
            return _MetadataUnpickler(f, path).load()
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"{path}: unreadable torch_dist metadata ({exc})") from None


def check_checkpoint_pickles(iter_dir: str | Path):
    """Raise :class:`UserError` unless every pickle a load of ``iter_dir`` would read is safe;
    returns the checkpoint's torch.distributed.checkpoint ``Metadata``."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    iter_dir = Path(iter_dir)
    metadata = read_safe_metadata(iter_dir)
    for index, info in (metadata.storage_data or {}).items():
        if not isinstance(metadata.state_dict_metadata.get(index.fqn), BytesStorageMetadata):
            continue
        where = f"{iter_dir / info.relative_path}: item {index.fqn}"
        if getattr(info, "transform_descriptors", None):
            raise UserError(f"{where}: transformed (e.g. compressed) objects are not supported")
        with open(iter_dir / info.relative_path, "rb") as f:
            f.seek(info.offset)
            blob = f.read(info.length)
        _weights_only_load(io.BytesIO(blob), where)
    common = iter_dir / "common.pt"
    if common.exists():
        _weights_only_load(common, str(common))
    return metadata


def _weights_only_load(source, where: str) -> None:
    try:
        torch.load(source, map_location="cpu", weights_only=True)
    except Exception as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        # torch's message opens with advice; the line naming the refused global is the useful one
        named = [line for line in lines if "Unsupported global" in line or "Unpickler" in line]
        first = (named or lines or [type(exc).__name__])[0]
        raise UserError(
            f"{where}: not loadable with torch.load(weights_only=True) ({first[:200]}); "
            "refusing a pickle that may run code"
        ) from None
