"""The demo's concurrent stages keep the sequential stages' bookkeeping: a stage that finished
is recorded even when a sibling failed, a re-run redoes only what did not finish, and each
stage is given an equal share of the cores."""

from __future__ import annotations

import os
import threading

import pytest

from megatron_cpt.errors import UserError
from megatron_cpt.pipeline.quickstart import Pipeline, QuickstartConfig


def test_concurrent_stages_record_what_finished_and_rerun_only_the_rest(tmp_path):
    pipe = Pipeline(QuickstartConfig(work_dir=str(tmp_path)))
    calls: list[tuple[str, int]] = []
    lock = threading.Lock()
    started = threading.Barrier(3, timeout=30)  # proves the three run at the same time

    def spec(name: str, fail: bool):
        out = tmp_path / f"{name}.out"

        def run(threads):
            with lock:
                calls.append((name, threads))
            started.wait()
            if fail:
                raise UserError(f"stage {name} failed")
            out.write_text("ok")

        return name, {"p": 1}, lambda: out.read_text(), run

    specs = [spec("a", False), spec("b", True), spec("c", False)]
    with pytest.raises(UserError, match="stage b failed"):
        pipe.stages(specs)
    share = max(1, (os.cpu_count() or 1) // 3)
    assert sorted(calls) == [("a", share), ("b", share), ("c", share)]
    assert set(pipe.state) == {"a", "c"}  # the finished siblings are recorded

    again = Pipeline(QuickstartConfig(work_dir=str(tmp_path)))  # a re-run, from stages.json
    calls.clear()
    started = threading.Barrier(1, timeout=30)
    again.stages([spec("a", False), spec("b", False), spec("c", False)])
    assert calls == [("b", max(1, os.cpu_count() or 1))]  # only the one that had failed
    assert set(again.state) == {"a", "b", "c"}
