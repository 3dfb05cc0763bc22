#!/usr/bin/env python
"""Merge time and peak RSS: megatron_cpt.merge vs mergekit, same checkpoints, same YAML.

Each merge runs in its own subprocess; wall time and that child's ``ru_maxrss`` (from
``os.wait4``) are recorded. Linux carries a process's RSS high-water mark across ``exec``, so a
child's ``ru_maxrss`` is at least its parent's peak at spawn time: this parent therefore never
imports torch (checkpoint generation and output comparison run in subprocesses too), and the
numbers are ours and mergekit's side by side in the same command, and the outputs
are compared element by element. Inputs are random Llama checkpoints of a chosen size (bf16),
generated once into ``--workdir`` and reused: a base and one "CPT" model (base + small noise),
the Llama-3-SEC shape of the problem.

    python bench/merge.py --size 1b --methods ties,task_arithmetic,slerp   # ~1.2B params
    python bench/merge.py --size tiny                                     # seconds, smoke run
    python bench/merge.py --trim 20000000        # TIES threshold: radix select vs sort, alone
    python bench/merge.py --size 200m --methods ties --floor   # + the read-once/write-once floor
    python bench/merge.py --size 200m --methods ties --floor --pytorch-kernel
        # + ours with the native TIES kernel switched off, compared with the native output
    MERGE_PROFILE=1 python bench/merge.py ...    # each child prints its cProfile top entries
    python bench/merge.py --size 1b --methods task_arithmetic --megatron
        # ours on Megatron checkpoints (converted from the same inputs) vs ours on HF: the
        # Megatron output is exported and compared with the HF output
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

SIZES = {
    # Llama-3.2-1B's shape: 1.24B parameters, tied embeddings, vocab 128256.
    "1b": dict(hidden=2048, ffn=8192, layers=16, heads=32, kv=8, vocab=128256, tied=True),
    "200m": dict(hidden=1024, ffn=4096, layers=12, heads=16, kv=8, vocab=32768, tied=True),
    "tiny": dict(hidden=256, ffn=768, layers=4, heads=8, kv=4, vocab=8192, tied=False),
}
METHOD_PARAMS = {
    "ties": {"weight": 1.0, "density": 0.5},
    "dare_ties": {"weight": 1.0, "density": 0.5},
    "dare_linear": {"weight": 1.0, "density": 0.5},
    "task_arithmetic": {"weight": 0.7},
    "linear": {"weight": 0.5},
    "breadcrumbs_ties": {"weight": 1.0, "density": 0.5, "gamma": 0.01},
    "della": {"weight": 1.0, "density": 0.5, "epsilon": 0.1},
    "sce": {},
    "nearswap": {},
}
SHARED_PARAMS = {"nearswap": {"t": 0.001}, "sce": {"select_topk": 0.5}}
RANDOM_METHODS = {"dare_ties", "dare_linear", "della", "della_linear"}


def make_checkpoints(workdir: Path, size: str) -> tuple[Path, Path]:
    """Random bf16 base and base+noise 'CPT' model, streamed to disk one tensor at a time."""
    import torch

    from megatron_cpt.safetensors_io import StreamingSafetensorsWriter, TensorInfo

    s = SIZES[size]
    head_dim = s["hidden"] // s["heads"]
    shapes = {"model.embed_tokens.weight": (s["vocab"], s["hidden"])}
    for i in range(s["layers"]):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (s["hidden"],),
            p + "self_attn.q_proj.weight": (s["hidden"], s["hidden"]),
            p + "self_attn.k_proj.weight": (s["kv"] * head_dim, s["hidden"]),
            p + "self_attn.v_proj.weight": (s["kv"] * head_dim, s["hidden"]),
            p + "self_attn.o_proj.weight": (s["hidden"], s["hidden"]),
            p + "post_attention_layernorm.weight": (s["hidden"],),
            p + "mlp.gate_proj.weight": (s["ffn"], s["hidden"]),
            p + "mlp.up_proj.weight": (s["ffn"], s["hidden"]),
            p + "mlp.down_proj.weight": (s["hidden"], s["ffn"]),
        }
    shapes["model.norm.weight"] = (s["hidden"],)
    if not s["tied"]:
        shapes["lm_head.weight"] = (s["vocab"], s["hidden"])
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": s["hidden"],
        "intermediate_size": s["ffn"],
        "num_hidden_layers": s["layers"],
        "num_attention_heads": s["heads"],
        "num_key_value_heads": s["kv"],
        "head_dim": head_dim,
        "vocab_size": s["vocab"],
        "tie_word_embeddings": s["tied"],
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "max_position_embeddings": 2048,
        "dtype": "bfloat16",
    }
    dirs = workdir / f"{size}-base", workdir / f"{size}-cpt"
    if all((d / "config.json").exists() for d in dirs):
        return dirs
    infos = [TensorInfo(n, torch.bfloat16, shape) for n, shape in shapes.items()]
    writers = []
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        writers.append(StreamingSafetensorsWriter(d, infos, 2 * 10**9))
    g = torch.Generator().manual_seed(0)
    for info in infos:
        base = torch.randn(info.shape, generator=g) * 0.02
        if info.name.endswith("layernorm.weight") or info.name.endswith("norm.weight"):
            base += 1
        writers[0].write(info.name, base.to(torch.bfloat16))
        cpt = base + torch.randn(info.shape, generator=g) * 0.002
        writers[1].write(info.name, cpt.to(torch.bfloat16))
        del base, cpt
    for d, w in zip(dirs, writers):
        w.close()
        (d / "config.json").write_text(json.dumps(config, indent=2))
    return dirs


def recipe(method: str, base: Path, cpt: Path) -> dict:
    if method == "slerp":
        return {
            "merge_method": "slerp",
            "base_model": str(base),
            "models": [{"model": str(base)}, {"model": str(cpt)}],
            "parameters": {"t": 0.5},
        }
    models = [{"model": str(cpt), "parameters": METHOD_PARAMS[method]}]
    if method == "linear":
        models.insert(0, {"model": str(base), "parameters": METHOD_PARAMS[method]})
        return {"merge_method": "linear", "models": models}
    out = {"merge_method": method, "base_model": str(base), "models": models}
    if method in SHARED_PARAMS:
        out["parameters"] = SHARED_PARAMS[method]
    return out


def floor_copy(raw: dict, out: str) -> None:
    """The I/O floor of a two-input merge: read every tensor of every input once (the same
    positioned reads the merge uses) and write one output of the base's size (the same streaming
    writer), with no arithmetic."""
    from megatron_cpt.safetensors_io import SafetensorsCheckpoint, StreamingSafetensorsWriter

    paths = [raw["base_model"]] + [
        m["model"] for m in raw["models"] if m["model"] != raw["base_model"]
    ]
    inputs = [SafetensorsCheckpoint(Path(p)) for p in paths]
    base = inputs[0]
    out_dir = Path(out)
    out_dir.mkdir(parents=True)
    plan = [base.info(n) for n in base.names]
    writer = StreamingSafetensorsWriter(out_dir, plan, 5 * 10**9)
    for info in plan:
        tensors = [ckpt.get(info.name) for ckpt in inputs]
        writer.write(info.name, tensors[0])
        del tensors
    writer.close()


def child(impl: str, config_path: str, out: str) -> None:
    """Runs inside the measured subprocess (``MERGE_PROFILE=1``: cProfile's top entries)."""
    import yaml

    raw = yaml.safe_load(Path(config_path).read_text())
    if os.environ.get("MERGE_PROFILE"):
        import cProfile
        import pstats

        profiler = cProfile.Profile()
        profiler.enable()
        try:
            _child(impl, raw, out)
        finally:
            profiler.disable()
            pstats.Stats(profiler, stream=sys.stderr).sort_stats("tottime").print_stats(12)
        return
    _child(impl, raw, out)


def _child(impl: str, raw: dict, out: str) -> None:
    if impl == "floor":
        floor_copy(raw, out)
    elif impl == "ours":
        from megatron_cpt.merge import MergeOptions, merge_checkpoints, parse_config

        merge_checkpoints(parse_config(raw), out, MergeOptions(progress=False, random_seed=0))
    else:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import logging

        from mergekit.config import MergeConfiguration
        from mergekit.merge import MergeOptions, run_merge

        logging.disable(logging.WARNING)
        run_merge(
            MergeConfiguration.model_validate(raw), out, MergeOptions(quiet=True, random_seed=0)
        )


def _env() -> dict:
    return os.environ | {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}


def measure(impl: str, config_path: Path, out: Path, env: dict | None = None):
    """(seconds, peak RSS GiB) of one merge in a fresh process."""
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, __file__, "--child", impl, str(config_path), str(out)],
        env=_env() | (env or {}),
    )
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{impl} merge failed with exit code {proc.returncode}")
    return seconds, usage.ru_maxrss / 2**20  # Linux reports KiB


def compare(a: Path, b: Path) -> str:
    """'identical', or the share of elements that differ (and the largest difference)."""

    from megatron_cpt.safetensors_io import SafetensorsCheckpoint

    x, y = SafetensorsCheckpoint(a), SafetensorsCheckpoint(b)
    if set(x.names) != set(y.names):
        return f"different tensor names: {sorted(set(x.names) ^ set(y.names))[:3]}"
    differing = total = 0
    worst = 0.0
    for name in x.names:
        p, q = x.get(name), y.get(name)
        if p.dtype != q.dtype:
            return f"dtype differs for {name}: {p.dtype} vs {q.dtype}"
        diff = p != q
        differing += int(diff.sum())
        total += p.numel()
        if diff.any():
            worst = max(worst, float((p.float() - q.float()).abs().max()))
    if differing == 0:
        return "identical"
    return f"{differing / total:.2e} of elements differ (max |diff| {worst:.2e})"


def trim_microbench(numel: int, density: float = 0.5) -> None:
    """TIES's threshold search on one tensor: radix select (ours) vs kthvalue vs mergekit's
    full argsort, same input, same process."""
    import torch

    from megatron_cpt.merge.methods import kth_largest_magnitude

    w = torch.randn(numel, generator=torch.Generator().manual_seed(0)).abs()
    k = max(1, int(density * numel))
    timings = {}
    start = time.perf_counter()
    ours = kth_largest_magnitude(w, k)
    timings["radix select (ours)"] = time.perf_counter() - start
    start = time.perf_counter()
    kth = torch.kthvalue(w, numel - k + 1).values
    timings["torch.kthvalue"] = time.perf_counter() - start
    start = time.perf_counter()
    by_sort = w[torch.argsort(w, descending=True)[k - 1]]
    timings["argsort (mergekit)"] = time.perf_counter() - start
    assert ours.item() == kth.item() == by_sort.item()
    print(
        f"threshold of {numel:,} magnitudes at density {density} ({torch.get_num_threads()} threads)"
    )
    for name, seconds in timings.items():
        ratio = seconds / timings["radix select (ours)"]
        print(f"  {name:<22}{seconds:8.3f} s  {ratio:6.1f}x")


def compare_in_child(a: Path, b: Path) -> str:
    """:func:`compare` in a subprocess, so this parent never imports torch."""
    return subprocess.run(
        [sys.executable, __file__, "--compare", str(a), str(b)],
        check=True,
        env=_env(),
        capture_output=True,
        text=True,
    ).stdout.strip()


def _tool(*argv: str) -> None:
    tool = Path(__file__).resolve().parents[1] / "tools" / "convert_checkpoint.py"
    subprocess.run([sys.executable, str(tool), *argv], check=True, env=_env(), capture_output=True)


def megatron_rows(args, workdir: Path, base: Path, cpt: Path) -> None:
    """Ours on Megatron inputs/outputs vs ours on HF, same recipe; outputs compared after
    exporting the Megatron merge to HF."""
    import yaml

    mc = {}
    for hf in (base, cpt):
        mc[hf] = workdir / f"{hf.name}-mcore"
        if not (mc[hf] / "latest_checkpointed_iteration.txt").exists():
            shutil.rmtree(mc[hf], ignore_errors=True)
            _tool("hf-to-mcore", "--hf", str(hf), "--out", str(mc[hf]))
    print(
        f"{'method':<16}{'HF s':>8}{'Megatron s':>12}{'HF GiB':>9}{'Megatron GiB':>14}  "
        "Megatron output exported vs HF output"
    )
    for method in args.methods.split(","):
        runs = {}
        for kind, (b, c) in {"hf": (base, cpt), "mc": (mc[base], mc[cpt])}.items():
            config_path = workdir / f"{method}-{kind}.yml"
            config_path.write_text(yaml.safe_dump(recipe(method, b, c)))
            runs[kind] = measure("ours", config_path, workdir / f"out-{kind}-{method}")
        exported = workdir / f"out-mc-{method}-hf"
        shutil.rmtree(exported, ignore_errors=True)
        _tool("mcore-to-hf", "--load", str(workdir / f"out-mc-{method}"), "--out", str(exported))
        same = compare_in_child(exported, workdir / f"out-hf-{method}")
        (hf_t, hf_m), (mc_t, mc_m) = runs["hf"], runs["mc"]
        print(f"{method:<16}{hf_t:>8.1f}{mc_t:>12.1f}{hf_m:>9.2f}{mc_m:>14.2f}  {same}", flush=True)
        if not args.keep:
            for d in (exported, workdir / f"out-hf-{method}", workdir / f"out-mc-{method}"):
                shutil.rmtree(d, ignore_errors=True)


def print_row(label, seconds, gib, mk_seconds, mk_gib, floor_seconds, note) -> None:
    """One table row: ours against mergekit (and against the floor when it was measured)."""
    print(
        f"{label:<16}{seconds:>9.1f}{mk_seconds:>12.1f}{mk_seconds / seconds:>8.2f}x{gib:>10.2f}"
        f"{mk_gib:>14.2f}{mk_gib / gib:>10.2f}x"
        + (f"{seconds / floor_seconds:>10.2f}x" if floor_seconds is not None else "")
        + f"  {note}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--methods", default="ties,dare_ties,task_arithmetic,linear,slerp")
    parser.add_argument("--workdir", default="/tmp/megatron_cpt_bench_merge")
    parser.add_argument("--keep", action="store_true", help="keep checkpoints and outputs")
    parser.add_argument(
        "--trim", type=int, metavar="N", help="only time the TIES threshold on N values"
    )
    parser.add_argument(
        "--megatron",
        action="store_true",
        help="merge Megatron conversions of the inputs, side by side with the HF merge",
    )
    parser.add_argument(
        "--floor",
        action="store_true",
        help="also time the I/O floor: read the inputs and write one output, no arithmetic",
    )
    parser.add_argument(
        "--pytorch-kernel",
        action="store_true",
        help="for ties, also time ours with the native kernel switched off (MEGATRON_CPT_NATIVE=0)",
    )
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--make", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--compare", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    if args.make:
        make_checkpoints(Path(args.make[0]), args.make[1])
        return
    if args.compare:
        print(compare(Path(args.compare[0]), Path(args.compare[1])))
        return
    if args.trim:
        trim_microbench(args.trim)
        return
    import yaml

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, __file__, "--make", str(workdir), args.size], check=True, env=_env()
    )
    base, cpt = workdir / f"{args.size}-base", workdir / f"{args.size}-cpt"
    size_gb = sum(f.stat().st_size for f in base.glob("*.safetensors")) / 1e9
    print(
        f"inputs: 2 x {size_gb:.2f} GB bf16 ({args.size}), ready in {time.perf_counter() - start:.0f} s"
    )
    if args.megatron:
        megatron_rows(args, workdir, base, cpt)
        return
    if args.floor:
        config_path = workdir / "floor.yml"
        config_path.write_text(yaml.safe_dump(recipe("task_arithmetic", base, cpt)))
        floor_t, floor_m = measure("floor", config_path, workdir / "out-floor")
        shutil.rmtree(workdir / "out-floor", ignore_errors=True)
        print(f"I/O floor (read both inputs, write one output, no arithmetic): "
              f"{floor_t:.1f} s, {floor_m:.2f} GiB")  # fmt: skip
    print(
        f"{'method':<16}{'ours s':>9}{'mergekit s':>12}{'speedup':>9}{'ours GiB':>10}"
        f"{'mergekit GiB':>14}{'RSS ratio':>11}"
        + ("  ours/floor" if args.floor else "")
        + "  outputs"
    )
    for method in args.methods.split(","):
        config_path = workdir / f"{method}.yml"
        config_path.write_text(yaml.safe_dump(recipe(method, base, cpt)))
        ours_t, ours_m = measure("ours", config_path, workdir / f"out-ours-{method}")
        mk_t, mk_m = measure("mergekit", config_path, workdir / f"out-mergekit-{method}")
        if method in RANDOM_METHODS:
            same = "n/a (each draws its own random masks)"
        else:
            same = compare_in_child(
                workdir / f"out-ours-{method}", workdir / f"out-mergekit-{method}"
            )
        floor = floor_t if args.floor else None
        print_row(method, ours_t, ours_m, mk_t, mk_m, floor, same)
        if args.pytorch_kernel and method == "ties":
            # the same merge with the native TIES kernel switched off (megatron_cpt/merge/native.py)
            out = workdir / "out-ours-pytorch-kernel"
            py_t, py_m = measure("ours", config_path, out, {"MEGATRON_CPT_NATIVE": "0"})
            same = compare_in_child(out, workdir / f"out-ours-{method}")
            shutil.rmtree(out, ignore_errors=True)
            print_row(
                "  PyTorch kernel", py_t, py_m, mk_t, mk_m, floor, f"vs native kernel: {same}"
            )
        if not args.keep:
            for impl in ("ours", "mergekit"):
                shutil.rmtree(workdir / f"out-{impl}-{method}", ignore_errors=True)
    if not args.keep:
        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(cpt, ignore_errors=True)


if __name__ == "__main__":
    main()
