"""Bad input: stop with file:line and leave nothing behind, or skip and count; interrupts clean up."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_preprocess import expected_documents, shard_documents

from megatron_cpt.data.preprocess import PreprocessConfig, run_preprocess
from megatron_cpt.errors import BadInputError, UserError
from megatron_cpt.tokenizers import build_tokenizer

REPO = Path(__file__).resolve().parent.parent
TOOL = REPO / "tools" / "preprocess_data.py"

GOOD = [
    json.dumps({"text": f"good document number {i}. It has two sentences."}).encode()
    for i in range(40)
]

# class -> (bad raw line, reason key, words the message must contain)
BAD_LINES = {
    "invalid_json": (b'{"text": "unterminated', "invalid_json", "invalid JSON"),
    "missing_key": (b'{"body": "no text key here"}', "missing_key", "missing key 'text'"),
    "non_string_key": (b'{"text": ["a", "list"]}', "non_string_key", "key 'text' is list"),
    "undecodable_bytes": (b'{"text": "caf\xe9 latin-1"}', "undecodable_bytes", "undecodable bytes"),
    "not_an_object": (b'["text", "in", "an", "array"]', "not_an_object", "expected a JSON object"),
    "lone_surrogate": (
        b'{"text": "broken \\ud800 escape"}',
        "undecodable_bytes",
        "unpaired surrogate",
    ),
}
BAD_LINE_NUMBER = 31  # 1-based; past the first chunks so two workers are both busy


def write_bad_file(path: Path, bad: bytes) -> Path:
    lines = GOOD[: BAD_LINE_NUMBER - 1] + [bad] + GOOD[BAD_LINE_NUMBER - 1 :]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


@pytest.fixture(scope="module")
def llama3(llama3_tokenizer_model):
    return build_tokenizer("Llama3Tokenizer", llama3_tokenizer_model)


def config_for(tmp_path, src, **kw) -> PreprocessConfig:
    return PreprocessConfig(
        inputs=[str(src)],
        output_prefix=str(tmp_path / "out" / "corpus"),
        tokenizer_type="Llama3Tokenizer",
        tokenizer_model="",
        log_interval=0,
        chunk_bytes=400,  # several chunks before and after the bad line
        **kw,
    )


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.rglob("*") if p.is_file()) if directory.exists() else []


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("kind", sorted(BAD_LINES))
def test_stop_mode_names_file_and_line_and_leaves_nothing(tmp_path, llama3, kind, workers):
    bad, reason, words = BAD_LINES[kind]
    src = write_bad_file(tmp_path / "input.jsonl", bad)
    with pytest.raises(BadInputError) as info:
        run_preprocess(
            config_for(tmp_path, src, workers=workers, append_eod=True), tokenizer=llama3
        )
    message = str(info.value)
    assert message.startswith(f"{src}:{BAD_LINE_NUMBER}: ")
    assert words in message and "\n" not in message
    assert info.value.reason == reason
    assert leftovers(tmp_path / "out") == []


@pytest.mark.parametrize("kind", sorted(BAD_LINES))
def test_skip_mode_counts_and_keeps_good_documents(tmp_path, llama3, kind):
    bad, reason, _ = BAD_LINES[kind]
    src = write_bad_file(tmp_path / "input.jsonl", bad)
    empty = b'{"text": "   "}'
    src.write_bytes(src.read_bytes() + empty + b"\n" + bad + b"\n")
    summary = run_preprocess(
        config_for(tmp_path, src, workers=2, append_eod=True, skip_bad_lines=True), tokenizer=llama3
    )
    assert summary["skipped"] == {reason: 2, "empty_document": 1}
    good_texts = [json.loads(line)["text"] for line in GOOD]
    prefix = summary["outputs"]["text"]["prefix"]
    assert shard_documents(prefix) == expected_documents(llama3, good_texts, append_eod=True)
    assert leftovers(tmp_path / "out") == ["corpus_text_document.bin", "corpus_text_document.idx"]


def run_tool(args, **kw):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run(
        [sys.executable, str(TOOL), *args], capture_output=True, text=True, env=env, **kw
    )


def test_cli_bad_line_one_line_error_exit_nonzero(tmp_path, llama3_tokenizer_model):
    src = write_bad_file(tmp_path / "input.jsonl", BAD_LINES["non_string_key"][0])
    common = ["--input", str(src), "--tokenizer-type", "Llama3Tokenizer"]
    common += ["--tokenizer-model", str(llama3_tokenizer_model), "--workers", "2"]
    result = run_tool([*common, "--output-prefix", str(tmp_path / "out" / "c")])
    assert result.returncode == 2
    assert result.stdout == ""
    assert (
        result.stderr.strip()
        == f"error: {src}:{BAD_LINE_NUMBER}: key 'text' is list, expected a string"
    )
    assert leftovers(tmp_path / "out") == []

    ok = run_tool(
        [*common, "--output-prefix", str(tmp_path / "ok" / "c"), "--skip-bad-lines", "--append-eod"]
    )
    assert ok.returncode == 0, ok.stderr
    summary = json.loads(ok.stdout)
    assert summary["skipped"] == {"non_string_key": 1}
    assert summary["documents"] == len(GOOD)
    assert leftovers(tmp_path / "ok") == ["c_text_document.bin", "c_text_document.idx"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--tokenizer-model", "/nope/tokenizer.model"], "no such file"),
        (["--tokenizer-model", "{model}", "--workers", "0"], "--workers 0"),
        (["--tokenizer-model", "{model}", "--input", "{tmp}/none*.jsonl"], "no such file"),
        (["--tokenizer-model", "{model}", "--partitions", "4"], "--partitions 4"),
    ],
)
def test_cli_bad_flags_are_one_line(tmp_path, llama3_tokenizer_model, args, message):
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "x"}\n')
    args = [
        a.replace("{model}", str(llama3_tokenizer_model)).replace("{tmp}", str(tmp_path))
        for a in args
    ]
    common = ["--input", str(src), "--output-prefix", str(tmp_path / "o")]
    result = run_tool([*common, "--tokenizer-type", "Llama3Tokenizer", *args])
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr
    assert leftovers(tmp_path) == ["in.jsonl"]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_run_leaves_no_valid_looking_pair(
    tmp_path, shared_data, llama3_tokenizer_model, sig
):
    lines = (shared_data / "domain" / "annual_reports.jsonl").read_bytes()
    src = tmp_path / "big.jsonl"
    src.write_bytes(lines * 20)  # ~30 MB: far longer than the moment we interrupt it
    out = tmp_path / "out"
    cmd = [sys.executable, str(TOOL), "--input", str(src), "--output-prefix", str(out / "big")]
    cmd += ["--tokenizer-type", "Llama3Tokenizer", "--tokenizer-model", str(llama3_tokenizer_model)]
    cmd += ["--workers", "2", "--log-interval", "100", "--chunk-bytes", "20000"]
    # A shell's background job (`pytest ... &`) inherits SIGINT ignored, and so would the tool,
    # which then runs to completion: give the child the default disposition, as a terminal has.
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        first = proc.stderr.readline()  # the first progress line: shards are being written
        assert first.startswith("processed"), first
        names = leftovers(out)
        assert names and all(n.endswith(".tmp") for n in names), names
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "interrupted"
    assert leftovers(out) == []
    time.sleep(0.1)  # orphaned workers would still be writing; there must be none
    assert leftovers(out) == []


@pytest.mark.parametrize("compress", ["gz", "zst"])
def test_truncated_compressed_input_is_one_line_and_leaves_nothing(tmp_path, llama3, compress):
    from test_preprocess import write_jsonl

    records = [{"text": f"document {i} " * 50} for i in range(400)]
    src = write_jsonl(tmp_path / f"in.jsonl.{compress}", records, compress)
    src.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    with pytest.raises(UserError, match=f"{src}: corrupt or truncated compressed data") as info:
        run_preprocess(config_for(tmp_path, src, workers=2, skip_bad_lines=True), tokenizer=llama3)
    assert "\n" not in str(info.value)
    assert leftovers(tmp_path / "out") == []


def test_unwritable_output_prefix_is_one_line(tmp_path, llama3):
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "x"}\n')
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    config = config_for(tmp_path, src)
    config.output_prefix = str(blocker / "sub" / "out")
    with pytest.raises(UserError, match="cannot write"):
        run_preprocess(config, tokenizer=llama3)
