"""``mcore-to-hf --lora-adapter-only``: our fused megatron-core adapters split into a PEFT
adapter that ``peft`` loads on the HF base and that gives the merged export's logits."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_sft_training import fiqa_sft, sft_run, straight  # noqa: F401 (fixtures)

from megatron_cpt.training.sft_data import SftDataset

REPO = Path(__file__).resolve().parent.parent
CONVERT = str(REPO / "tools" / "convert_checkpoint.py")
PEFT_NAMES = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


@pytest.mark.slow
def test_peft_adapter_loads_and_equals_the_merged_export(fiqa_sft, straight, tmp_path):  # noqa: F811
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from megatron_cpt.convert.exporter import ExportConfig, export_hf
    from megatron_cpt.convert.peft_adapter import AdapterExportConfig, export_peft_adapter

    sft_run(
        fiqa_sft, tmp_path / "run", "--micro-batch-size", "2", "--global-batch-size", "4",
        "--train-iters", "3", "--pretrained-checkpoint", str(straight / "ckpt"),
        "--lora-rank", "4", "--lora-alpha", "8", "--lr", "2e-2", "--save", str(tmp_path / "ck"),
    )  # fmt: skip
    export_hf(ExportConfig(str(tmp_path / "ck"), str(tmp_path / "merged")))
    export_hf(ExportConfig(str(straight / "ckpt"), str(tmp_path / "base")))
    export_peft_adapter(AdapterExportConfig(str(tmp_path / "ck"), str(tmp_path / "adapter")))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["peft_type"] == "LORA"
    assert config["target_modules"] == PEFT_NAMES

    def load(path):
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    base = load(tmp_path / "base")
    adapted = PeftModel.from_pretrained(load(tmp_path / "base"), tmp_path / "adapter").eval()
    merged = load(tmp_path / "merged")
    ids = SftDataset(fiqa_sft["train"][: -len("_tokens")])[0]["tokens"][None, :48]
    with torch.no_grad():
        want, got, plain = merged(ids).logits, adapted(ids).logits, base(ids).logits
    assert (got - want).abs().max() <= 1e-5
    assert (plain - want).abs().max() > 1e-3  # the adapters change the model: not a no-op
    # every PEFT module is loaded (no silently ignored key)
    loaded = {n for n, _ in adapted.named_parameters() if "lora_" in n}
    assert len(loaded) == 2 * len(PEFT_NAMES) * base.config.num_hidden_layers


def test_lora_adapter_only_refuses_a_checkpoint_without_adapters(straight, tmp_path):  # noqa: F811
    proc = subprocess.run(
        [sys.executable, CONVERT, "mcore-to-hf", "--load", str(straight / "ckpt"), "--out",
         str(tmp_path / "adapter"), "--lora-adapter-only"],
        capture_output=True, text=True, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "not a LoRA run" in lines[0] and lines[0].startswith("error:")
    assert not (tmp_path / "adapter").exists()
