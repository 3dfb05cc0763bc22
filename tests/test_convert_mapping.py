"""The HF <-> megatron-core tensor layout rules, checked against a direct head-by-head
construction (no megatron model involved; the parity tests prove the rules are megatron's)."""

from __future__ import annotations

import pytest
import torch

from megatron_cpt.convert.mapping import (
    TensorLayout,
    expected_hf_shapes,
    fuse_gate_up,
    fuse_qkv,
    hf_group_names,
    hf_to_mcore_group,
    mcore_group_names,
    mcore_to_hf_group,
    pad_vocab,
    split_gate_up,
    split_qkv,
    unpad_vocab,
)
from megatron_cpt.convert.tp import tp_shard
from megatron_cpt.errors import UserError


def layout(heads=6, groups=2, head_dim=4, hidden=12, ffn=20, vocab=37, padded=64, tied=False):
    return TensorLayout(
        num_layers=2,
        hidden_size=hidden,
        num_attention_heads=heads,
        num_query_groups=groups,
        head_dim=head_dim,
        ffn_hidden_size=ffn,
        vocab_size=vocab,
        padded_vocab_size=padded,
        tie_word_embeddings=tied,
    )


def qkv_by_hand(q, k, v, lay):
    """megatron-core's fused QKV rows, built head by head: for each query group g, the q heads
    that attend with kv head g (HF's repeat_kv order), then k head g, then v head g."""
    hd, hpg = lay.head_dim, lay.heads_per_group
    rows = []
    for g in range(lay.num_query_groups):
        for h in range(g * hpg, (g + 1) * hpg):
            rows.append(q[h * hd : (h + 1) * hd])
        rows.append(k[g * hd : (g + 1) * hd])
        rows.append(v[g * hd : (g + 1) * hd])
    return torch.cat(rows)


@pytest.mark.parametrize("heads,groups", [(6, 2), (6, 6), (6, 1), (4, 4)])
def test_fuse_qkv_matches_head_by_head_construction(heads, groups):
    lay = layout(heads=heads, groups=groups)
    q = torch.randn(heads * lay.head_dim, lay.hidden_size)
    k = torch.randn(groups * lay.head_dim, lay.hidden_size)
    v = torch.randn(groups * lay.head_dim, lay.hidden_size)
    fused = fuse_qkv(q, k, v, lay)
    assert torch.equal(fused, qkv_by_hand(q, k, v, lay))
    q2, k2, v2 = split_qkv(fused, lay)
    assert torch.equal(q2, q) and torch.equal(k2, k) and torch.equal(v2, v)


def test_gate_up_and_vocab_padding_invert():
    gate, up = torch.randn(20, 12), torch.randn(20, 12)
    fc1 = fuse_gate_up(gate, up)
    assert torch.equal(fc1[:20], gate) and torch.equal(fc1[20:], up)
    g2, u2 = split_gate_up(fc1)
    assert torch.equal(g2, gate) and torch.equal(u2, up)
    emb = torch.randn(37, 12)
    padded = pad_vocab(emb, 64)
    assert padded.shape == (64, 12) and torch.equal(padded[:37], emb)
    assert not padded[37:].any()
    assert torch.equal(unpad_vocab(padded, 37), emb)


@pytest.mark.parametrize("tied", [False, True])
def test_group_mapping_round_trips_every_tensor(tied):
    lay = layout(tied=tied)
    shapes = expected_hf_shapes(lay)
    hf = {name: torch.randn(shape) for name, shape in shapes.items()}
    mc = {}
    for names in hf_group_names(lay):
        mc.update(hf_to_mcore_group(names, hf.__getitem__, lay))
    assert mc["embedding.word_embeddings.weight"].shape == (lay.padded_vocab_size, lay.hidden_size)
    assert ("output_layer.weight" in mc) is not tied
    back = {}
    for names in mcore_group_names(lay):
        assert set(names) <= set(mc)
        back.update(mcore_to_hf_group(names, mc.__getitem__, lay))
    assert back.keys() == hf.keys()
    for name in hf:
        assert torch.equal(back[name], hf[name]), name


def test_tp_shards_follow_megatron_parallel_layout():
    lay = layout(heads=8, groups=4, head_dim=2, hidden=8, ffn=12, padded=64)
    tp = 2
    q = torch.randn(8 * 2, 8)
    k, v = torch.randn(4 * 2, 8), torch.randn(4 * 2, 8)
    qkv = fuse_qkv(q, k, v, lay)
    half = layout(heads=4, groups=2, head_dim=2, hidden=8, ffn=6, vocab=32, padded=32)
    for rank in range(tp):
        # rank r holds query groups [2r, 2r+1] with their own q heads: a TP=2 attention layer
        # built from the corresponding slices of q/k/v
        q_r, k_r, v_r = (
            q[rank * 8 : (rank + 1) * 8],
            k[rank * 4 : (rank + 1) * 4],
            v[rank * 4 : (rank + 1) * 4],
        )
        assert torch.equal(
            tp_shard("x.linear_qkv.weight", qkv, tp, rank), fuse_qkv(q_r, k_r, v_r, half)
        )
    gate, up = torch.randn(12, 8), torch.randn(12, 8)
    fc1 = fuse_gate_up(gate, up)
    for rank in range(tp):
        want = torch.cat([gate[rank * 6 : (rank + 1) * 6], up[rank * 6 : (rank + 1) * 6]])
        assert torch.equal(tp_shard("x.mlp.linear_fc1.weight", fc1, tp, rank), want)
    o = torch.randn(8, 16)
    assert torch.equal(tp_shard("x.linear_proj.weight", o, tp, 1), o[:, 8:])
    emb = torch.randn(64, 8)
    assert torch.equal(tp_shard("embedding.word_embeddings.weight", emb, tp, 1), emb[32:])
    norm = torch.randn(8)
    assert tp_shard("x.input_layernorm.weight", norm, tp, 1) is norm
    with pytest.raises(UserError, match="not divisible by TP=3"):
        tp_shard("x.linear_proj.weight", o, 3, 0)


def test_layout_rejects_inconsistent_heads():
    with pytest.raises(UserError, match="num_key_value_heads=4"):
        layout(heads=6, groups=4)
