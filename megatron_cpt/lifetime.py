"""Child processes die with their parent, even when the parent is killed with SIGKILL.

A parent killed with ``kill -9`` runs no cleanup, so its children must notice on their own.
On Linux the kernel does it for us: ``prctl(PR_SET_PDEATHSIG, SIGKILL)`` in the child asks for
SIGKILL the moment the parent thread that forked it exits. Elsewhere (macOS) children fall back to
:func:`parent_alive` checks between tasks.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1


def _load_libc():
    # Loaded once, in the parent: a freshly forked child should not dlopen (or, as
    # ctypes.util.find_library does, run ldconfig in a subprocess).
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)  # the process's own namespace holds libc
        return libc if hasattr(libc, "prctl") else None
    except OSError:
        return None


_LIBC = _load_libc()


def die_with_parent(parent_pid: int) -> bool:
    """Call first thing in a forked child: SIGKILL it when ``parent_pid`` dies.

    Returns True when the kernel will do it (Linux). If the parent already died between the fork
    and this call, the child exits at once (the signal would never come).
    """
    armed = False
    if _LIBC is not None:
        armed = _LIBC.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
    if not parent_alive(parent_pid):
        os._exit(1)
    return armed


def parent_alive(parent_pid: int) -> bool:
    """False once ``parent_pid`` is gone (we were re-parented to init or a subreaper)."""
    return os.getppid() == parent_pid
