"""Output locations checked before the work starts, so a bad path costs seconds, not hours.

Every tool writes under a temporary name and renames when complete; that only helps if the
destination can be written at all. These checks run first, and name the flag and the reason
(a file where a directory is needed, a directory where a file is needed, no write permission).
"""

from __future__ import annotations

import os
from pathlib import Path

from megatron_cpt.errors import UserError


def _existing_ancestor(path: Path) -> Path:
    current = path
    while not current.exists() and not current.is_symlink():
        if current.parent == current:
            break
        current = current.parent
    return current


def _check_can_create_in(directory: Path, flag: str, shown: str | os.PathLike) -> None:
    """``directory`` (or its first existing ancestor) must be a writable directory."""
    anchor = _existing_ancestor(directory)
    if not anchor.is_dir():
        raise UserError(f"{flag} {shown}: {anchor} is a file, not a directory")
    if not os.access(anchor, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {shown}: {anchor} is not writable")


def check_output_file(path: str | os.PathLike, flag: str) -> Path:
    """A file we will (atomically) create or replace."""
    p = Path(path)
    if str(path) == "" or p.is_dir():
        raise UserError(f"{flag} {path}: is a directory, expected a file name")
    _check_can_create_in(p.parent if str(p.parent) else Path("."), flag, path)
    return p


def check_output_dir(path: str | os.PathLike, flag: str) -> Path:
    """A directory we will create (if needed) and write into."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UserError(f"{flag} {path}: is a file, expected a directory")
    _check_can_create_in(p, flag, path)
    return p


def check_output_prefix(prefix: str | os.PathLike, flag: str) -> Path:
    """A file-name prefix (``PREFIX.bin``, ``PREFIX_x.idx``, ...): its directory must be writable."""
    p = Path(prefix)
    if p.name == "" or p.is_dir():
        raise UserError(f"{flag} {prefix}: is a directory; give a directory and a name prefix")
    _check_can_create_in(p.parent if str(p.parent) else Path("."), flag, prefix)
    return p
