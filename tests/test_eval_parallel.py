"""tools/evaluate.py on a Megatron checkpoint under torchrun at TP=2 and PP=2 (gloo, CPU).

Every rank runs the same scoring loop (the last pipeline stage's logits are broadcast), so the
perplexity must equal the single-process TP=1 value of the same converted checkpoint.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_eval_scoring import CORPUS, make_tiny_llama

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def converted_pair(tmp_path_factory):
    from megatron_cpt.convert.importer import ImportConfig, import_hf

    root = tmp_path_factory.mktemp("parallel")
    hf = make_tiny_llama(root / "hf")
    ckpt = root / "mcore"
    import_hf(ImportConfig(str(hf), str(ckpt), tensor_parallel=2))
    data = root / "d.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in CORPUS))
    return hf, ckpt, data


def _evaluate(nproc: int, args: list[str], out: Path) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_port", str(29500 + os.getpid() % 1000 + nproc),
           str(REPO / "tools" / "evaluate.py"), *args, "--output", str(out)]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)  # set by the in-process conversion's one-rank group
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
@pytest.mark.multiproc
@pytest.mark.parametrize("parallel", [["--tp", "2"], ["--pp", "2"]])
def test_parallel_megatron_perplexity_equals_single_process(converted_pair, tmp_path, parallel):
    hf, ckpt, data = converted_pair
    common = ["--data", f"d={data}", "--seq-length", "32", "--batch-size", "4"]
    single = _evaluate(1, ["--megatron", str(ckpt), *common], tmp_path / "one.json")
    multi = _evaluate(2, ["--megatron", str(ckpt), *parallel, *common], tmp_path / "two.json")
    reference = _evaluate(1, ["--hf", str(hf), *common], tmp_path / "hf.json")
    one, two, ref = (r["perplexity"]["d"] for r in (single, multi, reference))
    assert two["tokens"] == one["tokens"] == ref["tokens"]
    assert two["ppl"] == pytest.approx(one["ppl"], rel=1e-4)
    assert two["ppl"] == pytest.approx(ref["ppl"], rel=1e-3)
