"""The whole Llama-3-SEC recipe at 1/500 scale, on SmolLM2-135M-Instruct, as one resumable run.

Stages (each is one of our CLIs, run as a subprocess exactly as a user would type it, so the
demo exercises the shipped tools rather than private shortcuts):

  corpora    domain + general JSONL split into train / held-out (``pipeline.corpus``)
  convert    SmolLM2 GGUF → megatron-core checkpoint (``convert_checkpoint.py hf-to-mcore``)
  base_hf    that checkpoint → HF safetensors (``mcore-to-hf``): the merge base and eval base
  shards     train + held-out text → indexed shards (``preprocess_data.py``)
  cpt        blended CPT with per-dataset validation (``pretrain.py --pretrained-checkpoint``)
  cpt_hf     the CPT checkpoint → HF (``mcore-to-hf``)
  merge      TIES of CPT back onto the base (``merge_models.py``, mergekit YAML)
  evaluate   base / CPT / merged on held-out domain and general text (``evaluate.py``), the
             three at once with the cores shared between them
  sft_*      only with ``--sft``: FiQA-SA/FPB instruction conversations (``pipeline.sft_set``,
             ``preprocess_sft.py``), SFT of the CPT checkpoint (``pretrain.py --sft``), export,
             and its evaluation on the same axes as one more model, "sft"
  report     Markdown + plots (``report.py``)

A stage is skipped on re-run only when its outputs pass a check (shards readable by
megatron-core, a published checkpoint, an HF directory with weights, a results JSON with every
set) and it ran with the same parameters (``stage.json``); a changed parameter re-runs that
stage and everything after it.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from megatron_cpt import assets
from megatron_cpt.errors import UserError

REPO = Path(__file__).resolve().parents[2]
TOOLS = REPO / "tools"


@dataclass
class QuickstartConfig:
    """Defaults measured on 2 CPU cores to finish in well under 15 minutes (README)."""

    work_dir: Path = Path("runs/quickstart")
    device: str = "cpu"  # "cuda": same pipeline on a GPU (bf16)
    domain_data: list[str] = field(default_factory=list)  # default: ../shared/data or registry
    general_data: list[str] = field(default_factory=list)
    heldout_fraction: float = 0.1
    domain_weight: float = 0.95  # Llama-3-SEC mixed ~1-5% general replay
    steps: int = 10
    seq_length: int = 256
    micro_batch_size: int = 2
    global_batch_size: int = 8
    lr: float = 5e-5
    min_lr: float = 5e-6
    warmup_fraction: float = 0.15  # of --steps, so any --steps works
    eval_interval: int = 5
    eval_iters: int = 2
    merge_method: str = "ties"
    merge_density: float = 0.5
    merge_weight: float = 0.5
    merge_sweep: bool = False  # also run tools/merge_sweep.py over a small TIES grid
    eval_docs: int = 24  # held-out documents per set ...
    eval_chars: int = 2000  # ... each cut at this many characters (~500 tokens)
    eval_seq_length: int = 256
    instruct_items: int = 25  # per chat-instruction task (x3 tasks), fixed seed; 0 = skip
    tatqa_questions: int = 12  # TAT-QA questions, fixed seed; 0 = skip
    tatqa_shots: int = 1
    workers: int = 2
    # optional CPT -> SFT -> evaluate stage (issue 17): full fine-tune of the CPT checkpoint
    sft: bool = False
    sft_items: int = 160  # FiQA-SA train + FPB non-evaluation items, alternating
    sft_seq_length: int = 512  # packed: ~5 conversations per sample
    sft_micro_batch_size: int = 2
    sft_global_batch_size: int = 4
    sft_epochs: int = 1
    sft_lr: float = 5e-5

    def params(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}


class Pipeline:
    def __init__(self, cfg: QuickstartConfig):
        self.cfg = cfg
        self.dir = Path(cfg.work_dir).resolve()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.state_path = self.dir / "stages.json"
        self.state = json.loads(self.state_path.read_text()) if self.state_path.exists() else {}
        self.rerun_rest = False
        self.timings: dict[str, float] = {}
        self.env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                        PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false")  # fmt: skip
        if cfg.device == "cpu":
            self.env["CUDA_VISIBLE_DEVICES"] = ""

    # ------------------------------------------------------------------ plumbing
    def path(self, *parts: str) -> Path:
        return self.dir.joinpath(*parts)

    def tool(self, name: str, *args: str | Path, log: str, threads: int | None = None) -> None:
        """Run one of our CLIs; ``threads`` caps its torch/OpenMP threads (concurrent stages)."""
        cmd = [sys.executable, str(TOOLS / name), *map(str, args)]
        log_path = self.path("logs", f"{log}.log")
        log_path.parent.mkdir(exist_ok=True)
        env = self.env if threads is None else dict(self.env, OMP_NUM_THREADS=str(threads))
        mark = "" if threads is None else f"[{log}] "
        print(f"  {mark}$ {shlex.join(cmd[1:])}", flush=True)
        with open(log_path, "w") as fh:
            fh.write(shlex.join(cmd) + "\n")
            fh.flush()
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True, env=env, cwd=self.dir)  # fmt: skip
            tail: list[str] = []
            for line in proc.stdout:
                fh.write(line)
                tail = (tail + [line.rstrip()])[-15:]
                if any(k in line for k in ("iteration", "validation", "error", "ppl")):
                    print(f"    {mark}{line.rstrip()[:160]}", flush=True)
            code = proc.wait()
        if code != 0:
            detail = "\n".join(f"    {t}" for t in tail)
            raise UserError(f"stage {log} failed (exit {code}); log: {log_path}\n{detail}")

    def _up_to_date(self, name: str, key: str, check) -> bool:
        """Done with these parameters, nothing upstream re-ran, and the outputs pass ``check``."""
        if self.state.get(name) != key or self.rerun_rest:
            return False
        try:
            check()
        except Exception as exc:  # an output that fails its check is redone
            print(f"[{name}] outputs failed their check ({exc}); re-running", flush=True)
            return False
        print(f"[{name}] up to date (outputs checked)", flush=True)
        return True

    def stage(self, name: str, params: dict, check, run) -> None:
        """One stage: skipped when up to date, else run, checked and recorded."""
        self.stages([(name, params, check, lambda _threads: run())])

    def stages(self, specs: list[tuple[str, dict, object, object]]) -> None:
        """Independent stages run at once, each ``run(threads)`` given an equal share of the
        cores (one stage runs in this thread). For the three evaluations: one evaluation does
        not keep 2 threads busy (small matmuls, generation one token at a time); in the default
        demo the three at 1 thread each on 2 cores took 438 s against 563 s one after another,
        with identical results (README). A stage is skipped when up to date and recorded when
        done; with several, a failure is raised once every stage has finished, and the finished
        ones stay recorded."""
        todo = []
        for name, params, check, run in specs:
            key = json.dumps(params, sort_keys=True, default=str)
            if not self._up_to_date(name, key, check):
                todo.append((name, key, check, run))
        if not todo:
            return
        threads = max(1, (os.cpu_count() or 1) // len(todo))
        for name, *_ in todo:
            self.state.pop(name, None)
        self._save_state()

        def one(job) -> float:
            _, _, check, run = job
            start = time.perf_counter()
            run(threads)
            check()
            return time.perf_counter() - start

        def record(name: str, key: str, seconds: float) -> None:
            self.timings[name] = seconds
            self.state[name] = key
            self._save_state()
            print(f"[{name}] done in {seconds:.0f} s", flush=True)

        self.rerun_rest = True  # everything downstream depends on these outputs
        if len(todo) == 1:
            name, key, *_ = todo[0]
            print(f"[{name}] running", flush=True)
            record(name, key, one(todo[0]))
            return
        print(f"[{', '.join(t[0] for t in todo)}] running at once, {threads} thread(s) each",
              flush=True)  # fmt: skip
        errors = []
        with ThreadPoolExecutor(len(todo)) as pool:
            futures = [pool.submit(one, job) for job in todo]
            for (name, key, _, _), future in zip(todo, futures):
                try:
                    record(name, key, future.result())
                except Exception as exc:  # the others finish and are recorded first
                    errors.append(exc)
        if errors:
            raise errors[0]

    def _save_state(self) -> None:
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state, indent=1))
        os.replace(tmp, self.state_path)

    # ------------------------------------------------------------------ checks
    @staticmethod
    def check_checkpoint(path: Path) -> None:
        from megatron_cpt.training.checkpointing import latest_iteration, read_metadata

        if latest_iteration(path) is None:
            raise UserError(f"{path}: no published checkpoint")
        read_metadata(path)

    @staticmethod
    def check_hf(path: Path) -> None:
        config = json.loads((path / "config.json").read_text())
        if config.get("model_type") != "llama":
            raise UserError(f"{path}/config.json: not a Llama config")
        if not list(path.glob("*.safetensors")):
            raise UserError(f"{path}: no safetensors weights")
        if not (path / "tokenizer.json").exists():
            raise UserError(f"{path}: no tokenizer.json")

    @staticmethod
    def check_shard(prefix: Path) -> None:
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        dataset = IndexedDataset(str(prefix))
        if len(dataset) == 0:
            raise UserError(f"{prefix}: empty shard")

    # ------------------------------------------------------------------ the run
    def run(self) -> dict:
        c = self.cfg
        gguf = assets.smollm2_gguf()
        data_dir = self.path("data")
        splits: dict = {}

        def corpora():
            from megatron_cpt.pipeline.corpus import prepare_corpora

            result = prepare_corpora(data_dir, c.domain_data or None, c.general_data or None,
                                     c.heldout_fraction)  # fmt: skip
            splits.update(result)
            (data_dir / "sources.json").write_text(
                json.dumps({k: {**asdict(v), "train": str(v.train), "heldout": str(v.heldout)}
                            for k, v in result.items()}, indent=1))  # fmt: skip

        def check_corpora():
            meta = json.loads((data_dir / "sources.json").read_text())
            for name in ("domain", "general"):
                for part in ("train", "heldout"):
                    if Path(meta[name][part]).stat().st_size == 0:
                        raise UserError(f"{meta[name][part]} is empty")

        self.stage("corpora", {k: c.params()[k] for k in
                               ("domain_data", "general_data", "heldout_fraction")},
                   check_corpora, corpora)  # fmt: skip

        base_mcore, base_hf = self.path("base_mcore"), self.path("base_hf")
        self.stage(
            "convert", {"gguf": str(gguf)}, lambda: self.check_checkpoint(base_mcore),
            lambda: self.tool("convert_checkpoint.py", "hf-to-mcore", "--hf", gguf,
                              "--out", base_mcore, "--overwrite", log="convert"),
        )  # fmt: skip
        self.stage(
            "base_hf", {}, lambda: self.check_hf(base_hf),
            lambda: self.tool("convert_checkpoint.py", "mcore-to-hf", "--load", base_mcore,
                              "--out", base_hf, "--tokenizer-from", gguf, "--overwrite",
                              log="base_hf"),
        )  # fmt: skip

        shards = self.path("shards")
        prefixes = {f"{n}_{p}": shards / f"{n}_{p}_text_document"
                    for n in ("domain", "general") for p in ("train", "heldout")}  # fmt: skip

        def preprocess():
            for name in prefixes:
                self.tool("preprocess_data.py", "--input", data_dir / f"{name}.jsonl",
                          "--output-prefix", shards / name, "--tokenizer-type",
                          "HuggingFaceTokenizer", "--tokenizer-model", base_hf,
                          "--append-eod", "--workers", c.workers, log=f"preprocess_{name}")  # fmt: skip

        self.stage("shards", {"workers": c.workers},
                   lambda: [self.check_shard(p) for p in prefixes.values()], preprocess)  # fmt: skip

        cpt = self.path("cpt")
        train_keys = (
            "steps",
            "seq_length",
            "micro_batch_size",
            "global_batch_size",
            "lr",
            "min_lr",
            "warmup_fraction",
            "eval_interval",
            "eval_iters",
            "domain_weight",
            "device",
        )
        self.stage(
            "cpt", {k: c.params()[k] for k in train_keys},
            lambda: self.check_checkpoint(cpt / "checkpoints"),
            lambda: self._train(cpt, base_mcore, base_hf, prefixes),
        )  # fmt: skip

        cpt_hf = self.path("cpt_hf")
        self._export_stage("cpt_hf", cpt / "checkpoints", cpt_hf, base_hf)

        merged_hf = self.path("merged_hf")
        merge_keys = ("merge_method", "merge_density", "merge_weight")
        self.stage(
            "merge", {k: c.params()[k] for k in merge_keys}, lambda: self.check_hf(merged_hf),
            lambda: self._merge(base_hf, cpt_hf, merged_hf),
        )  # fmt: skip

        evals = {"base": base_hf, "cpt": cpt_hf, "merged": merged_hf}
        results = self.path("eval")
        from megatron_cpt.pipeline.corpus import write_eval_subset

        eval_sets = {
            name: write_eval_subset(data_dir / f"{name}_heldout.jsonl",
                                    data_dir / f"{name}_eval.jsonl", c.eval_docs, c.eval_chars)
            for name in ("domain", "general")
        }  # fmt: skip
        axes: list[str | int] = []  # the instruction & TAT-QA axes (issue 16)
        if c.instruct_items > 0:
            axes += ["--instruct", "fpb,fiqasa,headlines", "--instruct-limit", c.instruct_items]
        if c.tatqa_questions > 0:
            axes += ["--tatqa", "--tatqa-limit", c.tatqa_questions, "--tatqa-shots", c.tatqa_shots]

        def evaluation(label: str, model: Path):
            out = results / f"{label}.json"
            return (
                f"evaluate_{label}",
                {"docs": c.eval_docs, "chars": c.eval_chars, "seq": c.eval_seq_length,
                 "instruct": c.instruct_items, "tatqa": c.tatqa_questions,
                 "tatqa_shots": c.tatqa_shots},  # fmt: skip
                lambda: self._check_eval(out, c.instruct_items > 0, c.tatqa_questions > 0),
                lambda threads=None: self.tool(
                    "evaluate.py", "--hf", model, "--data", f"domain={eval_sets['domain']}",
                    "--data", f"general={eval_sets['general']}",
                    "--seq-length", c.eval_seq_length, "--batch-size", 4, *axes,
                    "--output", out, log=f"evaluate_{label}", threads=threads),
            )  # fmt: skip

        self.stages([evaluation(label, model) for label, model in evals.items()])
        if c.sft:  # after the three evaluations, so turning it on re-runs none of them
            evals["sft"] = self._sft(cpt / "checkpoints", base_hf, shards)
            self.stage(*evaluation("sft", evals["sft"]))

        if c.merge_sweep:  # issue 19: pick density x weight against domain gain / general loss
            sweep = self.path("merge_sweep")
            self.stage(
                "merge_sweep", {"docs": c.eval_docs, "chars": c.eval_chars, "seq": c.eval_seq_length},
                lambda: (sweep / "sweep.json").stat(),
                lambda: self.tool("merge_sweep.py", "--base", base_hf, "--model", cpt_hf,
                                  "--density", "0.3,0.7,1.0", "--weight", "0.5,1.0",
                                  "--domain", f"domain={eval_sets['domain']}",
                                  "--general", f"general={eval_sets['general']}",
                                  "--seq-length", c.eval_seq_length,
                                  "--constraint", "general_bpb<=base*1.01", "--out", sweep,
                                  log="merge_sweep"),
            )  # fmt: skip

        report = self.path("report")
        if (TOOLS / "report.py").exists():
            self.stage(
                "report", {}, lambda: (report / "report.md").stat(),
                lambda: self.tool("report.py", cpt, "--eval",
                                  *[f"{k}={results / (k + '.json')}" for k in evals],
                                  "--general", "general", "--out", report, log="report"),
            )  # fmt: skip
        summary = self.summary(results, evals)
        (self.dir / "summary.json").write_text(json.dumps(summary, indent=1))
        return summary

    def _train(self, cpt: Path, base_mcore: Path, base_hf: Path, prefixes: dict) -> None:
        c = self.cfg
        args = [
            "--pretrained-checkpoint", base_mcore, "--save", cpt / "checkpoints",
            "--run-dir", cpt, "--tensorboard-dir", cpt / "tensorboard",
            "--data-path", c.domain_weight, prefixes["domain_train"],
            round(1 - c.domain_weight, 6), prefixes["general_train"], "--split", "100,0,0",
            "--valid-data-path", f"domain={prefixes['domain_heldout']}",
            f"general={prefixes['general_heldout']}",
            "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", base_hf,
            "--seq-length", c.seq_length, "--micro-batch-size", c.micro_batch_size,
            "--global-batch-size", c.global_batch_size, "--train-iters", c.steps,
            "--lr", c.lr, "--min-lr", c.min_lr, "--lr-warmup-fraction", c.warmup_fraction,
            "--lr-decay-style", "cosine", "--weight-decay", 0.1, "--clip-grad", 1.0,
            "--log-interval", 1, "--eval-interval", c.eval_interval, "--eval-iters", c.eval_iters,
            "--save-interval", c.steps, "--keep-last", 1, "--seed", 1234,
        ]  # fmt: skip
        if c.device == "cuda":
            args.append("--bf16")
        self.tool("pretrain.py", *args, log="cpt")

    def _sft(self, cpt_ckpt: Path, base_hf: Path, shards: Path) -> Path:
        """CPT -> SFT: build the conversation set, fine-tune the CPT checkpoint, export.

        The CPT checkpoint (not the merged model) is fine-tuned: SFT is the step that gives
        the domain-adapted weights their instruction following back (Llama-3-SEC's next
        step), and it is already a megatron-core checkpoint for ``pretrain.py``; the merged
        model is an HF directory that would need another conversion first."""
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        from megatron_cpt.pipeline.sft_set import write_sft_set

        c = self.cfg
        jsonl, prefix = self.path("data", "sft_train.jsonl"), shards / "sft"
        sft, sft_hf = self.path("sft"), self.path("sft_hf")

        def build():
            counts = write_sft_set(jsonl, c.sft_items, c.instruct_items)
            print(f"  SFT conversations per source: {counts}", flush=True)
            self.tool("preprocess_sft.py", "--input", jsonl, "--output-prefix", prefix,
                      "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", base_hf,
                      "--seq-length", c.sft_seq_length, log="sft_data")  # fmt: skip

        self.stage("sft_data", {"items": c.sft_items, "eval_items": c.instruct_items,
                                "seq": c.sft_seq_length},
                   lambda: self.check_shard(Path(f"{prefix}_tokens")), build)  # fmt: skip

        def train():
            samples = len(IndexedDataset(f"{prefix}_tokens").document_indices) - 1
            iters = max(1, -(-samples * c.sft_epochs // c.sft_global_batch_size))
            args = [
                "--pretrained-checkpoint", cpt_ckpt, "--sft", "--save", sft / "checkpoints",
                "--run-dir", sft, "--data-path", f"{prefix}_tokens",
                "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", base_hf,
                "--seq-length", c.sft_seq_length, "--micro-batch-size", c.sft_micro_batch_size,
                "--global-batch-size", c.sft_global_batch_size, "--train-iters", iters,
                "--lr", c.sft_lr, "--min-lr", c.sft_lr / 10, "--lr-warmup-iters", min(1, iters - 1),
                "--lr-decay-style", "cosine", "--weight-decay", 0.0, "--clip-grad", 1.0,
                "--log-interval", 1, "--eval-interval", iters + 1, "--save-interval", iters,
                "--keep-last", 1, "--seed", 1234,
            ]  # fmt: skip
            if c.device == "cuda":
                args.append("--bf16")
            self.tool("pretrain.py", *args, log="sft")

        sft_keys = ("sft_micro_batch_size", "sft_global_batch_size", "sft_epochs", "sft_lr",
                    "device")  # fmt: skip
        self.stage("sft", {k: c.params()[k] for k in sft_keys},
                   lambda: self.check_checkpoint(sft / "checkpoints"), train)  # fmt: skip
        self._export_stage("sft_hf", sft / "checkpoints", sft_hf, base_hf)
        return sft_hf

    def _export_stage(self, name: str, checkpoints: Path, out: Path, base_hf: Path) -> None:
        """A trained checkpoint -> HF safetensors, with the base's tokenizer (``mcore-to-hf``)."""
        self.stage(
            name, {}, lambda: self.check_hf(out),
            lambda: self.tool("convert_checkpoint.py", "mcore-to-hf", "--load", checkpoints,
                              "--out", out, "--tokenizer-from", base_hf, "--overwrite", log=name),
        )  # fmt: skip

    def _merge(self, base_hf: Path, cpt_hf: Path, merged_hf: Path) -> None:
        import yaml

        c = self.cfg
        recipe = {
            "merge_method": c.merge_method,
            "base_model": str(base_hf),
            "models": [{"model": str(cpt_hf),
                        "parameters": {"weight": c.merge_weight, "density": c.merge_density}}],
            "parameters": {"normalize": False},
            "dtype": "float32",
            "tokenizer_source": "base",
        }  # fmt: skip
        path = self.path("merge.yaml")
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        self.tool("merge_models.py", path, merged_hf, "--overwrite", log="merge")

    @staticmethod
    def _check_eval(path: Path, instruct: bool = False, tatqa: bool = False) -> None:
        data = json.loads(path.read_text())
        text = json.dumps(data)
        for name in ("domain", "general"):
            if f'"{name}"' not in text:
                raise UserError(f"{path}: no results for {name}")
        for axis, wanted in (("instruct", instruct), ("tatqa", tatqa)):
            if wanted and not data.get(axis):
                raise UserError(f"{path}: no {axis} results")

    def summary(self, results: Path, evals: dict) -> dict:
        """Held-out perplexity and bits-per-byte per model (evaluate.py's ``perplexity`` block),
        and the instruction (chat) / TAT-QA axes when they ran."""
        table, axes = {}, {}
        for label in evals:
            data = json.loads((results / f"{label}.json").read_text())
            sets = data["perplexity"]
            table[label] = {n: {"ppl": sets[n]["ppl"], "bpb": sets[n]["bpb"]}
                            for n in ("domain", "general")}  # fmt: skip
            row = {f"{t}_{k}": v[k] for t, v in data.get("instruct", {}).items()
                   for k in ("acc_ll", "acc_gen", "invalid_rate", "chat_nll")}  # fmt: skip
            if data.get("tatqa"):
                row.update(tatqa_em=data["tatqa"]["em"], tatqa_f1=data["tatqa"]["f1"])
            axes[label] = row
        print("\nheld-out          domain ppl  general ppl   domain bpb  general bpb")
        for label, row in table.items():
            d, g = row["domain"], row["general"]
            print(f"  {label:<14}{d['ppl']:12.3f}{g['ppl']:13.3f}{d['bpb']:13.4f}{g['bpb']:13.4f}")
        for key in dict.fromkeys(k for row in axes.values() for k in row):
            print(f"  {key:<24}" + "".join(f"{label} {axes[label].get(key, float('nan')):.3f}  "
                                           for label in axes))  # fmt: skip
        return {"heldout": table, "axes": axes, "stage_seconds": self.timings,
                "config": self.cfg.params()}  # fmt: skip
