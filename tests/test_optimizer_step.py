"""One optimizer step, in process (one-rank gloo group): the gradient norm is computed once, the
NaN/Inf skip still holds, and the fp64 l2 norm that replaces megatron-core's fallback."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_cpt import platform
from megatron_cpt.model import LlamaArch, build_model_chunks, build_transformer_config
from megatron_cpt.training import optimizer as optim_mod
from megatron_cpt.training.optimizer import (
    OptimizerSettings,
    build_optimizer,
    optimizer_step,
    wrap_ddp,
)

ARCH = LlamaArch(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                 num_query_groups=2, vocab_size=1000, rope_theta=10000.0)  # fmt: skip


@pytest.fixture(scope="module")
def mp():
    platform.init_distributed()
    platform.initialize_model_parallel(1, 1, 1)


def _model_and_grads(settings: OptimizerSettings, seed: int = 3):
    from megatron.core.distributed import finalize_model_grads

    platform.set_seed(seed)
    cfg = build_transformer_config(ARCH)
    model = wrap_ddp(build_model_chunks(ARCH, cfg), cfg, settings)
    opt = build_optimizer(model, settings)
    for chunk in model:
        chunk.zero_grad_buffer()
    opt.zero_grad()
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, ARCH.vocab_size, (2, 16), generator=gen)
    pos = torch.arange(16).expand(2, -1)
    model[0](ids, pos, None, labels=torch.roll(ids, -1, 1)).mean().backward()
    finalize_model_grads(model)
    return model, opt


def _count_norms(monkeypatch) -> list[int]:
    """Count megatron-core's grad-norm computations (the function every path goes through)."""
    from megatron.core.optimizer import clip_grads, optimizer

    calls = [0]
    upstream = clip_grads.get_grad_norm_fp32

    def counting(*args, **kwargs):
        calls[0] += 1
        return upstream(*args, **kwargs)

    monkeypatch.setattr(clip_grads, "get_grad_norm_fp32", counting)
    monkeypatch.setattr(optimizer, "get_grad_norm_fp32", counting)
    return calls


def _params(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model[0].parameters()]


def test_grad_norm_once_and_same_update_as_megatron_step(mp, monkeypatch):
    settings = OptimizerSettings(lr=1e-2, clip_grad=0.05)  # the norm is well above: clipping on
    calls = _count_norms(monkeypatch)
    model_a, opt_a = _model_and_grads(settings)
    norm, skipped = optimizer_step(opt_a, loss_is_finite=True)
    assert calls[0] == 1 and not skipped
    assert norm > 0.05

    calls[0] = 0
    model_b, opt_b = _model_and_grads(settings)
    ok, norm_b, _ = opt_b.step()  # megatron-core's own step: the reference update
    assert ok and calls[0] == 1
    assert norm == pytest.approx(norm_b, rel=1e-7)
    for a, b in zip(_params(model_a), _params(model_b)):
        assert torch.equal(a, b)


def test_non_finite_grad_skips_the_update(mp, monkeypatch):
    settings = OptimizerSettings(lr=1e-2)
    calls = _count_norms(monkeypatch)
    model, opt = _model_and_grads(settings)
    before = _params(model)
    next(iter(model[0].parameters())).main_grad.view(-1)[0] = float("nan")
    norm, skipped = optimizer_step(opt, loss_is_finite=True)
    assert skipped and math.isnan(norm) and calls[0] == 1
    assert all(torch.equal(a, b) for a, b in zip(before, _params(model)))

    model, opt = _model_and_grads(settings)
    before = _params(model)
    norm, skipped = optimizer_step(opt, loss_is_finite=False)  # a NaN loss also skips
    assert skipped and math.isfinite(norm)
    assert all(torch.equal(a, b) for a, b in zip(before, _params(model)))


def test_l2_norm_is_fp64_and_matches_the_fallback():
    from megatron.core.utils import local_multi_tensor_l2_norm

    gen = torch.Generator().manual_seed(0)
    tensors = [torch.randn(n, generator=gen) * s for n, s in ((300_000, 1e-3), (1000, 1.0), (7, 5))]
    ours, _ = optim_mod._l2_norm_one_sync(0, None, [tensors], False)
    exact = math.sqrt(sum(float((t.double() ** 2).sum()) for t in tensors))
    assert ours.dtype == torch.float64 and ours.shape == (1,)
    assert ours.item() == pytest.approx(exact, rel=1e-12)
    upstream, _ = local_multi_tensor_l2_norm(0, None, [tensors], False)  # fp32 per tensor
    assert upstream.item() == pytest.approx(exact, rel=1e-4)
    empty, _ = optim_mod._l2_norm_one_sync(0, None, [[]], False)
    assert empty.item() == 0.0


def test_adam_state_exists_before_the_first_step(mp):
    """Found 3: a DistributedOptimizer with torch Adam has a state_dict before any step."""
    settings = OptimizerSettings(lr=1e-2, use_distributed_optimizer=True)
    _, opt = _model_and_grads(settings)
    inner = opt.chained_optimizers[0] if hasattr(opt, "chained_optimizers") else opt
    state = inner.state_dict()  # asserted len(steps) == 1 on an empty state before the fix
    assert all(g["step"] == 0 for g in state["optimizer"]["param_groups"])
