"""dist_checkpointing save/load (single rank; re-sharding across TP/PP is covered by the
torchrun tests in test_train.py, which load a TP=1 checkpoint at TP=2 and PP=2)."""

from __future__ import annotations

import json

import pytest
import torch

from megatron_cpt import platform
from megatron_cpt.errors import UserError
from megatron_cpt.model import LlamaArch, build_model_chunks, build_transformer_config
from megatron_cpt.training import checkpointing as ck
from megatron_cpt.training.optimizer import (
    OptimizerSettings,
    ScheduleSettings,
    build_optimizer,
    build_scheduler,
    wrap_ddp,
)

ARCH = LlamaArch(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                 num_query_groups=2, vocab_size=1000, rope_theta=10000.0)  # fmt: skip
OPT = OptimizerSettings(lr=1e-2)
SCHED = ScheduleSettings(train_iters=10, lr_warmup_iters=2)


@pytest.fixture(scope="module")
def mp():
    platform.init_distributed()
    platform.initialize_model_parallel(1, 1, 1)


def make(seed: int, arch: LlamaArch = ARCH):
    platform.set_seed(seed)
    cfg = build_transformer_config(arch)
    model = wrap_ddp(build_model_chunks(arch, cfg), cfg)
    opt = build_optimizer(model, OPT)
    sched = build_scheduler(opt, OPT, SCHED)
    from megatron.core.distributed import finalize_model_grads

    cfg.finalize_model_grads_func = finalize_model_grads
    return model, opt, sched


def train(model, opt, sched, steps: int) -> list[float]:
    from megatron.core.distributed import finalize_model_grads

    losses = []
    for _ in range(steps):
        for chunk in model:
            chunk.zero_grad_buffer()
        opt.zero_grad()
        ids = torch.randint(0, ARCH.vocab_size, (2, 16))
        pos = torch.arange(16).expand(2, -1)
        loss = model[0](ids, pos, None, labels=torch.roll(ids, -1, 1)).mean()
        loss.backward()
        finalize_model_grads(model)
        opt.step()
        sched.step(1)
        losses.append(loss.item())
    return losses


def optimizer_tensors(opt) -> dict:
    """(param index, state key) -> copy of the tensor (Adam moments and step)."""
    sds = opt.state_dict()
    sds = sds if isinstance(sds, list) else [sds]
    return {
        (i, idx, key): value.clone()
        for i, sd in enumerate(sds)
        for idx, state in sd["state"].items()
        for key, value in state.items()
        if torch.is_tensor(value)
    }


def test_save_load_is_exact_and_resumes_identically(mp, tmp_path):
    model, opt, sched = make(1)
    train(model, opt, sched, 3)
    ck.save_checkpoint(tmp_path, 3, model, opt, sched, state={"consumed_samples": 6}, arch=ARCH)
    assert ck.latest_iteration(tmp_path) == 3
    weights = ck.model_state_for_test(model)
    moments = optimizer_tensors(opt)
    rng = platform.get_rng_state()
    continued = train(model, opt, sched, 2)

    platform.set_rng_state(rng)
    model2, opt2, sched2 = make(99)  # different init, different RNG
    state = ck.load_checkpoint(tmp_path, model2, opt2, sched2)
    assert state["iteration"] == 3 and state["consumed_samples"] == 6 and state["rng_restored"]
    assert sched2.num_steps == 3
    loaded = ck.model_state_for_test(model2)
    assert loaded.keys() == weights.keys()
    assert all(torch.equal(loaded[k], weights[k]) for k in weights)
    loaded_moments = optimizer_tensors(opt2)
    assert loaded_moments.keys() == moments.keys() and len(moments) > 0
    assert all(torch.equal(loaded_moments[k], moments[k]) for k in moments)
    assert train(model2, opt2, sched2, 2) == continued  # bit-identical continuation

    meta = ck.read_metadata(tmp_path)
    assert meta["arch"] == ARCH and meta["iteration"] == 3
    assert meta["padded_vocab_size"] == 1024 and meta["tensor_parallel"] == 1
    assert meta["has_optimizer"] and meta["state"]["consumed_samples"] == 6
    on_disk = json.loads((tmp_path / "iter_0000003" / ck.METADATA_FILE).read_text())
    assert on_disk["hf_config"] == ARCH.to_hf_config()


def test_weights_only_keep_last_and_unpublished_saves(mp, tmp_path):
    model, opt, sched = make(2)
    for it in (1, 2, 3):
        ck.save_checkpoint(tmp_path, it, model, arch=ARCH, keep_last=2, save_rng=False)
    assert sorted(p.name for p in tmp_path.glob("iter_*")) == ["iter_0000002", "iter_0000003"]
    # A save that never published (killed): ignored, the pointer still names iteration 3.
    (tmp_path / "iter_0000004.partial").mkdir()
    assert ck.latest_iteration(tmp_path) == 3

    model2, opt2, sched2 = make(5)
    state = ck.load_checkpoint(tmp_path, model2, weights_only=True)
    assert state["iteration"] == 0 and not state["rng_restored"]
    a, b = ck.model_state_for_test(model), ck.model_state_for_test(model2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # An iter_* directory works as well as the save root.
    ck.load_checkpoint(tmp_path / "iter_0000002", model2, weights_only=True)
    with pytest.raises(UserError, match="has no optimizer state"):
        ck.load_checkpoint(tmp_path, model2, opt2, sched2)


def test_mismatched_model_is_one_clear_line(mp, tmp_path):
    model, _, _ = make(3)
    ck.save_checkpoint(tmp_path, 1, model, arch=ARCH, save_rng=False)
    wider = ARCH.replace(ffn_hidden_size=256)
    other, _, _ = make(3, wider)
    with pytest.raises(UserError) as err:
        ck.load_checkpoint(tmp_path, other, weights_only=True)
    msg = str(err.value)
    assert "\n" not in msg
    # fc2 is stacked over layers: (layers, hidden, ffn) saved vs wanted.
    saved = (ARCH.num_layers, ARCH.hidden_size, ARCH.ffn_hidden_size)
    wanted = (ARCH.num_layers, ARCH.hidden_size, wider.ffn_hidden_size)
    assert f"'decoder.layers.mlp.linear_fc2.weight' has shape {saved}" in msg
    assert f"but {wanted} in this model" in msg
    with pytest.raises(UserError, match="does not exist"):
        ck.load_checkpoint(tmp_path / "nope", model, weights_only=True)
    (tmp_path / ck.TRACKER_FILE).write_text("four\n")
    with pytest.raises(UserError, match="latest_checkpointed_iteration.txt:1: expected"):
        ck.latest_iteration(tmp_path)
