"""SFT samples through a real megatron-core GPTModel: packing without cross-conversation
attention (a packed sample's logits equal each conversation run alone, fp32)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from megatron_cpt import platform
from megatron_cpt.data.sft import SftConfig, run_sft_preprocess
from megatron_cpt.model import LlamaArch, ModelBuildConfig, build_model, build_transformer_config
from megatron_cpt.tokenizers import build_tokenizer
from megatron_cpt.training.sft_data import SftDataset

TOL = 1e-5


@pytest.fixture(scope="module")
def mp():
    platform.init_distributed()
    platform.initialize_model_parallel(1, 1, 1)
    platform.set_seed(3)


@pytest.fixture(scope="module")
def packed(tmp_path_factory, smollm2_gguf):
    tok = build_tokenizer("HuggingFaceTokenizer", smollm2_gguf)
    tmp = tmp_path_factory.mktemp("sft")
    rows = [
        {"prompt": "Sentiment of: shares jump after earnings beat", "response": "positive"},
        {"prompt": "Sentiment of: guidance cut", "response": "negative"},
        {
            "messages": [
                {"role": "user", "content": "Say hi."},
                {"role": "assistant", "content": "hi"},
                {"role": "user", "content": "Again, louder."},
                {"role": "assistant", "content": "HI"},
            ]
        },
    ]
    (tmp / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = run_sft_preprocess(
        SftConfig(
            inputs=[str(tmp / "in.jsonl")],
            output_prefix=str(tmp / "chat"),
            tokenizer_type="HuggingFaceTokenizer",
            tokenizer_model=str(smollm2_gguf),
            seq_length=160,
        ),
        tokenizer=tok,
    )
    assert summary["samples"] == 1 and summary["conversations"] == 3
    return SftDataset(tmp / "chat", seq_length=160), tok


def tiny_model(vocab_size: int):
    arch = LlamaArch(
        num_layers=2,
        hidden_size=96,
        ffn_hidden_size=192,
        num_attention_heads=6,
        num_query_groups=2,
        vocab_size=vocab_size,
    )
    build = ModelBuildConfig()
    platform.set_seed(11)
    model = build_model(arch, build_transformer_config(arch, build), build=build)
    return model.eval()


def test_packed_logits_equal_each_conversation_alone(mp, packed):
    dataset, tok = packed
    item = dataset[0]
    model = tiny_model(tok.vocab_size)
    positions = item["position_ids"].numpy()
    starts = list(np.flatnonzero(positions == 0)) + [positions.size]
    with torch.no_grad():
        whole = model(
            item["tokens"][None], item["position_ids"][None], item["attention_mask"][None]
        )
        without_mask = model(item["tokens"][None], item["position_ids"][None], None)
    conversations = 0
    for a, b in zip(starts[:-1], starts[1:]):
        if not item["loss_mask"][a:b].any():
            continue  # the padding tail
        conversations += 1
        alone_tokens = item["tokens"][a:b][None]
        with torch.no_grad():
            alone = model(alone_tokens, torch.arange(b - a)[None], None)
        assert (whole[0, a:b] - alone[0]).abs().max() <= TOL
        if a > 0:  # without the packed mask, later conversations would see earlier ones
            assert (without_mask[0, a:b] - alone[0]).abs().max() > 1e-3
    assert conversations == 3


# ---- tools/pretrain.py --sft ----------------------------------------------------------------

TINY_SFT = [
    "--model", "smollm2-135m",
    "--num-layers", "2",
    "--hidden-size", "64",
    "--ffn-hidden-size", "128",
    "--num-attention-heads", "4",
    "--num-query-groups", "2",
    "--seq-length", "96",
    "--log-interval", "1",
    "--seed", "7",
    "--lr", "5e-3",
    "--lr-warmup-iters", "1",
    "--sft",
]  # fmt: skip


@pytest.fixture(scope="module")
def fiqa_sft(tmp_path_factory, shared_data, smollm2_gguf):
    """FiQA-SA conversations (real text, SmolLM2's template): 48 to train, 8 held out."""
    tok = build_tokenizer("HuggingFaceTokenizer", smollm2_gguf)
    tmp = tmp_path_factory.mktemp("fiqa_sft")
    rows = [json.loads(x) for x in (shared_data / "tasks/fiqasa_train.jsonl").open()]
    out = {}
    for name, part in (("train", rows[:48]), ("valid", rows[48:56])):
        path = tmp / f"{name}.jsonl"
        path.write_text(
            "".join(
                json.dumps(
                    {
                        "messages": [
                            {"role": "system", "content": "Label the sentiment."},
                            {"role": "user", "content": r["text"]},
                            {"role": "assistant", "content": r["label"]},
                        ]
                    }
                )
                + "\n"
                for r in part
            )
        )
        cfg = SftConfig(
            inputs=[str(path)],
            output_prefix=str(tmp / name),
            tokenizer_type="HuggingFaceTokenizer",
            tokenizer_model=str(smollm2_gguf),
            seq_length=96,
        )
        run_sft_preprocess(cfg, tokenizer=tok)
        out[name] = str(tmp / f"{name}_tokens")
    out["args"] = [
        "--data-path", out["train"],
        "--valid-data-path", f"chat={out['valid']}",
        "--tokenizer-type", "HuggingFaceTokenizer",
        "--tokenizer-model", str(smollm2_gguf),
    ]  # fmt: skip
    return out


def sft_run(fiqa_sft, run_dir, *extra, nproc=1):
    from test_train import check_ok, run_pretrain

    proc = run_pretrain(
        [*TINY_SFT, *fiqa_sft["args"], "--run-dir", str(run_dir), *extra], nproc=nproc
    )
    check_ok(proc)
    return proc


def losses(run_dir, kind="train") -> dict[int, float]:
    from test_train import metrics

    return {r["iteration"]: r["lm_loss"] for r in metrics(run_dir, kind)}


@pytest.fixture(scope="module")
def straight(fiqa_sft, tmp_path_factory):
    """8 iterations, 2 micro-batches of 2 per step, saved at the end."""
    root = tmp_path_factory.mktemp("straight")
    sft_run(
        fiqa_sft, root, "--micro-batch-size", "2", "--global-batch-size", "4",
        "--train-iters", "8", "--lr-decay-iters", "8", "--eval-interval", "4", "--eval-iters", "1",
        "--save", str(root / "ckpt"),
    )  # fmt: skip
    return root


def test_sft_loss_falls_and_validates_on_held_out(straight):
    train = losses(straight)
    assert sorted(train) == list(range(1, 9))
    assert train[8] < train[1] - 1.0
    from test_train import metrics

    valid = [r["lm_loss"] for r in metrics(straight, "valid") if r["name"] == "chat"]
    assert len(valid) >= 2 and valid[-1] < valid[0]


def test_sft_per_token_loss_independent_of_micro_batching(fiqa_sft, straight, tmp_path):
    """One micro-batch of 4 or two of 2: the same samples, different loss-token counts per
    micro-batch; per-token averaging makes losses and updates identical."""
    sft_run(
        fiqa_sft, tmp_path, "--micro-batch-size", "4", "--global-batch-size", "4",
        "--train-iters", "8",
    )  # fmt: skip
    a, b = losses(straight), losses(tmp_path)
    assert max(abs(a[i] - b[i]) for i in a) <= 1e-4, (a, b)


@pytest.mark.slow
def test_sft_per_token_loss_dp2_equals_dp1(fiqa_sft, straight, tmp_path):
    sft_run(
        fiqa_sft, tmp_path, "--micro-batch-size", "2", "--global-batch-size", "4",
        "--train-iters", "8", nproc=2,
    )  # fmt: skip
    a, b = losses(straight), losses(tmp_path)
    assert max(abs(a[i] - b[i]) for i in a) <= 1e-4, (a, b)


def test_sft_exact_resume(fiqa_sft, straight, tmp_path):
    common = ["--micro-batch-size", "2", "--global-batch-size", "4", "--lr-decay-iters", "8",
              "--save", str(tmp_path / "ck")]  # fmt: skip
    sft_run(fiqa_sft, tmp_path / "a", *common, "--train-iters", "4")
    sft_run(fiqa_sft, tmp_path / "b", *common, "--train-iters", "8")
    first, second, want = losses(tmp_path / "a"), losses(tmp_path / "b"), losses(straight)
    assert sorted(first) == [1, 2, 3, 4] and sorted(second) == [5, 6, 7, 8]
    for i in range(1, 9):
        assert (first | second)[i] == want[i], i


@pytest.mark.slow
def test_sft_from_gguf_and_export_keeps_the_chat_template(fiqa_sft, smollm2_gguf, tmp_path):
    """The real SmolLM2: GGUF -> Megatron, 2 SFT steps, mcore-to-hf; the export carries the
    chat template, which renders and masks conversations exactly as the GGUF's does."""
    from test_train import run_pretrain

    from megatron_cpt.convert.exporter import ExportConfig, export_hf
    from megatron_cpt.convert.importer import ImportConfig, import_hf
    from megatron_cpt.data.sft import ChatEncoder, chat_template_for

    import_hf(ImportConfig(str(smollm2_gguf), str(tmp_path / "mc")))
    proc = run_pretrain(
        [
            "--pretrained-checkpoint",
            str(tmp_path / "mc"),
            *fiqa_sft["args"],
            "--sft",
            "--seq-length",
            "96",
            "--micro-batch-size",
            "2",
            "--global-batch-size",
            "4",
            "--train-iters",
            "2",
            "--log-interval",
            "1",
            "--lr",
            "1e-5",
            "--eval-interval",
            "2",
            "--eval-iters",
            "1",
            "--run-dir",
            str(tmp_path / "run"),
            "--save",
            str(tmp_path / "sft"),
        ],  # fmt: skip
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert "CPT start from" in proc.stdout + proc.stderr
    export_hf(ExportConfig(str(tmp_path / "sft"), str(tmp_path / "hf")))
    template = chat_template_for(tmp_path / "hf")
    assert template == chat_template_for(smollm2_gguf)
    exported = ChatEncoder(build_tokenizer("HuggingFaceTokenizer", tmp_path / "hf"), template)
    original = ChatEncoder(build_tokenizer("HuggingFaceTokenizer", smollm2_gguf), template)
    conversation = [
        {"role": "user", "content": "Sentiment of: margins widen"},
        {"role": "assistant", "content": "positive"},
    ]
    for a, b in zip(exported.encode(conversation), original.encode(conversation)):
        np.testing.assert_array_equal(a, b)


def test_lora_sft_trains_adapters_only(fiqa_sft, straight, tmp_path):
    """--lora-rank from a base checkpoint: loss falls, the saved base tensors are bit-identical
    to the start checkpoint, the adapters are saved (sharded like their weights) and nonzero,
    and the optimizer keeps state for adapters only."""
    from pathlib import Path

    from megatron_cpt.convert.mcore_checkpoint import GlobalTensorReader
    from megatron_cpt.training.checkpointing import read_metadata

    base_ckpt = straight / "ckpt"
    proc = sft_run(
        fiqa_sft, tmp_path / "run", "--micro-batch-size", "2", "--global-batch-size", "4",
        "--train-iters", "6", "--pretrained-checkpoint", str(base_ckpt),
        "--lora-rank", "4", "--lora-alpha", "8", "--lr", "2e-2", "--save", str(tmp_path / "ck"),
    )  # fmt: skip
    log = proc.stdout + proc.stderr
    assert "> LoRA: {'adapted_layers': 8" in log and "base loaded before the adapters" in log
    train = losses(tmp_path / "run")
    assert train[6] < train[1]
    base = GlobalTensorReader(Path(read_metadata(base_ckpt)["path"]))
    tuned = GlobalTensorReader(Path(read_metadata(tmp_path / "ck")["path"]))
    adapters = sorted(k for k in tuned._meta if "lora_" in k and not k.startswith("optimizer"))
    assert len(adapters) == 4 * 2  # targets x (A, B); layers are stacked along an axis
    weights = [k for k in base._meta if k.startswith(("decoder.", "embedding.", "output_layer."))]
    weights = [k for k in weights if hasattr(base._meta[k], "size")]  # tensors, not objects
    assert weights
    for name in weights:
        assert torch.equal(base.read([name])[name], tuned.read([name])[name]), name
    b = [k for k in adapters if k.endswith("lora_B")]
    assert all(tuned.read([k])[k].abs().max() > 0 for k in b)
    moments = [k for k in tuned._meta if k.startswith("optimizer") and "exp_avg" in k]
    assert moments and all("lora_" in k for k in moments), moments[:5]
    # mcore-to-hf merges the adapters: the HF model's logits equal the adapted Megatron model's
    from transformers import AutoModelForCausalLM

    from megatron_cpt.convert.exporter import ExportConfig, export_hf
    from megatron_cpt.convert.loading import load_megatron_model, megatron_logits
    from megatron_cpt.convert.mcore_checkpoint import sharded_key
    from megatron_cpt.model.lora import LoraSettings, apply_lora, lora_layers

    export_hf(ExportConfig(str(tmp_path / "ck"), str(tmp_path / "hf")))
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    model, arch = load_megatron_model(tmp_path / "ck")  # the base; adapters added next
    apply_lora(model, LoraSettings(rank=4, alpha=8))
    with torch.no_grad():
        for name, m in lora_layers(model):
            for part in ("lora_A", "lora_B"):
                key, layer = sharded_key(f"{name}.{part}")
                getattr(m, part).copy_(tuned.read([f"{name}.{part}"])[f"{name}.{part}"])
                assert layer is not None and key.endswith(part)
    ids = SftDataset(fiqa_sft["train"][: -len("_tokens")])[0]["tokens"][None, :48]
    adapted = megatron_logits(model, ids, arch.vocab_size)
    with torch.no_grad():
        exported = hf(ids).logits
    assert (adapted - exported).abs().max() <= TOL


@pytest.mark.slow
@pytest.mark.parametrize(
    "layout",
    [
        pytest.param((1, ()), id="tp1-fp32"),
        pytest.param((1, ("--bf16",)), id="tp1-bf16"),
        pytest.param((2, ("--tensor-model-parallel-size", "2")), id="tp2-fp32"),
    ],
)
def test_lora_resumes_exactly(fiqa_sft, straight, tmp_path, layout):
    """LoRA SFT stopped at iteration 3 and resumed to 6 gives the uninterrupted run's losses
    bit for bit: at TP=1, with bf16 (fp32 main params for the adapters), and at TP=2 (the
    adapters of column/row-parallel linears are sharded like their weights)."""
    nproc, extra = layout
    common = [
        "--micro-batch-size", "2", "--global-batch-size", "4", "--lr-decay-iters", "6",
        "--pretrained-checkpoint", str(straight / "ckpt"), "--lora-rank", "4",
        "--lora-alpha", "8", "--lr", "2e-2", *extra,
    ]  # fmt: skip
    sft_run(fiqa_sft, tmp_path / "whole", *common, "--train-iters", "6", nproc=nproc)
    ck = str(tmp_path / "ck")
    sft_run(fiqa_sft, tmp_path / "a", *common, "--train-iters", "3", "--save", ck, nproc=nproc)
    sft_run(fiqa_sft, tmp_path / "b", *common, "--train-iters", "6", "--save", ck, nproc=nproc)
    want, first, second = losses(tmp_path / "whole"), losses(tmp_path / "a"), losses(tmp_path / "b")
    assert sorted(first) == [1, 2, 3] and sorted(second) == [4, 5, 6]
    assert want[6] < want[1]
    for i in range(1, 7):
        assert (first | second)[i] == want[i], (i, first | second, want)


@pytest.mark.slow
def test_lora_tp2_and_dp2_train_like_one_process(fiqa_sft, straight, tmp_path):
    """LoRA SFT at TP=2, and at DP=2 with the distributed optimizer (adapters only in its
    buffers), follows one process: the same losses and the same gradient norm. The norm is
    the check that megatron-core counts each adapter once: a sharded adapter on every rank, a
    replicated one on TP rank 0 (before the adapters carried TP attributes, TP=2 reported
    0.0717 against TP=1's 0.0742 at iteration 1 and then failed in the norm's all-reduce)."""
    from test_train import metrics

    common = [
        "--micro-batch-size", "2", "--global-batch-size", "4", "--lr-decay-iters", "6",
        "--pretrained-checkpoint", str(straight / "ckpt"), "--lora-rank", "4",
        "--lora-alpha", "8", "--lr", "2e-2", "--train-iters", "6",
    ]  # fmt: skip
    sft_run(fiqa_sft, tmp_path / "tp1", *common)
    sft_run(fiqa_sft, tmp_path / "tp2", *common, "--tensor-model-parallel-size", "2", nproc=2)
    sft_run(fiqa_sft, tmp_path / "dp2", *common, "--use-distributed-optimizer", nproc=2)
    one = metrics(tmp_path / "tp1")
    assert [r["iteration"] for r in one] == list(range(1, 7))
    for other in ("tp2", "dp2"):
        two = metrics(tmp_path / other)
        assert [r["iteration"] for r in two] == list(range(1, 7)), other
        for a, b in zip(one, two):
            assert b["lm_loss"] == pytest.approx(a["lm_loss"], rel=1e-5), (other, a, b)
            assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4), (other, a, b)
    assert one[-1]["lm_loss"] < one[0]["lm_loss"]
