"""Name and layout mapping between HF Llama-layout tensors and megatron-core ``GPTModel`` tensors.

The HF names of one decoder layer come from the model family (``megatron_cpt.model.families``:
Qwen2 adds q/k/v biases, Qwen3 per-head q/k norms); the transforms here are shared by all.

Everything here is a pure tensor function so it can be proven against a direct computation and
reused by both directions and by any TP/PP layout. The megatron side is always the *global*
(TP=1) view: megatron-core's ``sharded_state_dict`` describes every parameter by its global
shape, so a checkpoint written from the global view loads at any TP/PP through
``dist_checkpointing`` and re-sharding needs no code of ours.

Layout facts the mapping encodes (each checked by logits parity in the tests):

- ``linear_qkv`` is fused per query group: ``[q heads of group 0, k_0, v_0, q heads of group 1,
  ...]``, so a contiguous TP split hands every rank whole groups.
- ``linear_fc1`` is ``[gate; up]``; megatron-core's SwiGLU takes ``silu(first half) * second``.
- HF Llama q/k weights are already in the rotate-half order that megatron-core's non-interleaved
  ``apply_rotary_pos_emb`` uses, so no head permutation is needed (Meta's original checkpoints
  were interleaved; HF's conversion script permuted them once, at import into HF).
- Qwen2's q/k/v biases fuse into ``linear_qkv.bias`` in the same per-group order as the weight.
- Qwen3's ``q_norm``/``k_norm`` (one ``head_dim`` weight each) are megatron-core's
  ``q_layernorm``/``k_layernorm`` unchanged.
- Vocabulary rows are padded with zeros to a TP-divisible size on import and cut on export.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from megatron_cpt.errors import UserError


@dataclass(frozen=True)
class TensorLayout:
    """The shapes the mapping needs; derived from an HF config or the model arch."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    ffn_hidden_size: int
    vocab_size: int
    padded_vocab_size: int
    tie_word_embeddings: bool
    # TE spec fuses the pre-attention / pre-MLP RMSNorm into the following linear; the local
    # spec keeps them as separate modules. The checkpoint (sharded) keys are the TE names for
    # both, but plain ``state_dict()`` keys differ, so the caller picks.
    fused_norms: bool = False
    family: str = "llama"  # the HF model_type: which tensors a decoder layer has
    qkv_bias: bool = False
    qk_norm: bool = False

    def __post_init__(self):
        if self.num_attention_heads % self.num_query_groups:
            raise UserError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_query_groups}"
            )
        if self.padded_vocab_size < self.vocab_size:
            raise UserError(
                f"padded_vocab_size={self.padded_vocab_size} < vocab_size={self.vocab_size}"
            )

    @property
    def heads_per_group(self) -> int:
        return self.num_attention_heads // self.num_query_groups


# ---------------------------------------------------------------------------------------------
# Tensor layout transforms


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lay: TensorLayout) -> torch.Tensor:
    """HF q/k/v projections -> megatron's per-group interleaved ``linear_qkv`` weight."""
    ng, hpg, hd = lay.num_query_groups, lay.heads_per_group, lay.head_dim
    hidden = q.shape[-1]
    q = q.reshape(ng, hpg * hd, hidden)
    k = k.reshape(ng, hd, hidden)
    v = v.reshape(ng, hd, hidden)
    return torch.cat([q, k, v], dim=1).reshape(ng * (hpg + 2) * hd, hidden)


def split_qkv(
    qkv: torch.Tensor, lay: TensorLayout
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`fuse_qkv` (clones, so the result owns compact storage)."""
    ng, hpg, hd = lay.num_query_groups, lay.heads_per_group, lay.head_dim
    hidden = qkv.shape[-1]
    grouped = qkv.reshape(ng, (hpg + 2) * hd, hidden)
    q = grouped[:, : hpg * hd].reshape(ng * hpg * hd, hidden).clone()
    k = grouped[:, hpg * hd : (hpg + 1) * hd].reshape(ng * hd, hidden).clone()
    v = grouped[:, (hpg + 1) * hd :].reshape(ng * hd, hidden).clone()
    return q, k, v


def fuse_qkv_bias(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lay: TensorLayout
) -> torch.Tensor:
    """q/k/v biases -> ``linear_qkv.bias``, grouped exactly like the weight's rows."""
    return fuse_qkv(q[:, None], k[:, None], v[:, None], lay)[:, 0]


def split_qkv_bias(
    qkv: torch.Tensor, lay: TensorLayout
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q, k, v = split_qkv(qkv[:, None], lay)
    return q[:, 0].clone(), k[:, 0].clone(), v[:, 0].clone()


def fuse_gate_up(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return torch.cat([gate, up], dim=0)


def split_gate_up(fc1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    gate, up = torch.chunk(fc1, 2, dim=0)
    return gate.clone(), up.clone()


def pad_vocab(weight: torch.Tensor, padded_vocab_size: int) -> torch.Tensor:
    """Zero rows up to the padded size: padded token ids never occur in data."""
    extra = padded_vocab_size - weight.shape[0]
    if extra == 0:
        return weight
    return torch.cat([weight, weight.new_zeros(extra, *weight.shape[1:])], dim=0)


def unpad_vocab(weight: torch.Tensor, vocab_size: int) -> torch.Tensor:
    return weight[:vocab_size].clone() if weight.shape[0] != vocab_size else weight


# ---------------------------------------------------------------------------------------------
# Names


def hf_layer_names(i: int, family: str = "llama") -> dict[str, str]:
    """Role -> HF tensor name of decoder layer ``i``, as the family module spells it."""
    from megatron_cpt.model.families import get_family

    return get_family(family).hf_layer_names(i)


def mcore_layer_names(
    i: int, fused_norms: bool = False, qkv_bias: bool = False, qk_norm: bool = False
) -> dict[str, str]:
    p = f"decoder.layers.{i}."
    names = {
        "input_norm": p
        + (
            "self_attention.linear_qkv.layer_norm_weight"
            if fused_norms
            else "input_layernorm.weight"
        ),
        "qkv": p + "self_attention.linear_qkv.weight",
        "o": p + "self_attention.linear_proj.weight",
        "post_norm": p
        + ("mlp.linear_fc1.layer_norm_weight" if fused_norms else "pre_mlp_layernorm.weight"),
        "fc1": p + "mlp.linear_fc1.weight",
        "fc2": p + "mlp.linear_fc2.weight",
    }
    if qkv_bias:
        names["qkv_bias"] = p + "self_attention.linear_qkv.bias"
    if qk_norm:
        names["q_layernorm"] = p + "self_attention.q_layernorm.weight"
        names["k_layernorm"] = p + "self_attention.k_layernorm.weight"
    return names


def _hf_names(i: int, lay: TensorLayout) -> dict[str, str]:
    return hf_layer_names(i, lay.family)


def _mc_names(i: int, lay: TensorLayout) -> dict[str, str]:
    return mcore_layer_names(i, lay.fused_norms, lay.qkv_bias, lay.qk_norm)


HF_EMBED = "model.embed_tokens.weight"
HF_FINAL_NORM = "model.norm.weight"
HF_LM_HEAD = "lm_head.weight"
MC_EMBED = "embedding.word_embeddings.weight"
MC_FINAL_NORM = "decoder.final_layernorm.weight"
MC_OUTPUT = "output_layer.weight"


# ---------------------------------------------------------------------------------------------
# Groups: the unit of streaming. One group = embeddings, one transformer layer, or the head.

Getter = Callable[[str], torch.Tensor]


def hf_group_names(lay: TensorLayout) -> Iterator[list[str]]:
    """HF tensor names by group, in the order a converter should stream them."""
    yield [HF_EMBED]
    for i in range(lay.num_layers):
        yield list(_hf_names(i, lay).values())
    head = [HF_FINAL_NORM]
    if not lay.tie_word_embeddings:
        head.append(HF_LM_HEAD)
    yield head


def hf_to_mcore_tensor(name: str, get: Getter, lay: TensorLayout) -> torch.Tensor:
    """One megatron global tensor, made from the HF tensors it consists of: the unit a
    streaming import writes (see ``convert/streaming_save.py``)."""
    if name == MC_EMBED:
        return pad_vocab(get(HF_EMBED), lay.padded_vocab_size)
    if name == MC_FINAL_NORM:
        return get(HF_FINAL_NORM)
    if name == MC_OUTPUT and not lay.tie_word_embeddings:
        return pad_vocab(get(HF_LM_HEAD), lay.padded_vocab_size)
    parts = name.split(".")
    if name.startswith("decoder.layers.") and parts[2].isdigit():
        i = int(parts[2])
        role = {v: k for k, v in _mc_names(i, lay).items()}.get(name)
        h = _hf_names(i, lay)
        if role == "qkv":
            return fuse_qkv(get(h["q"]), get(h["k"]), get(h["v"]), lay)
        if role == "qkv_bias":
            return fuse_qkv_bias(get(h["q_bias"]), get(h["k_bias"]), get(h["v_bias"]), lay)
        if role == "fc1":
            return fuse_gate_up(get(h["gate"]), get(h["up"]))
        if role is not None:
            return get(h[_SAME_TENSOR[role]])
    raise KeyError(f"{name} is not a tensor of this {lay.family} layout")


_SAME_TENSOR = {
    "input_norm": "input_norm",
    "o": "o",
    "post_norm": "post_norm",
    "fc2": "down",
    "q_layernorm": "q_norm",
    "k_layernorm": "k_norm",
}


def hf_to_mcore_group(names: list[str], get: Getter, lay: TensorLayout) -> dict[str, torch.Tensor]:
    """Map one HF group (as yielded by :func:`hf_group_names`) to megatron global tensors."""
    if names == [HF_EMBED]:
        targets = [MC_EMBED]
    elif names[0] == HF_FINAL_NORM:
        targets = [MC_FINAL_NORM] + ([] if lay.tie_word_embeddings else [MC_OUTPUT])
    else:
        targets = list(_mc_names(int(names[0].split(".")[2]), lay).values())
    return {t: hf_to_mcore_tensor(t, get, lay) for t in targets}


def mcore_group_names(lay: TensorLayout) -> Iterator[list[str]]:
    yield [MC_EMBED]
    for i in range(lay.num_layers):
        yield list(_mc_names(i, lay).values())
    head = [MC_FINAL_NORM]
    if not lay.tie_word_embeddings:
        head.append(MC_OUTPUT)
    yield head


def mcore_group_order(lay: TensorLayout) -> Callable[[str], int]:
    """Megatron name -> its group's position (embedding 0, layer i at i + 1, head last): the
    write order for a streaming save whose source works a group at a time."""
    index = {n: i for i, group in enumerate(mcore_group_names(lay)) for n in group}
    return index.__getitem__


def mcore_to_hf_group(names: list[str], get: Getter, lay: TensorLayout) -> dict[str, torch.Tensor]:
    """Inverse of :func:`hf_to_mcore_group` for one megatron group."""
    if names == [MC_EMBED]:
        return {HF_EMBED: unpad_vocab(get(MC_EMBED), lay.vocab_size)}
    if names[0] == MC_FINAL_NORM:
        out = {HF_FINAL_NORM: get(MC_FINAL_NORM)}
        if not lay.tie_word_embeddings:
            out[HF_LM_HEAD] = unpad_vocab(get(MC_OUTPUT), lay.vocab_size)
        return out
    i = int(names[0].split(".")[2])
    h, m = _hf_names(i, lay), _mc_names(i, lay)
    q, k, v = split_qkv(get(m["qkv"]), lay)
    gate, up = split_gate_up(get(m["fc1"]))
    out = {
        h["input_norm"]: get(m["input_norm"]),
        h["q"]: q,
        h["k"]: k,
        h["v"]: v,
        h["o"]: get(m["o"]),
        h["post_norm"]: get(m["post_norm"]),
        h["gate"]: gate,
        h["up"]: up,
        h["down"]: get(m["fc2"]),
    }
    if lay.qkv_bias:
        qb, kb, vb = split_qkv_bias(get(m["qkv_bias"]), lay)
        out.update({h["q_bias"]: qb, h["k_bias"]: kb, h["v_bias"]: vb})
    if lay.qk_norm:
        out.update({h["q_norm"]: get(m["q_layernorm"]), h["k_norm"]: get(m["k_layernorm"])})
    return out


def expected_hf_shapes(lay: TensorLayout) -> dict[str, tuple[int, ...]]:
    """Every HF tensor the layout implies, with its shape: the check a checkpoint must pass."""
    hs, hd, ffn = lay.hidden_size, lay.head_dim, lay.ffn_hidden_size
    shapes: dict[str, tuple[int, ...]] = {HF_EMBED: (lay.vocab_size, hs), HF_FINAL_NORM: (hs,)}
    if not lay.tie_word_embeddings:
        shapes[HF_LM_HEAD] = (lay.vocab_size, hs)
    q_rows, kv_rows = lay.num_attention_heads * hd, lay.num_query_groups * hd
    for i in range(lay.num_layers):
        n = _hf_names(i, lay)
        if lay.qkv_bias:
            shapes.update(
                {n["q_bias"]: (q_rows,), n["k_bias"]: (kv_rows,), n["v_bias"]: (kv_rows,)}
            )
        if lay.qk_norm:
            shapes.update({n["q_norm"]: (hd,), n["k_norm"]: (hd,)})
        shapes.update(
            {
                n["input_norm"]: (hs,),
                n["q"]: (lay.num_attention_heads * hd, hs),
                n["k"]: (lay.num_query_groups * hd, hs),
                n["v"]: (lay.num_query_groups * hd, hs),
                n["o"]: (hs, lay.num_attention_heads * hd),
                n["post_norm"]: (hs,),
                n["gate"]: (ffn, hs),
                n["up"]: (ffn, hs),
                n["down"]: (hs, ffn),
            }
        )
    return shapes
