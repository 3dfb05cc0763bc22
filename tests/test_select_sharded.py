"""Sharded scoring under torchrun (gloo, 2 CPU processes) on ../shared/data: the selection
equals the one-process run document for document, the summary shows the split, and a run whose
rank was killed resumes from the ranks' cache parts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parent.parent
TOOL = str(REPO / "tools" / "select_data.py")


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def _cmd(nproc: int, args: list[str]) -> list[str]:
    if nproc == 1:
        return [sys.executable, TOOL, *args]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--standalone",
        TOOL,
        *args,
    ]


def _select(nproc: int, args: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(_cmd(nproc, args), env=_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _args(inputs: list[str], out: Path, cache: Path, *extra: str) -> list[str]:
    return [
        "--input",
        *inputs,
        "--output",
        str(out),
        "--cache-dir",
        str(cache),
        "--no-progress",
        *extra,
    ]


def _selected_and_scores(out: Path) -> tuple[bytes, list[dict]]:
    scores = out.with_name(out.name.replace(".jsonl", ".scores.jsonl"))
    return out.read_bytes(), [json.loads(x) for x in scores.read_text().splitlines()]


def test_two_ranks_select_exactly_what_one_process_selects(shared_data, tmp_path):
    inputs = [str(p) for p in sorted((shared_data / "domain").glob("*.jsonl"))]
    extra = ("--metric", "random", "--sampling", "soft", "--seed", "7", "--fraction", "0.1")
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    _select(1, _args(inputs, one, tmp_path / "c1", *extra))
    _select(2, _args(inputs, two, tmp_path / "c2", *extra))
    sel1, rows1 = _selected_and_scores(one)
    sel2, rows2 = _selected_and_scores(two)
    assert sel1 and sel1 == sel2
    assert rows1 == rows2  # every score, rank and selection flag, document for document
    s1 = json.loads((tmp_path / "one.summary.json").read_text())
    s2 = json.loads((tmp_path / "two.summary.json").read_text())
    kept = s1["counts"]["kept_after_dedup"]
    assert (s1["ranks"], s1["scored_per_rank"]) == (1, [kept])
    assert s2["ranks"] == 2 and sum(s2["scored_per_rank"]) == kept
    assert min(s2["scored_per_rank"]) >= kept // 2  # an even split
    assert s2["counts"] == s1["counts"] and s2["tokens"] == s1["tokens"]
    assert s1["counts"]["duplicates_removed"] == 276  # the staged dedup, spread over 2 ranks
    # the ranks' parts were folded into one cache file per (input, scorer): nothing left over
    assert not list((tmp_path / "c2").glob("*.part-*"))
    assert sorted(p.name for p in (tmp_path / "c1").iterdir()) == sorted(
        p.name for p in (tmp_path / "c2").iterdir()
    )
    # a re-run on the merged cache scores nothing on any rank
    _select(2, _args(inputs, tmp_path / "again.jsonl", tmp_path / "c2", *extra))
    again = json.loads((tmp_path / "again.summary.json").read_text())
    assert again["scored_per_rank"] == [0, 0]
    assert (tmp_path / "again.jsonl").read_bytes() == sel1


def _kill_rank_when_it_has_flushed(launcher: subprocess.Popen, cache: Path, rank: int) -> bool:
    """SIGKILL the worker with ``RANK=rank`` once its cache part holds a flushed score."""
    deadline = time.monotonic() + 1800
    while time.monotonic() < deadline and launcher.poll() is None:
        parts = [p for p in cache.glob(f"*.part-{rank}.scores.jsonl") if p.stat().st_size]
        if parts:
            for child in psutil.Process(launcher.pid).children(recursive=True):
                try:
                    if child.environ().get("RANK") == str(rank):
                        child.send_signal(signal.SIGKILL)
                        return True
                except psutil.Error:
                    continue
        time.sleep(0.2)
    return False


@pytest.mark.slow
def test_killed_rank_resumes_and_matches_one_process(shared_data, tmp_path):
    """POS-entropy (spaCy) on 80 real paragraphs, flushed every 4 documents."""
    src = shared_data / "domain" / "annual_reports.jsonl"
    lines = src.read_text().splitlines(keepends=True)[:80]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(lines))
    extra = ("--metric", "pos-entropy", "--documents", "10", "--chunk-size", "4")
    cache = tmp_path / "c2"
    launcher = subprocess.Popen(
        _cmd(2, _args([str(corpus)], tmp_path / "two.jsonl", cache, *extra)),
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        killed = _kill_rank_when_it_has_flushed(launcher, cache, rank=1)
        code = launcher.wait(timeout=600)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert killed and code != 0
    assert not (tmp_path / "two.jsonl").exists()  # nothing that looks like a result
    done_before = sum(len(p.read_text().splitlines()) for p in cache.glob("*.part-*.scores.jsonl"))
    assert done_before > 0

    _select(2, _args([str(corpus)], tmp_path / "two.jsonl", cache, *extra))
    resumed = json.loads((tmp_path / "two.summary.json").read_text())
    _select(1, _args([str(corpus)], tmp_path / "one.jsonl", tmp_path / "c1", *extra))
    single = json.loads((tmp_path / "one.summary.json").read_text())
    kept = single["counts"]["kept_after_dedup"]
    # the resumed run scored only what the killed run had not flushed (per scorer: pos-entropy
    # and the token counter each flush their own part)
    assert resumed["cache"]["pos-entropy"]["cached"] > 0
    assert (
        resumed["cache"]["pos-entropy"]["cached"] + resumed["cache"]["pos-entropy"]["scored"]
        == kept
    )
    assert sum(resumed["scored_per_rank"]) < kept
    assert _selected_and_scores(tmp_path / "two.jsonl") == _selected_and_scores(
        tmp_path / "one.jsonl"
    )


def test_cache_parts_load_together_and_compact(tmp_path):
    """Ranks' part files (one torn by a kill) load as one cache; compact() folds them."""
    from megatron_cpt.selection.cache import ScoreCache

    main = ScoreCache(tmp_path, "filehash", "scorer")
    main.put(1, 0.5)
    main.flush()
    for rank, lines in ((0, (2, 3)), (1, (4, 5))):
        part = ScoreCache(tmp_path, "filehash", "scorer", part=rank)
        for line in lines:
            part.put(line, float(line))
        part.flush()
    torn = next(tmp_path.glob("*.part-1.scores.jsonl"))
    torn.write_bytes(torn.read_bytes() + b'{"line": 6, "sco')  # killed mid-write
    loaded = ScoreCache(tmp_path, "filehash", "scorer")
    assert loaded.scores == {1: 0.5, 2: 2.0, 3: 3.0, 4: 4.0, 5: 5.0}
    # rank 1 restarting repairs its own part and appends after the last whole row
    again = ScoreCache(tmp_path, "filehash", "scorer", part=1)
    again.put(6, float("nan"))
    again.flush()
    loaded.compact()
    assert not list(tmp_path.glob("*.part-*"))
    final = ScoreCache(tmp_path, "filehash", "scorer")
    assert set(final.scores) == {1, 2, 3, 4, 5, 6} and final.scores[6] != final.scores[6]
