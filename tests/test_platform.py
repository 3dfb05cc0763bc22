"""The CPU redirections of megatron-core's CUDA assumptions (no GPU here, so they are active)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from megatron_cpt import platform

pytestmark = pytest.mark.skipif(platform.has_cuda(), reason="tests the CPU path")


@pytest.fixture(scope="module")
def mp():
    platform.init_distributed()
    platform.initialize_model_parallel(1, 1, 1)
    platform.set_seed(11)


def test_init_distributed_single_process_is_idempotent(mp):
    assert platform.init_distributed() == (0, 1)
    assert platform.init_distributed() == (0, 1)
    assert dist.get_backend() == "gloo"
    assert platform.device() == torch.device("cpu")
    platform.initialize_model_parallel(1, 1, 1)  # same sizes: no re-init
    from megatron.core import parallel_state as ps

    assert ps.get_tensor_model_parallel_world_size() == 1


def test_real_torch_is_untouched_and_megatron_sees_cpu(mp):
    # Only megatron-core's view of torch is redirected; the real module still refuses CUDA.
    with pytest.raises((AssertionError, RuntimeError)):
        torch.cuda.current_device()
    from megatron.core.transformer import utils

    mask = utils.get_default_causal_mask(5)
    assert mask.device.type == "cpu"
    assert torch.equal(mask, torch.triu(torch.ones(5, 5), diagonal=1).bool())


def test_rng_tracker_runs_on_the_cpu_generator(mp):
    from megatron.core import tensor_parallel

    tracker = tensor_parallel.get_cuda_rng_tracker()
    platform.set_seed(11)
    outside_1 = torch.rand(3)
    with tracker.fork():
        inside_1 = torch.rand(3)
    platform.set_seed(11)
    outside_2 = torch.rand(3)  # the fork did not consume the default stream
    with tracker.fork():
        inside_2 = torch.rand(3)
    assert torch.equal(outside_1, outside_2) and torch.equal(inside_1, inside_2)
    assert not torch.equal(inside_1, outside_1)
    with tracker.fork():
        inside_next = torch.rand(3)  # the tracked stream continues, it does not restart
    assert not torch.equal(inside_next, inside_2)

    state = platform.get_rng_state()
    a = (torch.rand(2), _fork_rand(tracker))
    platform.set_rng_state(state)
    b = (torch.rand(2), _fork_rand(tracker))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def _fork_rand(tracker):
    with tracker.fork():
        return torch.rand(2)


def test_clip_grads_scale_like_torch(mp):
    from megatron.core.optimizer import clip_grads

    params = [torch.nn.Parameter(torch.randn(4, 3)) for _ in range(3)]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for p, r in zip(params, ref):
        p.grad = torch.randn_like(p) * 10
        r.grad = p.grad.clone()
    norm = clip_grads.get_grad_norm_fp32([p.grad for p in params])
    clip_grads.clip_grad_by_total_norm_fp32(params, 1.0, norm)
    ref_norm = torch.nn.utils.clip_grad_norm_(ref, 1.0)
    assert abs(norm - ref_norm.item()) <= 1e-5 * ref_norm.item()
    for p, r in zip(params, ref):
        torch.testing.assert_close(p.grad, r.grad)


def test_cuda_type_names_only_while_megatron_sorts_params():
    t = torch.zeros(2, dtype=torch.bfloat16)
    assert t.type() == "torch.BFloat16Tensor"
    with platform._tensor_type_names_cuda():
        assert t.type() == "torch.cuda.BFloat16Tensor"
        assert torch.zeros(1).type() == "torch.cuda.FloatTensor"
        assert t.type(torch.float32).dtype == torch.float32  # conversions unchanged
    assert t.type() == "torch.BFloat16Tensor"


def test_no_cuda_fusions_fused_adam_or_fp32_warning_on_cpu(mp):
    from megatron_cpt.model import LlamaArch, build_transformer_config

    arch = LlamaArch(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                     num_query_groups=2, vocab_size=1000, rope_theta=10000.0)  # fmt: skip
    cfg = build_transformer_config(arch)
    assert platform.enable_cuda_fusions(cfg, cross_entropy=True) == []
    assert not cfg.bias_activation_fusion and not cfg.cross_entropy_loss_fusion
    assert not platform.use_fused_adam()
    notes = platform.startup_notes(False, [])
    assert not [n for n in notes if n.startswith("warning") or "fused kernels" in n]
