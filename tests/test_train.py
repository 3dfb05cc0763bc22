"""End-to-end trainer tests on CPU (gloo): real shards from ../shared/data, the real SmolLM2
tokenizer, a tiny Llama (2 layers, hidden 64), tools/pretrain.py run as users run it."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from faults import descendants, wait_gone

REPO = Path(__file__).resolve().parent.parent
PRETRAIN = str(REPO / "tools" / "pretrain.py")

TINY = [
    "--model", "smollm2-135m",
    "--num-layers", "2",
    "--hidden-size", "64",
    "--ffn-hidden-size", "128",
    "--num-attention-heads", "4",
    "--num-query-groups", "2",
    "--seq-length", "32",
    "--micro-batch-size", "2",
    "--global-batch-size", "4",
    "--split", "100,0,0",
    "--log-interval", "1",
    "--seed", "7",
]  # fmt: skip


def _env(**extra: str) -> dict:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    env.update(extra)
    return env


def run_pretrain(args, nproc: int = 1, timeout: int = 300, **env) -> subprocess.CompletedProcess:
    if nproc == 1:
        cmd = [sys.executable, PRETRAIN, *args]
    else:
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc_per_node", str(nproc), PRETRAIN, *args,
        ]  # fmt: skip
    proc = subprocess.run(
        cmd, cwd=REPO, env=_env(**env), capture_output=True, text=True, timeout=timeout
    )
    return proc


def check_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    )


def metrics(run_dir: Path, kind: str = "train") -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def losses_by_iteration(run_dir: Path) -> dict[int, float]:
    out = {}
    for rec in metrics(run_dir):
        out[rec["iteration"]] = rec["lm_loss"]  # a resumed run re-logs: keep the latest
    return out


@pytest.fixture(scope="module")
def shards(tmp_path_factory, shared_data, smollm2_gguf):
    """Real token shards: two domain sets and one general set, SmolLM2's tokenizer."""
    from megatron_cpt.data.preprocess import PreprocessConfig, run_preprocess

    out = tmp_path_factory.mktemp("shards")
    prefixes = {}
    for name, rel in (
        ("reports", "domain/annual_reports.jsonl"),
        ("sec", "domain/sec_agreements.jsonl"),
        ("wiki", "general/wikitext2.jsonl"),
    ):
        cfg = PreprocessConfig(
            inputs=[str(shared_data / rel)],
            output_prefix=str(out / name),
            tokenizer_type="HuggingFaceTokenizer",
            tokenizer_model=str(smollm2_gguf),
            append_eod=True,
            log_interval=0,
        )
        run_preprocess(cfg)
        prefixes[name] = str(out / f"{name}_text_document")
    prefixes["tokenizer"] = ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model",
                             str(smollm2_gguf)]  # fmt: skip
    return prefixes


def data_args(shards, *weights_and_names) -> list[str]:
    out = ["--data-path"]
    for weight, name in weights_and_names:
        out += [str(weight), shards[name]]
    return out + shards["tokenizer"]


# ------------------------------------------------------------------------------------------
# Loss falls, blend, named validation sets
# ------------------------------------------------------------------------------------------


def test_loss_falls_blend_and_named_validation(shards, tmp_path):
    run = tmp_path / "run"
    proc = run_pretrain(
        [
            *TINY,
            *data_args(shards, (0.7, "reports"), (0.3, "wiki")),
            "--valid-data-path",
            f"sec={shards['sec']}",
            f"wiki={shards['wiki']}",
            "--eval-interval",
            "10",
            "--eval-iters",
            "1",
            "--train-iters",
            "20",
            "--lr",
            "5e-3",
            "--lr-warmup-iters",
            "2",
            "--min-lr",
            "5e-4",
            "--run-dir",
            str(run),
            "--tensorboard-dir",
            str(tmp_path / "tb"),
        ]  # fmt: skip
    )
    check_ok(proc)
    train = metrics(run)
    assert [r["iteration"] for r in train] == list(range(1, 21))
    keys = {"kind", "iteration", "consumed_samples", "lm_loss", "lr", "grad_norm",
            "tokens_per_s", "skipped_iters", "elapsed_s"}  # fmt: skip
    assert set(train[0]) == keys
    assert train[-1]["consumed_samples"] == 20 * 4
    first = sum(r["lm_loss"] for r in train[:5]) / 5
    last = sum(r["lm_loss"] for r in train[-5:]) / 5
    assert first > math.log(49152) - 0.5  # random init starts near uniform
    assert last < first - 1.0, (first, last)

    # The realized blend over the run matches the requested weights within 1 %.
    summary = json.loads((run / "run_summary.json").read_text())
    blend = summary["realized_blend"]
    assert abs(blend[shards["reports"]] - 0.7) <= 0.01
    assert abs(blend[shards["wiki"]] - 0.3) <= 0.01

    # Each named validation set reports its own loss at 0, 10 and 20.
    valid = metrics(run, "valid")
    by_name: dict[str, list[dict]] = {}
    for rec in valid:
        by_name.setdefault(rec["name"], []).append(rec)
    assert set(by_name) == {"sec", "wiki"}
    for recs in by_name.values():
        assert [r["iteration"] for r in recs] == [0, 10, 20]
        assert recs[-1]["lm_loss"] < recs[0]["lm_loss"]
        assert math.isclose(recs[-1]["ppl"], math.exp(recs[-1]["lm_loss"]), rel_tol=1e-9)
    assert by_name["sec"][-1]["lm_loss"] != by_name["wiki"][-1]["lm_loss"]
    # TensorBoard got the scalars too.
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tb").iterdir())


# ------------------------------------------------------------------------------------------
# Exact resume after SIGKILL; CPT start; parallel equivalence (share run A's checkpoint)
# ------------------------------------------------------------------------------------------

RESUME_ARGS = ["--train-iters", "8", "--lr", "1e-2", "--lr-warmup-iters", "1"]


@pytest.fixture(scope="module")
def run_a(shards, tmp_path_factory):
    """Run A: 8 iterations straight through, saving at the end."""
    root = tmp_path_factory.mktemp("run_a")
    proc = run_pretrain(
        [
            *TINY,
            *data_args(shards, (0.6, "reports"), (0.4, "wiki")),
            *RESUME_ARGS,
            "--save",
            str(root / "ckpt"),
            "--run-dir",
            str(root),
        ]  # fmt: skip
    )
    check_ok(proc)
    return root


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"run ended (exit {proc.returncode}) before {path.name}:\n{err}")
        if time.time() > deadline:
            proc.kill()
            raise AssertionError(f"timed out waiting for {path}")
        time.sleep(0.2)


def test_exact_resume_after_sigkill(shards, run_a, tmp_path):
    ckpt = tmp_path / "ckpt"
    args = [*TINY, *data_args(shards, (0.6, "reports"), (0.4, "wiki")), *RESUME_ARGS,
            "--save", str(ckpt), "--save-interval", "4", "--run-dir", str(tmp_path)]  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, PRETRAIN, *args],
        cwd=REPO,
        env=_env(MEGATRON_CPT_TEST_PAUSE_AT_ITERATION="6"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_for(tmp_path / "paused_at_iteration_6", proc)
    os.kill(proc.pid, signal.SIGKILL)  # mid-iteration 6: after forward/backward, before step
    proc.wait()
    from megatron_cpt.training.checkpointing import latest_iteration

    assert latest_iteration(ckpt) == 4
    assert max(losses_by_iteration(tmp_path)) == 5  # iteration 6 never completed

    check_ok(run_pretrain(args))
    a, b = losses_by_iteration(run_a), losses_by_iteration(tmp_path)
    assert sorted(b) == list(range(1, 9))
    for it in range(5, 9):
        assert b[it] == a[it], (it, a[it], b[it])  # bit for bit
    assert "resumed from" in json.loads((tmp_path / "run_summary.json").read_text())["start"]


@pytest.mark.slow
def test_save_killed_midway_keeps_previous_checkpoint(shards, run_a, tmp_path):
    """SIGKILL after iteration 6's shards are written but before publishing: 4 stays latest,
    and the restarted run repeats 5-8 exactly."""
    ckpt = tmp_path / "ckpt"
    args = [*TINY, *data_args(shards, (0.6, "reports"), (0.4, "wiki")), *RESUME_ARGS,
            "--save", str(ckpt), "--save-interval", "2", "--keep-last", "2",
            "--run-dir", str(tmp_path)]  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, PRETRAIN, *args],
        cwd=REPO,
        env=_env(MEGATRON_CPT_TEST_PAUSE_IN_SAVE="6"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_for(ckpt / "paused_in_save_6", proc)
    children = descendants(proc.pid)  # issue 15: megatron-core's Manager used to outlive it
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert wait_gone(children) == [], "a checkpoint process outlived the SIGKILLed trainer"
    from megatron_cpt.training.checkpointing import latest_iteration

    assert latest_iteration(ckpt) == 4
    assert (ckpt / "iter_0000006.partial").is_dir()
    published = sorted(p.name for p in ckpt.glob("iter_*") if not p.name.endswith(".partial"))
    assert published == ["iter_0000002", "iter_0000004"]  # --keep-last 2
    check_ok(run_pretrain(args))
    a, b = losses_by_iteration(run_a), losses_by_iteration(tmp_path)
    for it in range(5, 9):
        assert b[it] == a[it]
    assert latest_iteration(ckpt) == 8
    assert sorted(p.name for p in ckpt.glob("iter_*")) == ["iter_0000006", "iter_0000008"]


CPT_ARGS = ["--lr", "2e-3", "--lr-warmup-iters", "3", "--lr-warmup-init", "2e-4",
            "--lr-decay-style", "WSD", "--lr-wsd-decay-iters", "2", "--min-lr", "2e-4"]  # fmt: skip


@pytest.fixture(scope="module")
def cpt_run(shards, run_a, tmp_path_factory):
    """CPT start from run A's checkpoint (weights only) on a different blend, 4 iterations.
    Its losses are also the TP=1 reference for the parallel-layout tests."""
    root = tmp_path_factory.mktemp("cpt")
    common = [*TINY, *data_args(shards, (0.9, "reports"), (0.1, "wiki")), *CPT_ARGS,
              "--pretrained-checkpoint", str(run_a / "ckpt")]  # fmt: skip
    args = [*common, "--save", str(root / "ckpt"), "--run-dir", str(root)]
    check_ok(run_pretrain([*args, "--train-iters", "4"]))
    reference = {it: loss for it, loss in losses_by_iteration(root).items() if it <= 4}
    return root, args, common, reference


def test_cpt_start_rewarms_then_restart_resumes(cpt_run, run_a):
    root, args, _, _ = cpt_run
    recs = [r for r in metrics(root) if r["iteration"] <= 4][:4]
    assert [r["iteration"] for r in recs] == [1, 2, 3, 4]
    # Fresh schedule: warmup from --lr-warmup-init again (run A had finished its own schedule).
    lrs = [r["lr"] for r in recs]
    assert math.isclose(lrs[0], 2e-4) and lrs[0] < lrs[1] < lrs[2] < lrs[3]
    assert math.isclose(lrs[3], 2e-3)
    # Loaded weights, not a random init: the first loss is run A's level, far below uniform.
    a_last = losses_by_iteration(run_a)[8]
    assert recs[0]["lm_loss"] < math.log(49152) - 1.0
    assert abs(recs[0]["lm_loss"] - a_last) < 1.0
    summary = json.loads((root / "run_summary.json").read_text())
    assert summary["start"].startswith("CPT start")

    # Restart with more iterations: --save holds a checkpoint now, so it resumes (iteration 4),
    # keeps the optimizer, and continues the schedule (WSD cooldown over the last 2 of 8).
    check_ok(run_pretrain([*args, "--train-iters", "8"]))
    recs = metrics(root)
    assert [r["iteration"] for r in recs] == [1, 2, 3, 4, 5, 6, 7, 8]
    lr = {r["iteration"]: r["lr"] for r in recs}
    assert math.isclose(lr[5], 2e-3) and math.isclose(lr[6], 2e-3) and math.isclose(lr[7], 2e-3)
    # (1 - sqrt) cooldown: iteration 8 runs at step 7, half-way through the 2-step cooldown.
    assert math.isclose(lr[8], 2e-4 + (1 - math.sqrt(0.5)) * (2e-3 - 2e-4), rel_tol=1e-9)
    summary = json.loads((root / "run_summary.json").read_text())
    assert summary["start"].startswith("resumed from")


# ------------------------------------------------------------------------------------------
# TP=2 / PP=2 / DP=2 match TP=1 from the same loaded weights
# ------------------------------------------------------------------------------------------

PARALLEL_LAYOUTS = {
    "tp2": ["--tensor-model-parallel-size", "2"],
    "pp2": ["--pipeline-model-parallel-size", "2"],
    "dp2": [],
}


@pytest.mark.multiproc
@pytest.mark.parametrize(
    "layout",
    [
        "tp2",
        # Each torchrun pair costs ~10-20 s of startup on 2 busy cores: PP/DP run with -m slow.
        pytest.param("pp2", marks=pytest.mark.slow),
        pytest.param("dp2", marks=pytest.mark.slow),
    ],
)
def test_parallel_layout_matches_tp1(layout, cpt_run, tmp_path):
    """Same weights (loaded from a TP=1 checkpoint, so dist_checkpointing re-shards them), same
    data, 4 optimizer steps: the losses match the single-process run."""
    _, _, common, reference = cpt_run
    proc = run_pretrain(
        [*common, *PARALLEL_LAYOUTS[layout], "--train-iters", "4", "--run-dir", str(tmp_path)],
        nproc=2,
    )
    check_ok(proc)
    losses = losses_by_iteration(tmp_path)
    assert sorted(losses) == [1, 2, 3, 4]
    parallel = json.loads((tmp_path / "run_summary.json").read_text())["parallel"]
    expected = {"tp2": (2, 1, 1), "pp2": (1, 2, 1), "dp2": (1, 1, 2)}[layout]
    assert (parallel["tensor"], parallel["pipeline"], parallel["data"]) == expected
    for it in (1, 2, 3, 4):
        assert math.isclose(losses[it], reference[it], rel_tol=1e-4), (it, losses, reference)
    assert abs(losses[4] - losses[1]) > 1e-3  # the updates really changed the model


# ------------------------------------------------------------------------------------------
# NaN/Inf handling and config errors
# ------------------------------------------------------------------------------------------


def test_nan_steps_are_skipped_then_run_stops(shards, tmp_path):
    """A learning rate of 1e30 blows the weights up after one update: every following loss is
    NaN/Inf, those updates are skipped and counted, and the run stops after 3 in a row."""
    proc = run_pretrain(
        [
            *TINY,
            *data_args(shards, (1.0, "wiki")),
            "--train-iters",
            "20",
            "--lr",
            "1e30",
            "--lr-decay-style",
            "constant",
            "--clip-grad",
            "0",
            "--max-nan-skips",
            "3",
            "--run-dir",
            str(tmp_path),
        ]  # fmt: skip
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: stopping at iteration 4: 3 iterations in a row had a NaN/Inf")
    recs = metrics(tmp_path)
    assert [r["skipped_iters"] for r in recs] == [0, 1, 2, 3]
    assert recs[0]["lm_loss"] is not None and recs[0]["grad_norm"] is not None
    # Non-finite values are written as null (JSON has no NaN/Inf).
    assert all(r["lm_loss"] is None or r["grad_norm"] is None for r in recs[1:])


def test_config_error_is_one_line_before_compute(shards, tmp_path):
    proc = run_pretrain(
        [
            *TINY,
            *data_args(shards, (1.0, "wiki")),
            "--train-iters",
            "2",
            "--global-batch-size",
            "3",
            "--run-dir",
            str(tmp_path),
        ]  # fmt: skip
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1] == (
        "error: --global-batch-size 3 is not divisible by micro-batch-size x data-parallel size "
        "= 2 x 1"
    )
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "metrics.jsonl").exists()
