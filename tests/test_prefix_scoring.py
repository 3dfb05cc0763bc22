"""The prompt-cached label scorer equals the one-sequence-per-answer scorer (random Llama)."""

from __future__ import annotations

import torch

from megatron_cpt.evaluation.instruct import label_choice, label_logprobs, macro_f1
from megatron_cpt.evaluation.prefix_scoring import cached_label_logprobs


class TinyHF:
    """An HFBackend-shaped wrapper (model, device, max_length, logits) of a random Llama."""

    def __init__(self):
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        )  # fmt: skip
        self.model = LlamaForCausalLM(config).eval()
        self.device = torch.device("cpu")
        self.max_length = 128

    @torch.inference_mode()
    def logits(self, input_ids):
        return self.model(input_ids=input_ids, use_cache=False).logits.float()


def test_cached_scores_equal_uncached():
    backend = TinyHF()
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 97, (n,), generator=gen).tolist() for n in (5, 17, 40)]
    answers = [[3, 9], [4], [5, 6, 7], [8, 2]]  # unequal lengths: right padding is exercised
    want = label_logprobs(backend, prompts, answers, batch_size=3)
    got = cached_label_logprobs(backend, prompts, answers)
    for row_want, row_got in zip(want, got):
        for a, b in zip(row_want, row_got):
            assert abs(a.logprob - b.logprob) <= 1e-4 and a.ntokens == b.ntokens
            assert a.greedy == b.greedy
    forms = [[[3, 9], [4]], [[5, 6, 7], [8, 2]]]
    p1, _ = label_choice(backend, prompts, forms)
    p2, _ = label_choice(backend, prompts, forms, table_fn=cached_label_logprobs)
    assert p1 == p2


def test_macro_f1_worked_example():
    # gold 0 0 1 2, pred 0 1 1 1: class 0 P=1 R=.5 F=2/3; class 1 P=1/3 R=1 F=.5; class 2 F=0
    assert abs(macro_f1([0, 0, 1, 2], [0, 1, 1, 1], 3) - (2 / 3 + 0.5 + 0) / 3) < 1e-12
