"""Fault injection for preprocess_data.py: bad flags, empty input, kill -9 of workers and parent."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest
from faults import (
    TOOLS,
    alive,
    assert_one_line,
    descendants,
    files_under,
    run_tool,
    tool_env,
    wait_for,
    wait_gone,
)

GOOD = "".join(f'{{"text": "document {i}. It has words."}}\n' for i in range(201))


def common(tmp_path, src, model):
    return [
        "--input",
        src,
        "--output-prefix",
        tmp_path / "out" / "c",
        "--tokenizer-type",
        "Llama3Tokenizer",
        "--tokenizer-model",
        model,
        "--log-interval",
        "0",
    ]


@pytest.mark.parametrize("value", ["0", "-5"])
def test_chunk_bytes_not_positive_blames_the_flag(tmp_path, llama3_tokenizer_model, value):
    src = tmp_path / "in.jsonl"
    src.write_text(GOOD)
    args = [*common(tmp_path, src, llama3_tokenizer_model), "--chunk-bytes", value]
    assert_one_line(run_tool("preprocess_data.py", args), f"--chunk-bytes {value}")
    assert files_under(tmp_path / "out") == []


@pytest.mark.parametrize("content", ["", "\n\n   \n", '{"text": ""}\n{"text": "  "}\n'])
@pytest.mark.parametrize("workers", ["1", "2"])
def test_empty_input_is_one_line_and_writes_no_pair(
    tmp_path, llama3_tokenizer_model, content, workers
):
    src = tmp_path / "in.jsonl"
    src.write_text(content)
    args = [*common(tmp_path, src, llama3_tokenizer_model), "--workers", workers]
    assert_one_line(run_tool("preprocess_data.py", args), str(src), "no non-empty documents")
    assert files_under(tmp_path / "out") == []


def _big_input(tmp_path, shared_data):
    lines = (shared_data / "domain" / "annual_reports.jsonl").read_bytes()
    src = tmp_path / "big.jsonl"
    src.write_bytes(lines * 20)  # far longer than the moment we kill something
    return src


def _start(tmp_path, src, model):
    cmd = [sys.executable, str(TOOLS / "preprocess_data.py")]
    cmd += [*map(str, common(tmp_path, src, model))]
    cmd += ["--workers", "2", "--log-interval", "100", "--chunk-bytes", "20000"]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=tool_env()
    )
    first = proc.stderr.readline()  # the first progress line: workers are busy
    assert first.startswith("processed"), first + proc.stderr.read()
    workers = descendants(proc.pid)
    assert len(workers) >= 2, workers
    return proc, workers


def test_kill9_of_a_worker_is_one_line_and_leaves_nothing(
    tmp_path, shared_data, llama3_tokenizer_model
):
    proc, workers = _start(tmp_path, _big_input(tmp_path, shared_data), llama3_tokenizer_model)
    try:
        workers[0].send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    result = subprocess.CompletedProcess(proc.args, proc.returncode, "", err)
    assert_one_line(result, "tokenizer worker died", "SIGKILL")
    assert wait_gone(workers) == []
    assert files_under(tmp_path / "out") == []


def test_kill9_of_the_parent_takes_its_workers(tmp_path, shared_data, llama3_tokenizer_model):
    proc, workers = _start(tmp_path, _big_input(tmp_path, shared_data), llama3_tokenizer_model)
    proc.kill()
    proc.wait()
    proc.stderr.close()
    proc.stdout.close()
    assert wait_gone(workers) == [], "workers outlived a SIGKILLed parent"
    # Nothing valid-looking: only the temporary names a killed run cannot clean up.
    names = files_under(tmp_path / "out")
    assert all(n.endswith(".tmp") for n in names), names
    assert wait_for(lambda: not alive(workers), timeout=1)
