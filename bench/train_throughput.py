#!/usr/bin/env python
"""Training throughput of our megatron-core trainer vs a plain HF Transformers + PyTorch loop.

Same model shape, same batch (micro-batch × sequence length), same precision, same process:
each side runs ``--warmup`` steps, then ``--steps`` timed steps (synchronised), and the script
prints tokens/s, TFLOP/s, MFU for each and the ratio ours/HF. FLOPs use the exact Llama formula
in ``megatron_cpt/flops.py`` (matmuls incl. LM head and full-square attention, ×3 for training).

    python bench/train_throughput.py --model llama3.2-1b --seq-length 4096 --micro-batch-size 2
    python bench/train_throughput.py --model tiny --seq-length 64 --steps 2      # CPU smoke run

The HF loop is the strongest plain one we know: bf16 weights + autocast-free bf16 compute,
``attn_implementation="sdpa"`` (flash/cuDNN kernels on H100), fused AdamW, no gradient
accumulation, optional ``torch.compile`` (``--hf-compile``). Data are random token ids written
as a real megatron-core indexed shard, so our side runs its full data pipeline.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
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

# Llama-3.2-1B / -3B shapes (Llama-3 tokenizer, GQA 8 groups, tied embeddings); "tiny" for CPU.
SHAPES = {
    "llama3.2-1b": dict(num_hidden_layers=16, hidden_size=2048, intermediate_size=8192,
                        num_attention_heads=32, num_key_value_heads=8),
    "llama3.2-3b": dict(num_hidden_layers=28, hidden_size=3072, intermediate_size=8192,
                        num_attention_heads=24, num_key_value_heads=8),
    "tiny": dict(num_hidden_layers=2, hidden_size=64, intermediate_size=176,
                 num_attention_heads=4, num_key_value_heads=2),
}  # fmt: skip


def hf_config(name: str, seq_length: int) -> dict:
    return dict(
        SHAPES[name],
        model_type="llama",
        architectures=["LlamaForCausalLM"],
        vocab_size=128256,
        max_position_embeddings=max(seq_length, 8192),
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=128000,
        eos_token_id=128001,
    )


def write_random_shard(prefix: str, vocab: int, tokens: int, seed: int = 0) -> None:
    """A real megatron-core shard of random ids (throughput does not depend on token values)."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(seed)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    doc = 8192
    for _ in range(max(1, tokens // doc)):
        builder.add_document(torch.from_numpy(rng.integers(0, vocab, doc, dtype=np.int32)), [doc])
    builder.finalize(prefix + ".idx")


def measure(run_steps, warmup: int, steps: int) -> float:
    run_steps(warmup)
    platform.synchronize()
    start = time.perf_counter()
    run_steps(steps)
    platform.synchronize()
    return time.perf_counter() - start


def bench_hf(cfg: dict, args, dtype: torch.dtype) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    dev = platform.device()
    model = LlamaForCausalLM(LlamaConfig(**cfg, attn_implementation="sdpa")).to(dev, dtype)
    if args.hf_recompute:
        model.gradient_checkpointing_enable()
    step_model = torch.compile(model) if args.hf_compile else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=dev.type == "cuda")
    gen = torch.Generator(device="cpu").manual_seed(0)
    batch = torch.randint(0, cfg["vocab_size"], (args.micro_batch_size, args.seq_length + 1),
                          generator=gen).to(dev)  # fmt: skip

    def run(n: int) -> None:
        for _ in range(n):
            out = step_model(input_ids=batch[:, :-1], labels=batch[:, 1:])
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

    return {"seconds": measure(run, args.warmup, args.steps)}  # model freed on return


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
        "--tokenizer-type", "Llama3Tokenizer",
        "--tokenizer-model", str(assets.llama3_tokenizer_model()),
        "--seq-length", str(args.seq_length),
        "--micro-batch-size", str(args.micro_batch_size),
        "--global-batch-size", str(args.micro_batch_size),
        "--train-iters", str(args.warmup + args.steps),
        "--lr", "1e-5",
        "--log-interval", "1000000",
    ] + (["--bf16"] if dtype == torch.bfloat16 else []) + (
        ["--recompute-activations"] if args.recompute else []
    ) + (["--fp8-format", args.fp8_format] if args.fp8_format else [])  # fmt: skip
    trainer = Trainer(parse_args(argv)).setup()
    seconds = measure(trainer.time_steps, args.warmup, args.steps)
    trainer.close()
    return {"seconds": seconds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="llama3.2-1b", choices=sorted(SHAPES))
    p.add_argument("--seq-length", type=int, default=4096)
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--recompute", action="store_true", help="ours: --recompute-activations")
    p.add_argument("--hf-recompute", action="store_true", help="HF: gradient checkpointing")
    p.add_argument("--hf-compile", action="store_true", help="HF: torch.compile the model")
    p.add_argument("--fp8-format", choices=["e4m3", "hybrid"], default=None, help="ours, TE only")
    p.add_argument("--skip-hf", action="store_true")
    args = p.parse_args()

    dtype = torch.bfloat16 if platform.supports_bf16() else torch.float32
    arch = from_hf_config(hf_config(args.model, args.seq_length))
    tokens_per_step = args.micro_batch_size * args.seq_length
    flops_step = training_flops_per_step(
        arch, args.seq_length, args.micro_batch_size, padded_vocab_size(arch.vocab_size)
    )
    peak = platform.peak_flops_per_device(dtype)
    results = {}
    with tempfile.TemporaryDirectory() as data_dir:
        write_random_shard(
            os.path.join(data_dir, "random_text_document"),
            arch.vocab_size,
            tokens_per_step * (args.warmup + args.steps + 2) + 8192,
        )
        if not args.skip_hf:
            results["hf"] = bench_hf(hf_config(args.model, args.seq_length), args, dtype)
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        results["ours"] = bench_ours(args.model, args, data_dir, dtype)

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"model {args.model} ({arch.num_parameters() / 1e9:.2f}B), seq {args.seq_length}, "
          f"micro-batch {args.micro_batch_size}, {dtype}, {device}, "
          f"FLOPs/step {flops_step:.3e}")  # fmt: skip
    for side, r in results.items():
        tps = tokens_per_step * args.steps / r["seconds"]
        tflops = flops_step * args.steps / r["seconds"] / 1e12
        r.update(tokens_per_s=tps, tflops=tflops, mfu=(tflops * 1e12 / peak) if peak else None)
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        print(f"{side:>5}: {tps:12.1f} tokens/s  {tflops:8.3f} TFLOP/s  MFU {mfu}")
    if "hf" in results:
        ratio = results["ours"]["tokens_per_s"] / results["hf"]["tokens_per_s"]
        print(f"ratio ours/hf: {ratio:.3f}")
    print(json.dumps({"model": args.model, "device": device, "dtype": str(dtype), **results}))


if __name__ == "__main__":
    main()
