"""Hidden temporary output directories that name their owner, so a later run can clean up.

Converters and the merger build their output in ``.<out>.tmp-<host>-<pid>-...`` beside ``--out``
and rename it into place when complete. A run killed with SIGKILL cannot remove it (a 70B
conversion leaves ~140 GB). Because the name says which process on which host made it, a later
run to the same ``--out`` removes exactly those whose owner is gone, and nothing else: not other
names, not a live run's directory, not another host's (on a shared filesystem).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
from pathlib import Path

_HOST = re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"


def temp_prefix(target: Path) -> str:
    """The name prefix of this process's temporary directory for ``target``."""
    return f".{target.name}.tmp-{_HOST}-{os.getpid()}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temporaries(target: Path) -> list[Path]:
    """Remove ``target``'s temporary directories left by dead processes of this host."""
    target = Path(target)
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.tmp-{re.escape(_HOST)}-(\d+)-")
    removed = []
    try:
        entries = list(target.parent.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return removed
    for entry in entries:
        match = pattern.match(entry.name)
        if not match or entry.is_symlink() or not entry.is_dir():
            continue
        pid = int(match.group(1))
        if pid == os.getpid() or _alive(pid):
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    return removed
