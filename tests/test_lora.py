"""LoRA on megatron-core's parallel linears: B = 0 leaves the logits unchanged, only adapters
train (no grads, no optimizer state for the base), merged weights give the adapter model's
logits (fp32, <= 1e-5), adapters round-trip on their own, and TP=2 (2-process torchrun, gloo)
equals TP=1 in logits, merged logits and adapter gradients."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_cpt import platform
from megatron_cpt.errors import UserError
from megatron_cpt.model import LlamaArch, ModelBuildConfig, build_model, build_transformer_config
from megatron_cpt.model.lora import (
    LoraSettings,
    adapter_state_dict,
    apply_lora,
    load_adapter_state_dict,
    lora_layers,
    merge_lora,
)

TOL = 1e-5
TINY = dict(num_layers=2, hidden_size=96, ffn_hidden_size=192, num_attention_heads=6,
            num_query_groups=2, vocab_size=1000)  # fmt: skip


@pytest.fixture(scope="module")
def mp():
    platform.init_distributed()
    platform.initialize_model_parallel(1, 1, 1)


def tiny():
    arch = LlamaArch(**TINY)
    build = ModelBuildConfig()
    platform.set_seed(11)
    return build_model(arch, build_transformer_config(arch, build), build=build).eval()


def tokens():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, TINY["vocab_size"], (2, 24), generator=gen)
    return ids, torch.arange(24).expand(2, -1)


def randomize_b(model, seed=5):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in lora_layers(model):
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=gen) * 0.05)


def test_zero_b_gives_the_base_logits_and_only_adapters_train(mp):
    model = tiny()
    ids, pos = tokens()
    with torch.no_grad():
        base = model(ids, pos, None)
    counts = apply_lora(model, LoraSettings(rank=4, alpha=8))
    assert counts["adapted_layers"] == 4 * TINY["num_layers"]
    with torch.no_grad():
        adapted = model(ids, pos, None)
    assert torch.equal(base, adapted)
    # frozen base: after a backward pass only adapters have gradients
    model.train()
    model(ids, pos, None).float().mean().backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    # the memory LoRA saves: Adam keeps two fp32 moments per trainable parameter
    assert counts["trainable_params"] * 20 < counts["frozen_params"]


def test_merged_weights_give_the_adapter_logits(mp):
    model = tiny()
    ids, pos = tokens()
    with torch.no_grad():
        base = model(ids, pos, None)
    apply_lora(model, LoraSettings(rank=4, alpha=16, targets=("linear_qkv", "linear_fc2")))
    randomize_b(model)
    saved = adapter_state_dict(model)
    with torch.no_grad():
        adapted = model(ids, pos, None)
    assert (adapted - base).abs().max() > 1e-3  # the adapters do something
    assert merge_lora(model) == 2 * TINY["num_layers"]
    assert not list(lora_layers(model))
    with torch.no_grad():
        merged = model(ids, pos, None)
    assert (merged - adapted).abs().max() <= TOL
    # adapters saved on their own load into a fresh adapted base and give the same logits
    fresh = tiny()
    apply_lora(fresh, LoraSettings(rank=4, alpha=16, targets=("linear_qkv", "linear_fc2")))
    load_adapter_state_dict(fresh, saved)
    with torch.no_grad():
        assert (fresh(ids, pos, None) - adapted).abs().max() <= TOL


def test_bad_settings_are_one_line_errors(mp):
    for settings, words in (
        (LoraSettings(rank=0, alpha=8), "--lora-rank 0"),
        (LoraSettings(rank=4, alpha=0), "--lora-alpha 0"),
        (LoraSettings(rank=4, alpha=8, dropout=1.0), "--lora-dropout 1.0"),
        (LoraSettings(rank=4, alpha=8, targets=("q_proj",)), "--lora-target q_proj"),
    ):
        with pytest.raises(UserError, match=words):
            settings.validate()


# ---- TP=2 equals TP=1 ------------------------------------------------------------------------

SETTINGS = dict(rank=4, alpha=16)


def loss_of(logits: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A fixed linear functional of the logits (each rank: its vocabulary slice)."""
    return (logits.float() * weights[..., : logits.shape[-1]]).sum()


def test_tp2_equals_tp1(mp, tmp_path):
    model = tiny()
    apply_lora(model, LoraSettings(**SETTINGS))
    randomize_b(model)
    ids, pos = tokens()
    base = {
        k: v.detach().clone()
        for k, v in model.state_dict().items()
        if torch.is_tensor(v) and "lora_" not in k and not k.endswith("_extra_state")
    }
    gen = torch.Generator().manual_seed(9)
    model.train()
    logits = model(ids, pos, None)
    weights = torch.randn(logits.shape, generator=gen)
    loss_of(logits, weights).backward()
    grads = {
        f"{n}.{part}": getattr(m, part).grad.clone()
        for n, m in lora_layers(model)
        for part in ("lora_A", "lora_B")
    }
    adapters = adapter_state_dict(model)
    with torch.no_grad():
        model.eval()
        adapted = model(ids, pos, None)
        merge_lora(model)
        merged = model(ids, pos, None)
    ref = tmp_path / "ref.pt"
    torch.save(
        dict(base=base, adapters=adapters, ids=ids, pos=pos, weights=weights, logits=adapted,
             merged=merged, grads=grads),
        ref,
    )  # fmt: skip
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        __file__, str(ref), str(tmp_path),
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).parent.parent))
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    for rank in range(2):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["adapted_layers"] == 4 * TINY["num_layers"]
        assert result["logits"] <= TOL and result["merged"] <= TOL, result
        assert result["grads_checked"] == 8 * TINY["num_layers"]
        assert result["grad"] <= TOL, result  # relative to the largest gradient entry


def worker(ref_path: str, out: str) -> None:
    """One TP=2 rank: load the TP=1 base and adapters as this rank's shards, compare."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

    from megatron_cpt.convert.tp import tp_shard

    ref = torch.load(ref_path, weights_only=True)
    platform.init_distributed()
    platform.initialize_model_parallel(2, 1, 1)
    rank = parallel_state.get_tensor_model_parallel_rank()
    arch = LlamaArch(**TINY)
    build = ModelBuildConfig(tensor_parallel=2)
    platform.set_seed(11)
    model = build_model(arch, build_transformer_config(arch, build), build=build)
    with torch.no_grad():
        for name, param in model.state_dict().items():
            if torch.is_tensor(param) and not name.endswith("_extra_state"):
                param.copy_(tp_shard(name, ref["base"][name], 2, rank))
    counts = apply_lora(model, LoraSettings(**SETTINGS))

    def shard(layer: str, part: str, full: torch.Tensor, kind: str) -> torch.Tensor:
        # the adapter half that is split follows its weight's split (see model/lora.py)
        split = (kind == "column" and part == "lora_B") or (kind == "row" and part == "lora_A")
        return tp_shard(f"{layer}.weight", full, 2, rank) if split else full

    with torch.no_grad():
        for layer, m in lora_layers(model):
            for part in ("lora_A", "lora_B"):
                full = ref["adapters"][f"{layer}.{part}"]
                getattr(m, part).copy_(shard(layer, part, full, m.lora_kind))
    model.train()
    local = model(ref["ids"], ref["pos"], None)
    vocab = local.shape[-1]
    loss_of(local, ref["weights"][..., rank * vocab : (rank + 1) * vocab]).backward()
    grad_diff, checked = 0.0, 0
    for layer, m in lora_layers(model):
        for part in ("lora_A", "lora_B"):
            want = shard(layer, part, ref["grads"][f"{layer}.{part}"], m.lora_kind)
            # relative: the functional sums 2*24*1024 logits, so gradients are large
            diff = (getattr(m, part).grad - want).abs().max() / want.abs().max().clamp(min=1e-12)
            grad_diff = max(grad_diff, diff.item())
            checked += 1
    with torch.no_grad():
        model.eval()
        logits = gather_from_tensor_model_parallel_region(model(ref["ids"], ref["pos"], None))
        merge_lora(model)
        merged = gather_from_tensor_model_parallel_region(model(ref["ids"], ref["pos"], None))
    result = {
        "adapted_layers": counts["adapted_layers"],
        "logits": (logits - ref["logits"]).abs().max().item(),
        "merged": (merged - ref["merged"]).abs().max().item(),
        "grad": grad_diff,
        "grads_checked": checked,
    }
    Path(out, f"rank{torch.distributed.get_rank()}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    worker(*sys.argv[1:3])
