#!/usr/bin/env python
"""Per-tensor cost of each merge kernel as a multiple of the I/O floor, same process.

One 4096x4096 bf16 base and one fine-tune; the floor reads two such tensors from files (page
cache) and writes one. TIES runs with the native kernel and the PyTorch kernel side by side (the
two results are asserted equal), for one and for three fine-tunes (whose floor is two more
reads: 5/3 of the one-fine-tune floor). Best of 3 (1 for the random and slow ones): ``python
bench/merge_kernels.py``. ``--ties``: only the TIES rows (PyTorch kernel, native kernel, its
generic non-AVX2 build) and the floor, timed in interleaved rounds (robust on a shared machine).
"""

import os
import sys
import tempfile
import time

import torch

from megatron_cpt.merge import methods as M
from megatron_cpt.merge import native

torch.manual_seed(0)
n = (4096, 4096)
base = (torch.randn(n) * 0.02).bfloat16()
cpt = (base.float() + torch.randn(n) * 0.002).bfloat16()


def t(f, reps=3):
    best = 1e9
    for _ in range(reps):
        s = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - s)
    return best


spec = M.TASK_ARITHMETIC_FAMILY
rows = {}
rows["read+write floor (2 x 32 MiB in, 32 MiB out, page cache)"] = None
d = tempfile.mkdtemp()
for name, x in (("a", base), ("b", cpt)):
    x.view(torch.int16).numpy().tofile(f"{d}/{name}")


def io():
    a = torch.from_file(f"{d}/a", size=base.numel(), dtype=torch.int16).clone()
    b = torch.from_file(f"{d}/b", size=base.numel(), dtype=torch.int16).clone()
    del b  # read, as a merge reads both inputs
    a.numpy().tofile(f"{d}/o")


rows["read+write floor (2 x 32 MiB in, 32 MiB out, page cache)"] = t(io)
rows["delta only (cpt - base)"] = t(lambda: cpt - base)
rows["task_arithmetic"] = t(
    lambda: M.task_arithmetic_family(
        spec["task_arithmetic"],
        base,
        [cpt],
        [1.0],
        [1.0],
        normalize=False,
        lambda_=1.0,
        rescale=False,
    )
)
delta = cpt - base
rows["  TIES trim alone (radix select)"] = t(lambda: M.magnitude_trim(delta, 0.5))


def ties(tensors=(cpt,), weights=(1.0,), densities=(0.5,)):
    return M.task_arithmetic_family(
        spec["ties"],
        base,
        list(tensors),
        list(weights),
        list(densities),
        normalize=True,
        lambda_=1.0,
        rescale=False,
    )


def pytorch_kernel(f):
    """Run f with the native kernel switched off (native.ENV_SWITCH)."""

    def run():
        os.environ[native.ENV_SWITCH] = "0"
        try:
            return f()
        finally:
            del os.environ[native.ENV_SWITCH]

    return run


cpt2 = (base.float() + torch.randn(n) * 0.003).bfloat16()
three = dict(tensors=(cpt, cpt2, cpt), weights=(0.5, 0.3, 0.2), densities=(0.5, 0.3, 0.7))


def generic_kernel(f):
    """Run f with the native kernel's generic (non-AVX2) build (native.ENV_SWITCH=generic)."""

    def run():
        os.environ[native.ENV_SWITCH] = "generic"
        try:
            return f()
        finally:
            del os.environ[native.ENV_SWITCH]

    return run


if "--ties" in sys.argv:
    # TIES only, interleaved: every round runs each variant once, so a load change on a shared
    # machine hits all of them alike; the best round of each is kept.
    rounds = 7
    variants = {"read+write floor (1 fine-tune)": io}
    for label, kwargs in (("1 fine-tune", {}), ("3 fine-tunes", three)):
        variants[f"ties {label}, PyTorch kernel"] = pytorch_kernel(lambda kw=kwargs: ties(**kw))
        if native.enabled():
            variants[f"ties {label}, native"] = lambda kw=kwargs: ties(**kw)
            variants[f"ties {label}, native generic"] = generic_kernel(lambda kw=kwargs: ties(**kw))
            for run in (
                variants[f"ties {label}, native"],
                variants[f"ties {label}, native generic"],
            ):
                assert torch.equal(run(), pytorch_kernel(lambda kw=kwargs: ties(**kw))())
    best = dict.fromkeys(variants, 1e9)
    for _ in range(rounds):
        for label, run in variants.items():
            start = time.perf_counter()
            run()
            best[label] = min(best[label], time.perf_counter() - start)
    floor = best["read+write floor (1 fine-tune)"]
    print(f"one 4096x4096 bf16 tensor, {torch.get_num_threads()} threads, best of {rounds} "
          f"interleaved rounds; {native.describe()}; 3 fine-tunes' floor = 5/3 of this floor")  # fmt: skip
    for label, seconds in best.items():
        print(f"{label:<44}{seconds * 1000:9.1f} ms {seconds / floor:7.2f}x floor")
    sys.exit(0)

rows["ties d=0.5 (PyTorch kernel)"] = t(pytorch_kernel(ties))
if native.enabled():
    assert torch.equal(ties(), pytorch_kernel(ties)())
    rows["ties d=0.5 (native kernel)"] = t(ties)
rows["ties 3 fine-tunes (PyTorch kernel)"] = t(pytorch_kernel(lambda: ties(**three)))
if native.enabled():
    assert torch.equal(ties(**three), pytorch_kernel(lambda: ties(**three))())
    rows["ties 3 fine-tunes (native kernel)"] = t(lambda: ties(**three))
rows["breadcrumbs_ties (torch.sort, as mergekit)"] = t(
    lambda: M.task_arithmetic_family(
        spec["breadcrumbs_ties"],
        base,
        [cpt],
        [1.0],
        [0.5],
        normalize=False,
        lambda_=1.0,
        rescale=False,
        gammas=[0.01],
    )
)
g = torch.Generator().manual_seed(0)
rows["della (argsort x2 per row)"] = t(
    lambda: M.task_arithmetic_family(
        spec["della"],
        base,
        [cpt],
        [1.0],
        [0.5],
        normalize=True,
        lambda_=1.0,
        rescale=True,
        generator=g,
        epsilons=[0.1],
    ),
    1,
)
rows["dare_ties"] = t(
    lambda: M.task_arithmetic_family(
        spec["dare_ties"],
        base,
        [cpt],
        [1.0],
        [0.5],
        normalize=False,
        lambda_=1.0,
        rescale=True,
        generator=g,
    ),
    1,
)
rows["sce topk 0.5 (2 models)"] = t(lambda: M.sce(base, [cpt, cpt], 0.5, False), 1)
rows["model_stock (2 models)"] = t(lambda: M.model_stock(base, [cpt, delta + base], False), 1)
rows["slerp"] = t(lambda: M.slerp(0.5, base, cpt))
rows["nearswap"] = t(lambda: M.nearswap(base, cpt, 1e-3))
f = rows["read+write floor (2 x 32 MiB in, 32 MiB out, page cache)"]
print(
    f"one 4096x4096 bf16 tensor, {torch.get_num_threads()} threads, best of 3 (1 for random ones);"
    f" {native.describe()}"
)
for k, v in rows.items():
    print(f"{k:<58}{v * 1000:9.1f} ms {v / f:7.1f}x floor")
