"""Merging megatron-core checkpoints directly: the result, exported, must equal the merge of the
HF exports bit for bit (TP=2 checkpoints, odd vocabulary so TP padding is exercised)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_cpt.errors import UserError
from megatron_cpt.merge import MergeOptions, merge_checkpoints, methods, parse_config

pytest.importorskip("megatron.core")

VOCAB, HIDDEN, FFN, LAYERS, HEADS, KV = 515, 64, 96, 2, 4, 2  # 515 pads to 768 at TP=2


def write_hf(path: Path, seed: int, base: dict | None = None) -> dict:
    """A random HF Llama (tied embeddings); with ``base``, base + a random 'fine-tuning' delta."""
    from transformers import LlamaConfig

    g = torch.Generator().manual_seed(seed)
    hd = HIDDEN // HEADS
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN), "model.norm.weight": (HIDDEN,)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (HIDDEN,),
            p + "post_attention_layernorm.weight": (HIDDEN,),
            p + "self_attn.q_proj.weight": (HEADS * hd, HIDDEN),
            p + "self_attn.k_proj.weight": (KV * hd, HIDDEN),
            p + "self_attn.v_proj.weight": (KV * hd, HIDDEN),
            p + "self_attn.o_proj.weight": (HIDDEN, HEADS * hd),
            p + "mlp.gate_proj.weight": (FFN, HIDDEN),
            p + "mlp.up_proj.weight": (FFN, HIDDEN),
            p + "mlp.down_proj.weight": (HIDDEN, FFN),
        }
    tensors = {}
    for name, shape in shapes.items():
        noise = torch.randn(shape, generator=g) * 0.1
        tensors[name] = (noise if base is None else base[name].float() + 0.3 * noise).to(
            torch.bfloat16
        )
    path.mkdir(parents=True)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=FFN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV,
        tie_word_embeddings=True,
        max_position_embeddings=128,
        rope_theta=10000.0,
        dtype="bfloat16",
    ).save_pretrained(path)
    return tensors


def load_dir(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        out |= load_file(str(file))
    return out


@pytest.fixture(scope="module")
def mc(tmp_path_factory):
    """base / a / b as HF, imported to Megatron at TP=2, and exported back (the 'HF exports')."""
    from megatron_cpt.convert.exporter import ExportConfig, export_hf
    from megatron_cpt.convert.importer import ImportConfig, import_hf

    root = tmp_path_factory.mktemp("mc")
    base = write_hf(root / "hf-base", 0)
    write_hf(root / "hf-a", 1, base)
    write_hf(root / "hf-b", 2, base)
    out = {}
    for name in ("base", "a", "b"):
        import_hf(
            ImportConfig(str(root / f"hf-{name}"), str(root / f"mc-{name}"), tensor_parallel=2)
        )
        export_hf(ExportConfig(str(root / f"mc-{name}"), str(root / f"export-{name}")))
        out[name] = root / f"mc-{name}"
        out[f"export-{name}"] = root / f"export-{name}"
    return out


def recipe(method: str, paths: dict, prefix: str) -> dict:
    base = str(paths[f"{prefix}base"])
    if method == "slerp":
        return {
            "merge_method": "slerp",
            "base_model": base,
            "models": [{"model": base}, {"model": str(paths[f"{prefix}a"])}],
            "parameters": {"t": [{"filter": "mlp", "value": 0.7}, {"value": 0.4}]},
        }
    return {
        "merge_method": method,
        "base_model": base,
        "models": [
            {"model": str(paths[f"{prefix}a"]), "parameters": {"weight": 0.8, "density": 0.3}},
            {"model": str(paths[f"{prefix}b"]), "parameters": {"weight": 0.6, "density": 0.6}},
        ],
        "parameters": {"lambda": 1.1},
    }


@pytest.mark.parametrize("method", ["ties", "dare_ties", "slerp"])
def test_megatron_merge_equals_merge_of_hf_exports(mc, tmp_path, method):
    from megatron_cpt.convert.exporter import ExportConfig, export_hf
    from megatron_cpt.training.checkpointing import read_metadata

    options = MergeOptions(progress=False, random_seed=5)
    merge_checkpoints(parse_config(recipe(method, mc, "")), tmp_path / "mc-merged", options)
    meta = read_metadata(tmp_path / "mc-merged")
    assert meta["padded_vocab_size"] == 768  # still loadable at the base's TP=2
    assert meta["args"]["target_tensor_parallel"] == read_metadata(mc["base"])["tensor_parallel"]
    export_hf(ExportConfig(str(tmp_path / "mc-merged"), str(tmp_path / "exported")))

    merge_checkpoints(parse_config(recipe(method, mc, "export-")), tmp_path / "hf-merged", options)
    from_megatron, from_hf = load_dir(tmp_path / "exported"), load_dir(tmp_path / "hf-merged")
    base = load_dir(mc["export-base"])
    assert from_megatron.keys() == from_hf.keys() == base.keys()
    for name, tensor in from_hf.items():
        assert from_megatron[name].dtype == tensor.dtype == torch.bfloat16, name
        assert torch.equal(from_megatron[name], tensor), name
        assert not torch.equal(tensor, base[name]), name  # the merge did change every tensor


def test_trimming_the_fused_qkv_would_not_equal_the_hf_merge(mc):
    """Why merging happens on split q/k/v: TIES's top-k over the fused Megatron tensor keeps a
    different set than top-k per projection (the k/v deltas are smaller here)."""
    from megatron_cpt.convert.mapping import fuse_qkv
    from megatron_cpt.merge.megatron_io import MegatronCheckpoint

    ckpt = MegatronCheckpoint(mc["a"])
    q, k, v = (ckpt.get(f"model.layers.0.self_attn.{p}_proj.weight").float() for p in "qkv")
    k, v = k * 0.5, v * 0.5
    per_projection = fuse_qkv(*(methods.magnitude_trim(t, 0.3) for t in (q, k, v)), ckpt.layout)
    fused = methods.magnitude_trim(fuse_qkv(q, k, v, ckpt.layout), 0.3)
    assert not torch.equal(fused, per_projection)


def test_megatron_view_is_the_hf_export(mc):
    from megatron_cpt.merge.megatron_io import MegatronCheckpoint

    ckpt = MegatronCheckpoint(mc["b"])
    exported = load_dir(mc["export-b"])
    assert ckpt.names and set(ckpt.names) == set(exported)
    for name in ckpt.names:
        assert torch.equal(ckpt.get(name), exported[name]), name
        assert ckpt.info(name).shape == tuple(exported[name].shape)


def test_mixing_megatron_and_hf_inputs_is_a_one_line_error(mc, tmp_path):
    config = recipe("ties", mc, "")
    config["models"][1]["model"] = str(mc["export-b"])
    with pytest.raises(UserError, match="mixing Megatron .* and HF inputs is not supported"):
        merge_checkpoints(parse_config(config), tmp_path / "out", MergeOptions(progress=False))
    assert not (tmp_path / "out").exists()


def test_megatron_output_keeps_side_files(mc, tmp_path):
    merge_checkpoints(
        parse_config(recipe("ties", mc, "")), tmp_path / "o", MergeOptions(progress=False)
    )
    assert json.loads((tmp_path / "o" / "hf" / "config.json").read_text())["vocab_size"] == VOCAB
    assert (tmp_path / "o" / "merge_config.yml").exists()
