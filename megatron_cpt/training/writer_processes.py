"""Checkpoint writer processes that are owned by the saver and never outlive it.

megatron-core's torch_dist writer (``FileSystemWriterAsync``) does two things behind our back:

- On the first save it starts a ``multiprocessing`` *spawn* ``Manager`` (a fresh interpreter that
  re-imports our ``__main__``, ~330 MB, plus a ``resource_tracker``) for its results queue, and
  keeps it in a module global for the life of the process. Nobody ever shuts it down, and when the
  saver is killed with SIGKILL the Manager and its tracker run forever.
- Each save forks writer processes; if the saver is SIGKILLed while they write, they can block on
  a results pipe nobody reads.

:func:`owned_writer_processes` wraps one save: it puts our own Manager in megatron-core's global
before the save (forked, so it starts in milliseconds and needs no tracker), shuts it down after,
and makes every process forked during the save die with its parent (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
from multiprocessing.managers import SyncManager

from megatron_cpt.lifetime import die_with_parent

_saver_pid: int | None = None  # set while a save is running in this process


def _after_fork_in_child() -> None:
    global _saver_pid
    if _saver_pid is not None:  # a writer (or the Manager): die with the saver
        parent, _saver_pid = _saver_pid, os.getpid()  # and its own children with it
        die_with_parent(parent)


os.register_at_fork(after_in_child=_after_fork_in_child)


def _results_module():
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    return filesystem_async


@contextlib.contextmanager
def owned_writer_processes():
    """Run one checkpoint save with writer processes that cannot outlive this process."""
    global _saver_pid
    fa = _results_module()
    manager = None
    previous = getattr(fa, "_results_queue", None)
    _saver_pid = os.getpid()
    if hasattr(fa, "_get_write_results_queue"):
        # Always ours, even if someone else's (possibly dead) queue is in place; theirs is put
        # back afterwards.
        manager = SyncManager(ctx=mp.get_context("fork"))
        manager.start()
        fa._results_queue = manager.Queue()
    try:
        yield
    finally:
        _saver_pid = None
        if manager is not None:
            fa._results_queue = previous
            manager.shutdown()
