"""Is a checkpoint directory complete and safe to read? Checked before anything reads it.

A ``.distcp`` file cut short (a full disk, a copy interrupted, a node lost while syncing to
object storage) otherwise surfaces as ``EOFError`` deep inside torch's unpickler, wrapped in
``CheckpointException`` (a ``BaseException``), after the model is built. The ``.metadata`` file
records the offset and length of every item, so completeness is a cheap ``stat`` per file.
"""

from __future__ import annotations

from pathlib import Path

from megatron_cpt.errors import UserError
from megatron_cpt.training.pickle_safety import check_checkpoint_pickles, read_safe_metadata


def check_files_complete(iter_dir: str | Path) -> None:
    """Every item the ``.metadata`` lists must lie inside an existing file."""
    iter_dir = Path(iter_dir)
    metadata = read_safe_metadata(iter_dir)
    need: dict[str, tuple[int, str]] = {}  # file -> (bytes needed, the item that needs them)
    for index, info in (metadata.storage_data or {}).items():
        end = int(info.offset) + int(info.length)
        if end > need.get(info.relative_path, (-1, ""))[0]:
            need[info.relative_path] = (end, index.fqn)
    for name, (end, item) in sorted(need.items()):
        path = iter_dir / name
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise UserError(f"{path}: missing (item {item} is stored there)") from None
        if size < end:
            raise UserError(
                f"{path}: truncated ({size} bytes, item {item} ends at byte {end}); "
                "the checkpoint is incomplete"
            )


def verify_checkpoint(iter_dir: str | Path):
    """Complete, and every pickle safe (see ``pickle_safety``); returns the DCP ``Metadata``."""
    check_files_complete(iter_dir)
    return check_checkpoint_pickles(iter_dir)
