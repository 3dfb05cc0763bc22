#!/usr/bin/env python
"""The one-shot GPU check's steps (``bench/gpu_check.sh`` installs the wheels, then runs this).

Each step is a child process with its own time box, so a failure or a hang in one step costs
at most its box and the next step still runs; on a GPU the boxes sum to the 8-minute budget
(less what the install took). Everything a step prints goes to ``OUT/gpu_check.log``;
``OUT/results.json`` gets one record per step (status ok / failed / timeout, seconds, and the
step's measured values), rewritten after every step so that a killed run still leaves one.

Steps, in order of value:
  1. import torch / megatron-core / megatron_cpt and report the device;
  2. tiny Llama, bf16, 5 steps through tools/pretrain.py: finite losses;
  3. tiny Llama, bf16, distributed optimizer: save at 2, resume, iterations 3-4 bit-identical
     to the uninterrupted run;
  4. Llama-3.2-1B shape, seq 4096: ours vs the HF loop (bench/train_throughput.py: tokens/s,
     MFU, peak memory);
  5. SDPA vs unfused attention on the 1B shape (bench/attention.py): speed, memory, loss.

``--cpu-smoke`` runs the same steps in tiny form on a CPU (the default test suite does, so the
script cannot rot before a GPU session uses it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

# Seconds per step on the GPU; they sum to 450 s, under the 8-minute budget with the install.
GPU_BOXES = {"device": 40, "bf16_steps": 60, "distopt_resume": 110, "throughput": 160, "sdpa": 80}
SMOKE_BOX = 600  # a shared 2-core CI box


class Check:
    def __init__(self, out: Path, smoke: bool, tokenizer: str, deadline: float | None):
        self.out, self.smoke, self.tokenizer, self.deadline = out, smoke, tokenizer, deadline
        self.results: dict = {"mode": "cpu-smoke" if smoke else "gpu", "steps": []}
        self.log = open(out / "gpu_check.log", "a")  # noqa: SIM115 (closed in main)
        self.env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
                        PYTHONWARNINGS="ignore", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")  # fmt: skip

    def box(self, name: str) -> float:
        if self.smoke:
            return SMOKE_BOX
        left = self.deadline - time.monotonic() if self.deadline else GPU_BOXES[name]
        return max(1.0, min(GPU_BOXES[name], left))

    def run(self, cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
        """A child process, its output appended to the log; TimeoutExpired propagates."""
        self.log.write(f"\n$ {' '.join(cmd)}\n")
        self.log.flush()
        proc = subprocess.run(cmd, cwd=REPO, env=self.env, capture_output=True, text=True,
                              timeout=timeout)  # fmt: skip
        self.log.write(proc.stdout + proc.stderr)
        self.log.flush()
        if proc.returncode != 0:
            raise RuntimeError(f"exit {proc.returncode}: {(proc.stderr or proc.stdout)[-1500:]}")
        return proc

    def step(self, name: str, fn) -> None:
        record = {"name": name, "status": "ok"}
        start = time.monotonic()
        self.log.write(f"\n===== step {name} =====\n")
        try:
            remaining = self.box(name)
            record["result"] = fn(
                lambda cmd: self.run(cmd, max(1.0, remaining - (time.monotonic() - start)))
            )
        except subprocess.TimeoutExpired:
            record["status"] = "timeout"
        except Exception as exc:  # a failed step is recorded, and the next one runs
            record["status"] = "failed"
            record["error"] = str(exc)[-2000:]
        record["seconds"] = round(time.monotonic() - start, 1)
        self.log.write(f"===== {name}: {record['status']} in {record['seconds']} s\n")
        self.results["steps"].append(record)
        print(f"{name:>16}: {record['status']:8} {record['seconds']:7.1f} s", flush=True)
        self.save()

    def save(self) -> None:
        tmp = self.out / "results.json.tmp"
        tmp.write_text(json.dumps(self.results, indent=1))
        tmp.rename(self.out / "results.json")

    # ------------------------------------------------------------------ the steps
    def device(self, run) -> dict:
        code = (
            "import json, platform, torch, megatron.core, transformers\n"
            "from megatron_cpt import platform as p\n"
            "cuda = torch.cuda.is_available()\n"
            "print(json.dumps(dict(python=platform.python_version(), torch=torch.__version__,\n"
            "  cuda=torch.version.cuda, megatron_core=megatron.core.__version__,\n"
            "  transformers=transformers.__version__, device=str(p.device()),\n"
            "  name=torch.cuda.get_device_name() if cuda else 'cpu',\n"
            "  capability=torch.cuda.get_device_capability() if cuda else None,\n"
            "  memory_gib=torch.cuda.get_device_properties(0).total_memory / 2**30 if cuda else None,\n"
            "  bf16=p.supports_bf16(), transformer_engine=p.have_transformer_engine())))\n"
        )
        return json.loads(run([sys.executable, "-c", code]).stdout.strip().splitlines()[-1])

    def _data(self) -> list[str]:
        """A random-token shard and the tiny model's config (Llama-3 vocabulary)."""
        from train_throughput import hf_config, write_random_shard

        data = self.out / "data"
        if not (data / "random_text_document.idx").exists():
            data.mkdir(exist_ok=True)
            cfg = hf_config("tiny", 128)
            (data / "config.json").write_text(json.dumps(cfg))
            write_random_shard(str(data / "random_text_document"), cfg["vocab_size"], 200_000)
        return ["--model", str(data / "config.json"),
                "--data-path", "1.0", str(data / "random_text_document"), "--split", "100,0,0",
                "--tokenizer-type", "Llama3Tokenizer", "--tokenizer-model", self.tokenizer,
                "--seq-length", "128", "--micro-batch-size", "2", "--global-batch-size", "2",
                "--lr", "1e-3", "--lr-decay-style", "constant",
                "--log-interval", "1", "--seed", "5"]  # fmt: skip

    @staticmethod
    def _precision(distributed_optimizer: bool = False) -> list[str]:
        """bf16 (and the distributed optimizer) in the CPU smoke run too: both train on CPU."""
        return ["--bf16"] + (["--use-distributed-optimizer"] if distributed_optimizer else [])

    @staticmethod
    def _losses(run_dir: Path) -> dict[int, float]:
        out = {}
        for line in (run_dir / "metrics.jsonl").read_text().splitlines():
            rec = json.loads(line)
            if rec["kind"] == "train":
                out[rec["iteration"]] = rec["lm_loss"]
        return out

    def bf16_steps(self, run) -> dict:
        run_dir = self.out / "bf16_steps"
        flags = self._precision()
        run([sys.executable, "tools/pretrain.py", *self._data(), *flags, "--train-iters", "5",
             "--run-dir", str(run_dir)])  # fmt: skip
        losses = self._losses(run_dir)
        if sorted(losses) != [1, 2, 3, 4, 5] or not all(map(math.isfinite, losses.values())):
            raise RuntimeError(f"expected 5 finite losses, got {losses}")
        return {"flags": flags, "losses": losses}

    def distopt_resume(self, run) -> dict:
        # Constant lr: the 2-iteration run must follow the 4-iteration run's schedule.
        base = [sys.executable, "tools/pretrain.py", *self._data(), *self._precision(True)]
        a, b = self.out / "resume_a", self.out / "resume_b"
        run([*base, "--train-iters", "4", "--save", str(a / "ckpt"), "--run-dir", str(a)])
        run([*base, "--train-iters", "2", "--save", str(b / "ckpt"), "--run-dir", str(b)])
        run([*base, "--train-iters", "4", "--save", str(b / "ckpt"), "--run-dir", str(b)])
        la, lb = self._losses(a), self._losses(b)
        exact = all(la[i] == lb.get(i) for i in (1, 2, 3, 4))
        if not exact:
            raise RuntimeError(f"resumed losses differ: {la} vs {lb}")
        return {"flags": self._precision(True), "losses": la, "exact": exact}

    def throughput(self, run) -> dict:
        shape = (["--model", "tiny", "--seq-length", "32", "--warmup", "1", "--steps", "1"]
                 if self.smoke else
                 ["--model", "llama3.2-1b", "--seq-length", "4096", "--micro-batch-size", "2",
                  "--warmup", "3", "--steps", "10"])  # fmt: skip
        proc = run([sys.executable, "bench/train_throughput.py", *shape,
                    "--tokenizer-model", self.tokenizer])  # fmt: skip
        return json.loads(proc.stdout.strip().splitlines()[-1])

    def sdpa(self, run) -> dict:
        shape = (["--model", "tiny", "--seq-lengths", "64", "--warmup", "0", "--steps", "1"]
                 if self.smoke else
                 ["--model", "llama3.2-1b", "--seq-lengths", "4096", "--warmup", "2",
                  "--steps", "5"])  # fmt: skip
        proc = run([sys.executable, "bench/attention.py", *shape])
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        # Same weights and tokens: losses agree to rounding (fp32 on CPU, bf16 kernels on GPU).
        tol = 1e-4 if self.smoke else 2e-2
        result["loss_parity"] = all(r["loss_diff"] <= tol for r in result["rows"])
        if not result["loss_parity"]:
            raise RuntimeError(f"SDPA vs unfused loss differs by more than {tol}: {result}")
        return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("out", help="directory for gpu_check.log and results.json")
    p.add_argument("--tokenizer-model", required=True, help="Meta's Llama-3 tokenizer.model")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shapes, fp32, on a CPU")
    p.add_argument("--budget-s", type=float, default=450.0, help="GPU: all steps together")
    p.add_argument("--steps", default="device,bf16_steps,distopt_resume,throughput,sdpa")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    deadline = None if args.cpu_smoke else time.monotonic() + args.budget_s
    check = Check(out, args.cpu_smoke, args.tokenizer_model, deadline)
    for name in args.steps.split(","):
        check.step(name, getattr(check, name))
    check.log.close()
    failed = [s["name"] for s in check.results["steps"] if s["status"] != "ok"]
    print(f"results: {out / 'results.json'}; log: {out / 'gpu_check.log'}"
          + (f"; not ok: {', '.join(failed)}" if failed else "; all steps ok"))  # fmt: skip
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
