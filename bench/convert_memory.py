#!/usr/bin/env python
"""Peak memory of HF <-> Megatron conversion for a ~1B-parameter Llama, against the model size
and against the naive route (transformers loads the whole model, then saves it).

Each step runs in its own process and its peak RSS is read from the kernel (``wait4``), so the
numbers include everything: Python, torch, megatron-core, the checkpoint I/O. An "imports only"
process is measured too, so the conversion's own footprint (peak - idle) can be read off. The
parent stays tiny (no torch import, the random model is generated in a child) because Linux
carries a process's RSS high-water mark across ``exec`` into the child's ``ru_maxrss``.

  python bench/convert_memory.py [--dtype bfloat16] [--layers 16] [--workdir /tmp/convbench]
  python bench/convert_memory.py --source gguf    # the same model as a Q8_0 GGUF file

``--source gguf`` writes the random model as a llama.cpp-style Q8_0 GGUF (``tests/gguf_files.py``)
and measures ``hf-to-mcore`` from it against transformers' own GGUF load
(``from_pretrained(gguf_file=)``, which dequantizes the whole model to float32: what the
import did before it streamed GGUF).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # for the --generate-only child; the parent never imports torch

# Llama-3.2-1B's shapes (hidden 2048, 16 layers, GQA 32/8, ffn 8192, 128k vocab, tied).
CONFIG = dict(
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128256,
    max_position_embeddings=8192,
    rope_theta=500000.0,
    tie_word_embeddings=True,
)


def write_random_hf(out: Path, config: dict, dtype_name: str, shard_bytes: int) -> int:
    """A random Llama as sharded safetensors, written a layer at a time (so the generator itself
    stays small). Returns the model's size in bytes."""
    import torch
    from transformers import LlamaConfig

    from megatron_cpt.convert.layout import tensor_layout
    from megatron_cpt.convert.mapping import expected_hf_shapes
    from megatron_cpt.model import from_hf_config
    from megatron_cpt.safetensors_io import StreamingSafetensorsWriter, TensorInfo

    dtype = getattr(torch, dtype_name)
    hf_config = LlamaConfig(**config, dtype=dtype_name)
    arch = from_hf_config(hf_config)
    shapes = expected_hf_shapes(tensor_layout(arch, arch.vocab_size))
    out.mkdir(parents=True, exist_ok=True)
    writer = StreamingSafetensorsWriter(
        out, [TensorInfo(n, dtype, s) for n, s in shapes.items()], shard_bytes
    )
    gen = torch.Generator().manual_seed(0)
    total = 0
    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            t = torch.ones(shape, dtype=dtype)
        else:
            t = (torch.randn(shape, generator=gen) * 0.02).to(dtype)
        total += t.numel() * t.element_size()
        writer.write(name, t)
    writer.close()
    hf_config.save_pretrained(out)
    return total


def write_random_gguf(hf_dir: Path, out: Path) -> None:
    """The safetensors model of ``hf_dir`` as a Q8_0 GGUF, read a tensor at a time."""
    from safetensors import safe_open
    from transformers import AutoConfig

    from tests.gguf_files import write_llama_gguf

    config = AutoConfig.from_pretrained(hf_dir)
    handles = [safe_open(f, framework="pt") for f in sorted(hf_dir.glob("*.safetensors"))]
    tensors = ((name, h.get_tensor(name)) for h in handles for name in h.keys())
    write_llama_gguf(config, tensors, out, "Q8_0")


def measure(cmd: list[str]) -> tuple[float, float]:
    """(peak RSS in GiB, seconds) of one child process."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    start = time.time()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.time() - start
    if os.waitstatus_to_exitcode(status) != 0:
        err = proc.stderr.read().decode(errors="replace")[-3000:]
        raise SystemExit(f"{' '.join(cmd[:4])}... failed:\n{err}")
    return usage.ru_maxrss / 1024**2, seconds  # ru_maxrss is KiB on Linux


def run_rows(rows, baseline: str, size_gib: float, size_label: str) -> dict:
    """Measure each (label, command) and print peak, peak - idle, and its ratios to the
    model size and to the baseline row's own memory."""
    results = {}
    for label, cmd in rows:
        results[label] = measure(cmd)
        print(f"  measured {label}: peak {results[label][0]:.2f} GiB in {results[label][1]:.0f}s")
    idle = results["imports only (idle)"][0]
    base = results[baseline][0] - idle
    width = max(len(label) for label, _ in rows)
    print(
        f"{'step':{width}s} {'peak RSS':>9s} {'peak-idle':>10s} {size_label:>12s} "
        f"{'/baseline':>10s} {'time':>6s}"
    )
    for label, (peak, secs) in results.items():
        own = peak - idle
        print(
            f"{label:{width}s} {peak:8.2f}G {own:9.2f}G {own / size_gib:12.2f} "
            f"{own / base:10.2f} {secs:5.0f}s"
        )
    return results


IDLE = (
    "import torch, transformers, megatron.core, megatron_cpt.convert.importer, "
    "megatron_cpt.convert.exporter"
)
NAIVE_GGUF = """
import sys, torch
from pathlib import Path
from transformers import AutoModelForCausalLM
p = Path(sys.argv[1])
m = AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, dtype=torch.float32)
"""
NAIVE = """
import sys, torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype="auto")
m.save_pretrained(sys.argv[2])
"""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--layers", type=int, default=CONFIG["num_hidden_layers"])
    p.add_argument("--workdir", default="/tmp/convert_memory_bench")
    p.add_argument("--shard-size-gb", type=float, default=2.0, help="source and export shards")
    p.add_argument("--source", choices=["safetensors", "gguf"], default="safetensors")
    p.add_argument("--keep", action="store_true", help="keep the workdir")
    p.add_argument("--generate-only", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    work = Path(args.workdir)
    config = dict(CONFIG, num_hidden_layers=args.layers)
    shard_bytes = int(args.shard_size_gb * 1024**3)
    if args.generate_only:
        model_bytes = write_random_hf(work / "hf", config, args.dtype, shard_bytes)
        (work / "model_bytes").write_text(str(model_bytes))
        if args.source == "gguf":
            write_random_gguf(work / "hf", work / "model.Q8_0.gguf")
        return 0
    shutil.rmtree(work, ignore_errors=True)
    generate = [
        sys.executable, __file__, "--generate-only", "--workdir", str(work), "--dtype",
        args.dtype, "--layers", str(args.layers), "--shard-size-gb", str(args.shard_size_gb),
        "--source", args.source,
    ]  # fmt: skip
    measure(generate)
    model_bytes = int((work / "model_bytes").read_text())
    model_gib = model_bytes / 1024**3
    n_shards = len(list((work / "hf").glob("*.safetensors")))
    tool = [sys.executable, str(REPO / "tools" / "convert_checkpoint.py")]
    if args.source == "gguf":
        return _bench_gguf(args, work, tool, model_bytes)
    rows = [
        ("imports only (idle)", [sys.executable, "-c", IDLE]),
        (
            "hf-to-mcore (ours)",
            [*tool, "hf-to-mcore", "--hf", str(work / "hf"), "--out", str(work / "mcore")],
        ),
        (
            "mcore-to-hf (ours)",
            [
                *tool,
                "mcore-to-hf",
                "--load",
                str(work / "mcore"),
                "--out",
                str(work / "hf_out"),
                "--max-shard-size-gb",
                str(args.shard_size_gb),
            ],
        ),  # fmt: skip
        (
            "mcore-to-hf (ours, 0.5 GiB shards)",
            [
                *tool,
                "mcore-to-hf",
                "--load",
                str(work / "mcore"),
                "--out",
                str(work / "hf_out_small"),
                "--max-shard-size-gb",
                "0.5",
            ],
        ),  # fmt: skip
        (
            "naive: transformers load+save",
            [sys.executable, "-c", NAIVE, str(work / "hf"), str(work / "naive")],
        ),
    ]
    params = model_bytes / (2 if args.dtype == "bfloat16" else 4)
    print(
        f"model: {args.layers} layers, {params / 1e9:.2f}B params, {args.dtype}, "
        f"{model_gib:.2f} GiB in {n_shards} safetensors shard(s)"
    )
    results = run_rows(rows, "naive: transformers load+save", model_gib, "/model")
    h, f = config["hidden_size"], config["intermediate_size"]
    kv = h * config["num_key_value_heads"] // config["num_attention_heads"]
    layer = h * (2 * h + 2 * kv) + 3 * h * f
    largest = max(config["vocab_size"] * h, layer) * model_bytes / params
    print(
        f"largest group (embedding or one layer): {largest / 1024**3:.2f} GiB; "
        f"export shard limit: {args.shard_size_gb:.2f} GiB"
    )
    (work / "results.json").write_text(json.dumps({"model_gib": model_gib, "steps": results}))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def _bench_gguf(args, work: Path, tool: list[str], model_bytes: int) -> int:
    """GGUF import: ours (a tensor at a time) vs transformers dequantizing the whole file."""
    gguf = work / "model.Q8_0.gguf"
    params = model_bytes / (2 if args.dtype == "bfloat16" else 4)
    fp32_gib = params * 4 / 1024**3
    print(
        f"model: {args.layers} layers, {params / 1e9:.2f}B params as Q8_0 GGUF "
        f"({gguf.stat().st_size / 1024**3:.2f} GiB); dequantized float32 {fp32_gib:.2f} GiB"
    )
    rows = [
        ("imports only (idle)", [sys.executable, "-c", IDLE]),
        (
            "hf-to-mcore from GGUF (ours)",
            [*tool, "hf-to-mcore", "--hf", str(gguf), "--out", str(work / "mcore")],
        ),
        (
            "hf-to-mcore from GGUF --dtype bfloat16",
            [
                *tool,
                "hf-to-mcore",
                "--hf",
                str(gguf),
                "--out",
                str(work / "mcore_bf16"),
                "--dtype",
                "bfloat16",
            ],
        ),  # fmt: skip
        ("baseline: transformers GGUF load", [sys.executable, "-c", NAIVE_GGUF, str(gguf)]),
    ]
    results = run_rows(rows, "baseline: transformers GGUF load", fp32_gib, "/fp32 model")
    (work / "results.json").write_text(json.dumps({"fp32_gib": fp32_gib, "steps": results}))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
