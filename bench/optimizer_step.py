#!/usr/bin/env python
"""Per-step optimizer cost: our ``optimizer_step`` vs the sequence the trainer ran before.

Before (issue 14, Found 5): ``prepare_grads()`` + ``get_grad_norm()`` for the NaN/Inf check, then
megatron-core's ``optimizer.step()``, which prepares the grads and computes the norm again, with
megatron-core's fallback l2 norm (one host sync per tensor, fp32). Ours: the same parts once, the
norm in fp64 with one foreach call and one host sync. Both sides run in the same process on the
same model and gradients, interleaved, and the script prints their medians and the ratio; it
also times the l2 norm alone (upstream fallback vs ours) on the model's gradients.

    python bench/optimizer_step.py --model smollm2-135m --repeats 5

The gradients are fixed random values written into megatron-core's grad buffers (an optimizer
step's cost does not depend on where they came from), so no forward/backward is timed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from megatron_cpt import platform  # noqa: E402
from megatron_cpt.model import build_model_chunks, build_transformer_config, get_arch  # noqa: E402
from megatron_cpt.training import optimizer as opt_mod  # noqa: E402


def before(optimizer) -> float:
    """The trainer's old step: norm for the NaN check, then megatron-core's full step()."""
    optimizer.prepare_grads()
    norm = float(optimizer.get_grad_norm())
    if norm == norm:
        optimizer.step()
    return norm


def ours(optimizer) -> float:
    return opt_mod.optimizer_step(optimizer, loss_is_finite=True)[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--bf16", action="store_true")
    args = ap.parse_args()

    from megatron.core import utils
    from megatron.core.optimizer import clip_grads

    platform.init_distributed()
    platform.initialize_model_parallel(1, 1, 1)
    platform.set_seed(1)
    arch = get_arch(args.model)
    cfg = build_transformer_config(arch)
    settings = opt_mod.OptimizerSettings(lr=1e-5, clip_grad=1.0, bf16=args.bf16)
    model = opt_mod.wrap_ddp(build_model_chunks(arch, cfg), cfg, settings)
    optimizer = opt_mod.build_optimizer(model, settings)
    gen = torch.Generator().manual_seed(0)
    for buf in model[0].buffers:
        buf.grad_data.copy_(torch.randn(buf.grad_data.shape, generator=gen) * 1e-3)
    n_params = sum(p.numel() for p in model[0].parameters())
    n_tensors = sum(1 for _ in model[0].parameters())

    upstream_l2 = utils.local_multi_tensor_l2_norm
    ours_l2 = opt_mod._l2_norm_one_sync
    timings = {"before": [], "ours": [], "l2 upstream": [], "l2 ours": []}
    grads = [p.main_grad for p in model[0].parameters()]
    for _ in range(args.repeats):
        for name, l2, fn in (("before", upstream_l2, before), ("ours", ours_l2, ours)):
            clip_grads.l2_norm_impl = l2
            platform.synchronize()
            t = time.perf_counter()
            fn(optimizer)
            platform.synchronize()
            timings[name].append(time.perf_counter() - t)
        for name, l2 in (("l2 upstream", upstream_l2), ("l2 ours", ours_l2)):
            t = time.perf_counter()
            float(l2(0, None, [grads], False)[0])
            timings[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in timings.items()}
    print(f"model {args.model}: {n_params / 1e6:.1f}M parameters in {n_tensors} tensors, "
          f"{'bf16' if args.bf16 else 'fp32'}, {torch.get_num_threads()} threads, "
          f"median of {args.repeats}")  # fmt: skip
    for k, v in med.items():
        print(f"  {k:12s} {v * 1e3:9.1f} ms")
    print(f"optimizer step: before/ours = {med['before'] / med['ours']:.2f}x")
    print(f"l2 norm alone: upstream/ours = {med['l2 upstream'] / med['l2 ours']:.2f}x")
    platform.destroy_distributed()


if __name__ == "__main__":
    main()
