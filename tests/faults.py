"""Helpers for fault-injection tests: run a CLI, classify how it ended, find its processes.

Every bad input must end as exactly one of the README's promises, and these helpers tell apart
the three ways it can go wrong instead: a traceback, more than one line, or exit 0.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
TOOLS = REPO / "tools"


def tool_env(**extra: str) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(REPO))
    env.update(extra)
    return env


def run_tool(tool: str, args: list[str], timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(TOOLS / tool), *map(str, args)],
        capture_output=True,
        text=True,
        env=kw.pop("env", tool_env()),
        timeout=timeout,
        **kw,
    )


def outcome(result: subprocess.CompletedProcess) -> str:
    """``"ok"``, ``"one-line"`` (exit 2, one ``error:`` line), ``"traceback"`` or ``"other"``."""
    err = result.stderr
    if "Traceback (most recent call last)" in err:
        return "traceback"
    if result.returncode == 0:
        return "ok"
    lines = [line for line in err.strip().splitlines() if line.strip()]
    if result.returncode == 2 and lines and lines[-1].startswith("error: "):
        return "one-line"
    return "other"


def assert_one_line(result: subprocess.CompletedProcess, *words: str) -> str:
    """Exit 2 with an ``error:`` line naming ``words``; returns that line."""
    kind = outcome(result)
    assert kind == "one-line", f"expected a one-line error, got {kind}:\n{result.stderr[-3000:]}"
    line = result.stderr.strip().splitlines()[-1]
    for word in words:
        assert word in line, f"{word!r} not in {line!r}"
    return line


def files_under(directory: Path) -> list[str]:
    if not directory.exists():
        return []
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())


def descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    out = []
    for proc in procs:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                out.append(proc)
        except psutil.NoSuchProcess:
            pass
    return out


def wait_gone(procs: list[psutil.Process], timeout: float = 30.0) -> list[psutil.Process]:
    """The processes still alive after ``timeout`` seconds (killed then, so none leak)."""
    deadline = time.monotonic() + timeout
    while alive(procs) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = alive(procs)
    for proc in left:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    return left


def wait_for(predicate, timeout: float = 120.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False
