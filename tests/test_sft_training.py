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
