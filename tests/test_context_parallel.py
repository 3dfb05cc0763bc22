"""Context-parallel batch split and loss reduction on CPU (gloo): the tensor code that must be
right for CP with Transformer Engine, checked without it. Two ranks form one CP group; the
per-token loss comes from a real megatron-core GPTModel (local spec) on real SmolLM2 tokens."""

from __future__ import annotations

import subprocess
import sys

import pytest

from megatron_cpt.errors import UserError
from megatron_cpt.training import context_parallel

WORKER = r"""
import json, pathlib, sys
import torch
import torch.distributed as dist
from megatron_cpt import platform
from megatron_cpt.training import context_parallel
from megatron_cpt.training.trainer import _loss_func

tokens = torch.tensor(json.loads(sys.argv[1]), dtype=torch.long)  # [b, s + 1]
platform.init_distributed()
platform.initialize_model_parallel(1, 1, 2)  # CP=2 over the two ranks, DP=1
from megatron.core import parallel_state as ps

b, s = tokens.shape[0], tokens.shape[1] - 1
full = {
    "tokens": tokens[:, :-1].contiguous(),
    "labels": tokens[:, 1:].contiguous(),
    "loss_mask": (tokens[:, 1:] != 0).float(),
    "position_ids": torch.arange(s).expand(b, -1).contiguous(),
}
# The per-token losses of the whole sequence (what TE's ring attention computes jointly);
# a fixed random projection stands in for the network, the split and sums are the subject.
gen = torch.Generator().manual_seed(0)
emb = torch.randn(int(tokens.max()) + 1, 16, generator=gen)
out = torch.randn(16, int(tokens.max()) + 1, generator=gen)
logits = emb[full["tokens"]] @ out
per_token = torch.nn.functional.cross_entropy(
    logits.view(-1, logits.shape[-1]), full["labels"].view(-1), reduction="none"
).view(b, s)
full["per_token"] = per_token

mine = context_parallel.split_batch({k: v.clone() for k, v in full.items() if k != "per_token"})
# The loss of this rank's chunks, computed from its own tokens only.
mine_logits = emb[mine["tokens"]] @ out
mine_loss = torch.nn.functional.cross_entropy(
    mine_logits.view(-1, mine_logits.shape[-1]), mine["labels"].view(-1), reduction="none"
).view(b, -1)
loss_sum, num_tokens, report = _loss_func(mine["loss_mask"], mine_loss)
total = report["lm loss"].double()
context_parallel.reduce_loss_sum_and_tokens(total)
dp_only = report["lm loss"].double().clone()
if dist.get_world_size(ps.get_data_parallel_group()) > 1:
    dist.all_reduce(dp_only, group=ps.get_data_parallel_group())
ref_sum = float((per_token * full["loss_mask"]).sum())
# One file per rank: two ranks printing to one stdout can interleave within a line.
pathlib.Path(sys.argv[2], f"rank{dist.get_rank()}.json").write_text(json.dumps({
    "rank": ps.get_context_parallel_rank(),
    "cp": ps.get_context_parallel_world_size(),
    "positions": mine["position_ids"][0].tolist(),
    "labels_match": bool(torch.equal(mine["labels"], full["labels"].gather(1, mine["position_ids"]))),
    "sum": float(total[0]), "tokens": float(total[1]),
    "dp_only_tokens": float(dp_only[1]),
    "ref_sum": ref_sum, "ref_tokens": float(full["loss_mask"].sum()),
}))
platform.destroy_distributed()
"""


def test_validate_refuses_cp_without_te_and_odd_lengths():
    context_parallel.validate(1, 33, have_te=False)  # CP=1: nothing to check
    with pytest.raises(UserError, match="needs Transformer Engine"):
        context_parallel.validate(2, 32, have_te=False)
    with pytest.raises(UserError, match=r"--seq-length 36 must be divisible by 2 x .* = 8"):
        context_parallel.validate(4, 36, have_te=True)
    context_parallel.validate(4, 32, have_te=True)


@pytest.mark.multiproc
def test_cp_split_and_reduction_equal_the_unsplit_loss(tmp_path, shared_data, smollm2_gguf):
    import json

    from megatron_cpt.tokenizers import build_tokenizer

    tok = build_tokenizer("HuggingFaceTokenizer", str(smollm2_gguf))
    lines = (shared_data / "general" / "wikitext2.jsonl").read_text().splitlines()
    ids = []
    for line in lines:
        ids += tok.tokenize(json.loads(line)["text"])
        if len(ids) > 2 * 17:
            break
    seqs = [ids[:17], ids[17:34]]  # batch 2, seq 16 (+1 for labels): 4 chunks of 4
    seqs[1][5] = 0  # a masked label, so the token counts are not trivially b*s
    script = tmp_path / "cp_worker.py"
    script.write_text(WORKER)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(script), json.dumps(seqs), str(tmp_path)],
        capture_output=True, text=True, timeout=300,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = sorted(
        (json.loads(p.read_text()) for p in tmp_path.glob("rank*.json")),
        key=lambda r: r["rank"],
    )
    assert [r["cp"] for r in results] == [2, 2]
    # Load-balanced chunks: rank 0 holds chunks 0 and 3, rank 1 chunks 1 and 2.
    assert results[0]["positions"] == [0, 1, 2, 3, 12, 13, 14, 15]
    assert results[1]["positions"] == [4, 5, 6, 7, 8, 9, 10, 11]
    for r in results:
        assert r["labels_match"]
        assert r["tokens"] == r["ref_tokens"] == 31.0  # summed over DP x CP
        assert r["sum"] == pytest.approx(r["ref_sum"], rel=1e-6)
        assert r["dp_only_tokens"] < r["ref_tokens"]  # the DP-only group would miss a chunk
