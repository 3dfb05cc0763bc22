#!/usr/bin/env python
"""SDPA core attention vs megatron-core's unfused ``DotProductAttention``: speed, peak memory
and loss parity of a forward + backward pass of a real model shape.

For each sequence length, each backend runs in its own child process (so that its peak memory
is its own): the same GPTModel (same seed, so the same weights), the same random tokens,
``--warmup`` then ``--steps`` timed forward+backward passes (no optimizer: attention is the
variable). Printed per length: ms per pass for each (wall; the JSON also has CPU ms, steadier
on a shared box), the speed-up, peak memory above the
model-and-gradients baseline (activations), and the first loss of each side (same weights,
same tokens: they must agree to rounding).

    python bench/attention.py --model smollm2-135m --seq-lengths 256,512,1024
    python bench/attention.py --model llama3.2-1b --seq-lengths 4096 --micro-batch-size 2   # GPU

On a CPU peak memory is the child's peak RSS (which cannot be reset, so "activations" = peak
RSS minus RSS once the model and its gradients exist); on a GPU it is the CUDA allocator's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from train_throughput import SHAPES, hf_config  # noqa: E402

from megatron_cpt import platform  # noqa: E402
from megatron_cpt.model.arch import from_hf_config  # noqa: E402

BACKENDS = ("auto", "unfused")


def run_side(args) -> None:
    from megatron_cpt.model import ModelBuildConfig, build_model, build_transformer_config

    dtype = torch.bfloat16 if platform.supports_bf16() else torch.float32
    arch = from_hf_config(hf_config(args.model, args.seq_length))
    platform.init_distributed()
    platform.initialize_model_parallel(1, 1, 1)
    platform.set_seed(1234)
    build = ModelBuildConfig(bf16=dtype == torch.bfloat16, attention_backend=args.side)
    model = build_model(arch, build_transformer_config(arch, build), build=build)
    gen = torch.Generator().manual_seed(0)
    shape = (args.micro_batch_size, args.seq_length + 1)
    batch = torch.randint(3, arch.vocab_size, shape, generator=gen).to(platform.device())
    tokens, labels = batch[:, :-1], batch[:, 1:]
    pos = torch.arange(args.seq_length, device=tokens.device).expand_as(tokens)
    for p in model.parameters():  # gradients exist before the baseline is taken
        p.grad = torch.zeros_like(p)
    platform.synchronize()
    baseline = platform.memory_in_use_bytes()
    platform.reset_peak_memory()
    losses = []

    def step():
        loss = model(tokens, pos, None, labels=labels).float().mean()
        loss.backward()
        losses.append(float(loss))

    for _ in range(args.warmup):
        step()
    platform.synchronize()
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(args.steps):
        step()
    platform.synchronize()
    seconds = (time.perf_counter() - start) / args.steps
    cpu_seconds = (time.process_time() - cpu) / args.steps
    peak = platform.peak_memory_bytes()
    result = dict(ms=1000 * seconds, cpu_ms=1000 * cpu_seconds, first_loss=losses[0], activations_bytes=peak - baseline,
                  peak_bytes=peak)  # fmt: skip
    print("RESULT " + json.dumps(result), flush=True)


def _child(backend: str, seq: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--side", backend,
           "--seq-length", str(seq)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
        raise SystemExit(f"error: {backend} at seq {seq} failed (exit {proc.returncode})")
    return json.loads(lines[-1][len("RESULT ") :])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", choices=sorted(SHAPES))
    p.add_argument("--seq-lengths", default="256,512,1024")
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--side", choices=BACKENDS, help=argparse.SUPPRESS)
    p.add_argument("--seq-length", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.side:
        return run_side(args)
    dtype = torch.bfloat16 if platform.supports_bf16() else torch.float32
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"model {args.model}, micro-batch {args.micro_batch_size}, {dtype}, {device}, "
          f"forward+backward, memory = {platform.memory_kind()}")  # fmt: skip
    print(f"{'seq':>6} {'SDPA ms':>9} {'unfused ms':>10} {'speed-up':>8} {'SDPA act GiB':>12} "
          f"{'unfused act GiB':>15} {'loss SDPA':>12} {'loss unfused':>12}")  # fmt: skip
    rows = []
    for seq in (int(x) for x in args.seq_lengths.split(",")):
        r = {b: _child(b, seq) for b in BACKENDS}
        s, u = r["auto"], r["unfused"]
        rows.append(dict(seq_length=seq, sdpa=s, unfused=u, speedup=u["ms"] / s["ms"],
                         speedup_cpu_time=u["cpu_ms"] / s["cpu_ms"],
                         loss_diff=abs(s["first_loss"] - u["first_loss"])))  # fmt: skip
        print(f"{seq:>6} {s['ms']:>9.1f} {u['ms']:>10.1f} {u['ms'] / s['ms']:>7.2f}x "
              f"{s['activations_bytes'] / 2**30:>12.3f} {u['activations_bytes'] / 2**30:>15.3f} "
              f"{s['first_loss']:>12.6f} {u['first_loss']:>12.6f}")  # fmt: skip
    print(json.dumps({"model": args.model, "device": device, "dtype": str(dtype), "rows": rows}))


if __name__ == "__main__":
    main()
