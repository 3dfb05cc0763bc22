#!/usr/bin/env python
"""Training throughput of our megatron-core trainer vs a plain HF Transformers + PyTorch loop.

Same model shape, same batch (micro-batch × sequence length), same precision, same optimizer
settings, run side by side by one command: each side runs in its own child process (so that
its peak memory is its own), ``--warmup`` steps then ``--steps`` timed steps (synchronised),
and the script prints tokens/s, TFLOP/s, MFU and peak memory for each and the ratio ours/HF.
``--repeats N`` alternates the two sides N times and reports the median of each (shared,
noisy machines). FLOPs use the exact Llama formula in ``megatron_cpt/flops.py`` (matmuls incl.
LM head and full-square attention, ×3 for training).

    python bench/train_throughput.py --model llama3.2-1b --seq-length 4096 --micro-batch-size 2
    python bench/train_throughput.py --model smollm2-135m --seq-length 256 --micro-batch-size 8
    python bench/train_throughput.py --model tiny --seq-length 64 --steps 2      # CPU smoke run

What is the same on both sides: shape, tokens per step, precision of the compute (fp32 on a CPU,
bf16 on a GPU), AdamW with the same lr / betas / eps / weight decay, gradient clipping at 1.0,
one optimizer step per micro-batch, SDPA attention (ours: ``--attention-backend auto``; pass
``--attention-backend unfused`` to measure megatron-core's own). What still differs: ours keeps
fp32 main weights and gradients under bf16 (megatron-core's mixed-precision optimizer; the HF
loop's default ``--hf-precision bf16`` is pure bf16 weights and optimizer state, the faster and
less exact regime; ``--hf-precision amp`` gives it fp32 weights with bf16 autocast instead);
ours reads a real indexed shard through megatron-core's dataset pipeline while the HF loop
reuses one batch in memory; on CPU both sides use the same torch AdamW, on a GPU the HF side
uses ``fused=True``. Data are random token ids (throughput does not depend on their values).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from megatron_cpt import assets, platform  # noqa: E402
from megatron_cpt.flops import training_flops_per_step  # noqa: E402
from megatron_cpt.model.arch import from_hf_config  # noqa: E402
from megatron_cpt.model.builder import padded_vocab_size  # noqa: E402

LLAMA3 = dict(vocab_size=128256, rope_theta=500000.0, rms_norm_eps=1e-5,
              bos_token_id=128000, eos_token_id=128001)  # fmt: skip
# Llama-3.2-1B / -3B shapes (Llama-3 tokenizer, GQA 8 groups, tied embeddings), the real
# SmolLM2-135M shape (its own 49,152-token vocabulary), and "tiny" for CPU smoke runs.
SHAPES = {
    "llama3.2-1b": dict(LLAMA3, num_hidden_layers=16, hidden_size=2048, intermediate_size=8192,
                        num_attention_heads=32, num_key_value_heads=8),
    "llama3.2-3b": dict(LLAMA3, num_hidden_layers=28, hidden_size=3072, intermediate_size=8192,
                        num_attention_heads=24, num_key_value_heads=8),
    "smollm2-135m": dict(num_hidden_layers=30, hidden_size=576, intermediate_size=1536,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                         rope_theta=100000.0, rms_norm_eps=1e-5, bos_token_id=1,
                         eos_token_id=2),
    "tiny": dict(LLAMA3, num_hidden_layers=2, hidden_size=64, intermediate_size=176,
                 num_attention_heads=4, num_key_value_heads=2),
}  # fmt: skip
LR, BETAS, EPS, WEIGHT_DECAY, CLIP = 1e-5, (0.9, 0.95), 1e-8, 0.1, 1.0


def hf_config(name: str, seq_length: int) -> dict:
    return dict(
        SHAPES[name],
        model_type="llama",
        architectures=["LlamaForCausalLM"],
        max_position_embeddings=max(seq_length, 8192),
        tie_word_embeddings=True,
    )


def tokenizer_args(name: str, tokenizer_model: str | None) -> list[str]:
    """Our trainer needs a tokenizer (EOD id, vocabulary check) matching the shape's vocab."""
    if name == "smollm2-135m":
        return ["--tokenizer-type", "HuggingFaceTokenizer",
                "--tokenizer-model", tokenizer_model or str(assets.smollm2_gguf())]  # fmt: skip
    return ["--tokenizer-type", "Llama3Tokenizer",
            "--tokenizer-model", tokenizer_model or str(assets.llama3_tokenizer_model())]  # fmt: skip


def write_random_shard(prefix: str, vocab: int, tokens: int, seed: int = 0) -> None:
    """A real megatron-core shard of random ids (throughput does not depend on token values)."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(seed)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    doc = 8192
    for _ in range(max(1, tokens // doc)):
        builder.add_document(torch.from_numpy(rng.integers(3, vocab, doc, dtype=np.int32)), [doc])
    builder.finalize(prefix + ".idx")


def measure(run_steps, warmup: int, steps: int) -> tuple[float, float]:
    """Wall seconds and this process's CPU seconds of ``steps`` steps after ``warmup``. On a
    shared CPU box the CPU seconds are the steadier figure (other jobs stretch the wall time)."""
    run_steps(warmup)
    platform.synchronize()
    start, cpu = time.perf_counter(), time.process_time()
    run_steps(steps)
    platform.synchronize()
    return time.perf_counter() - start, time.process_time() - cpu


def bench_hf(cfg: dict, args, dtype: torch.dtype) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    dev = platform.device()
    amp = args.hf_precision == "amp" and dtype != torch.float32
    model = LlamaForCausalLM(LlamaConfig(**cfg, attn_implementation="sdpa"))
    model = model.to(dev, torch.float32 if amp else dtype)
    if args.hf_recompute:
        model.gradient_checkpointing_enable()
    step_model = torch.compile(model) if args.hf_compile else model
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, eps=EPS,
                            weight_decay=WEIGHT_DECAY, fused=dev.type == "cuda")  # fmt: skip
    gen = torch.Generator(device="cpu").manual_seed(0)
    batch = torch.randint(3, cfg["vocab_size"], (args.micro_batch_size, args.seq_length + 1),
                          generator=gen).to(dev)  # fmt: skip
    losses = []

    def run(n: int) -> None:
        for _ in range(n):
            with torch.autocast(dev.type, dtype=dtype, enabled=amp):
                out = step_model(input_ids=batch[:, :-1], labels=batch[:, 1:])
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(out.loss.detach())

    seconds, cpu = measure(run, args.warmup, args.steps)
    return {"seconds": seconds, "cpu_seconds": cpu, "last_loss": float(losses[-1])}


def bench_ours(name: str, args, data_dir: str, dtype: torch.dtype) -> dict:
    from megatron_cpt.config import parse_args
    from megatron_cpt.training.trainer import Trainer

    cfg_path = os.path.join(data_dir, "config.json")
    with open(cfg_path, "w") as fh:
        json.dump(hf_config(name, args.seq_length), fh)
    argv = [
        "--model", cfg_path,
        "--data-path", "1.0", os.path.join(data_dir, "random_text_document"),
        "--split", "100,0,0",
        *tokenizer_args(name, args.tokenizer_model),
        "--seq-length", str(args.seq_length),
        "--micro-batch-size", str(args.micro_batch_size),
        "--global-batch-size", str(args.micro_batch_size),
        "--train-iters", str(args.warmup + args.steps),
        "--lr", str(LR), "--adam-beta1", str(BETAS[0]), "--adam-beta2", str(BETAS[1]),
        "--adam-eps", str(EPS), "--weight-decay", str(WEIGHT_DECAY), "--clip-grad", str(CLIP),
        "--attention-backend", args.attention_backend,
        "--log-interval", "1000000",
        "--run-dir", os.path.join(data_dir, "run"),
    ] + (["--bf16"] if dtype == torch.bfloat16 else []) + (
        ["--recompute-activations"] if args.recompute else []
    ) + (["--fp8-format", args.fp8_format] if args.fp8_format else [])  # fmt: skip
    trainer = Trainer(parse_args(argv)).setup()
    losses = []
    seconds, cpu = measure(
        lambda n: losses.extend(trainer.time_steps(n)["losses"]), args.warmup, args.steps
    )
    trainer.close()
    return {"seconds": seconds, "cpu_seconds": cpu, "last_loss": losses[-1]}


def run_side(args) -> None:
    """Child process: one side, one JSON line on stdout."""
    dtype = torch.bfloat16 if platform.supports_bf16() else torch.float32
    platform.reset_peak_memory()
    if args.side == "hf":
        result = bench_hf(hf_config(args.model, args.seq_length), args, dtype)
    else:
        result = bench_ours(args.model, args, args.data_dir, dtype)
    result["peak_memory_bytes"] = platform.peak_memory_bytes()
    print("RESULT " + json.dumps(result), flush=True)


def _child(side: str, data_dir: str) -> dict:
    argv = [a for a in sys.argv[1:]]
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--side", side, "--data-dir", data_dir]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
        raise SystemExit(f"error: the {side} side failed (exit {proc.returncode})")
    return json.loads(lines[-1][len("RESULT ") :])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="llama3.2-1b", choices=sorted(SHAPES))
    p.add_argument("--seq-length", type=int, default=4096)
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=1, help="alternate the sides N times")
    p.add_argument("--recompute", action="store_true", help="ours: --recompute-activations")
    p.add_argument("--attention-backend", default="auto",
                   choices=["auto", "flash", "fused", "unfused", "local"], help="ours")  # fmt: skip
    p.add_argument("--hf-recompute", action="store_true", help="HF: gradient checkpointing")
    p.add_argument("--hf-compile", action="store_true", help="HF: torch.compile the model")
    p.add_argument("--hf-precision", choices=["bf16", "amp"], default="bf16",
                   help="HF on a GPU: pure bf16 weights (default) or fp32 weights + bf16 "
                   "autocast (ours' regime: fp32 main weights)")  # fmt: skip
    p.add_argument("--fp8-format", choices=["e4m3", "hybrid"], default=None, help="ours, TE only")
    p.add_argument("--tokenizer-model", default=None,
                   help="ours: the tokenizer file (default: Llama-3 tokenizer.model from "
                   "llama-models; SmolLM2's GGUF for smollm2-135m)")  # fmt: skip
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--side", choices=["hf", "ours"], help=argparse.SUPPRESS)
    p.add_argument("--data-dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.side:
        return run_side(args)

    dtype = torch.bfloat16 if platform.supports_bf16() else torch.float32
    arch = from_hf_config(hf_config(args.model, args.seq_length))
    tokens_per_step = args.micro_batch_size * args.seq_length
    flops_step = training_flops_per_step(
        arch, args.seq_length, args.micro_batch_size, padded_vocab_size(arch.vocab_size)
    )
    peak = platform.peak_flops_per_device(dtype)
    sides = ["ours"] if args.skip_hf else ["hf", "ours"]
    runs: dict[str, list[dict]] = {side: [] for side in sides}
    with tempfile.TemporaryDirectory() as data_dir:
        write_random_shard(
            os.path.join(data_dir, "random_text_document"),
            arch.vocab_size,
            tokens_per_step * (args.warmup + args.steps + 2) + 8192,
        )
        for _ in range(args.repeats):
            for side in sides:
                runs[side].append(_child(side, data_dir))

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"model {args.model} ({arch.num_parameters() / 1e9:.3f}B), seq {args.seq_length}, "
          f"micro-batch {args.micro_batch_size}, {dtype}, {device}, "
          f"FLOPs/step {flops_step:.3e}, attention (ours) {args.attention_backend}, "
          f"{args.repeats} repeat(s), peak memory = {platform.memory_kind()}")  # fmt: skip
    results = {}
    for side, reps in runs.items():
        for r in reps:
            r["tokens_per_s"] = tokens_per_step * args.steps / r["seconds"]
            r["tokens_per_cpu_s"] = tokens_per_step * args.steps / r["cpu_seconds"]
        tps = statistics.median(r["tokens_per_s"] for r in reps)
        tflops = tps * flops_step / tokens_per_step / 1e12
        r = results[side] = dict(
            tokens_per_s=tps,
            tflops=tflops,
            mfu=(tflops * 1e12 / peak) if peak else None,
            peak_memory_gib=max(x["peak_memory_bytes"] for x in reps) / 2**30,
            last_loss=reps[-1]["last_loss"],
            tokens_per_cpu_s=statistics.median(x["tokens_per_cpu_s"] for x in reps),
            runs_tokens_per_s=[x["tokens_per_s"] for x in reps],
        )
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        print(f"{side:>5}: {tps:12.1f} tokens/s  {tflops:8.3f} TFLOP/s  MFU {mfu}  "
              f"peak memory {r['peak_memory_gib']:.2f} GiB  ({r['tokens_per_cpu_s']:.1f} tokens/CPU-s)")  # fmt: skip
    if "hf" in results:
        pairs = [o["tokens_per_s"] / h["tokens_per_s"] for o, h in zip(runs["ours"], runs["hf"])]
        results["ratio"] = statistics.median(pairs)
        results["ratio_per_cpu_s"] = (
            results["ours"]["tokens_per_cpu_s"] / results["hf"]["tokens_per_cpu_s"]
        )
        print(f"ratio ours/hf: {results['ratio']:.3f}  (per repeat: "
              f"{', '.join(f'{x:.3f}' for x in pairs)}; per CPU-second: "
              f"{results['ratio_per_cpu_s']:.3f})")  # fmt: skip
    print(json.dumps({"model": args.model, "device": device, "dtype": str(dtype),
                      "seq_length": args.seq_length, "micro_batch_size": args.micro_batch_size,
                      "attention_backend": args.attention_backend, **results}))  # fmt: skip


if __name__ == "__main__":
    main()
