"""The streaming HF -> Megatron import writes the same checkpoint megatron-core's own save writes
from a filled model, while holding one tensor at a time."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from megatron_cpt.convert import importer as importer_module
from megatron_cpt.convert.hf_reader import open_hf_checkpoint
from megatron_cpt.convert.importer import ImportConfig, import_hf
from megatron_cpt.convert.layout import tensor_layout
from megatron_cpt.convert.loading import load_megatron_model
from megatron_cpt.convert.mapping import hf_group_names, hf_to_mcore_group
from megatron_cpt.model import (
    ModelBuildConfig,
    build_model,
    build_transformer_config,
    from_hf_config,
    padded_vocab_size,
)
from megatron_cpt.training.checkpointing import save_checkpoint
from tests.test_convert import TINY, make_tiny_hf


def save_filled_model_with_megatron_core(hf_dir: Path, out: Path) -> None:
    """The reference: a real (materialized) GPTModel filled from HF and saved by megatron-core's
    default torch_dist strategy, as the importer did before it streamed."""
    from megatron_cpt import platform

    with open_hf_checkpoint(hf_dir) as ckpt:
        arch = from_hf_config(ckpt.config)
        padded = padded_vocab_size(arch.vocab_size, 1, 128)
        lay = tensor_layout(arch, padded)
        platform.initialize_model_parallel(1, 1)
        build = ModelBuildConfig(use_transformer_engine=False)
        config = build_transformer_config(arch, build, perform_initialization=False)
        model = build_model(arch, config, True, True, build=build, vocab_size=padded)
        params = model.state_dict(keep_vars=True)
        with torch.no_grad():
            for names in hf_group_names(lay):
                for name, tensor in hf_to_mcore_group(names, ckpt.get, lay).items():
                    params[name].data.copy_(tensor)
        save_checkpoint(out, 0, [model], arch=arch, save_rng=False, padded_vocab_size=padded)


@pytest.mark.parametrize("name", list(TINY))
def test_streaming_import_equals_megatron_core_save_of_the_filled_model(tmp_path, name):
    from megatron.core import dist_checkpointing

    make_tiny_hf(name, tmp_path / "hf")
    import_hf(ImportConfig(str(tmp_path / "hf"), str(tmp_path / "streamed")))
    save_filled_model_with_megatron_core(tmp_path / "hf", tmp_path / "reference")

    streamed = tmp_path / "streamed" / "iter_0000000"
    reference = tmp_path / "reference" / "iter_0000000"
    for f in ("metadata.json",):
        assert json.loads((streamed / f).read_text()) == json.loads((reference / f).read_text())
    meta_s = dist_checkpointing.load_tensors_metadata(str(streamed))
    meta_r = dist_checkpointing.load_tensors_metadata(str(reference))
    assert meta_s.keys() == meta_r.keys()
    for key in meta_r:
        assert meta_s[key].global_shape == meta_r[key].global_shape, key
        assert meta_s[key].dtype == meta_r[key].dtype, key

    a = load_megatron_model(streamed)[0].state_dict()
    b = load_megatron_model(reference)[0].state_dict()
    assert a.keys() == b.keys()
    for key, tensor in b.items():
        if torch.is_tensor(tensor):
            assert torch.equal(a[key], tensor), key


def test_import_makes_each_parameter_once_and_holds_one_tensor_at_a_time(tmp_path, monkeypatch):
    """The memory bound, checked structurally rather than timed: every megatron tensor is made
    exactly once (the gate/up shards of ``linear_fc1`` share one), and when the next one is made
    at most the previous one still has memory. Memory, not Python objects: torch's writer keeps
    detached views of what it wrote, which hold a tensor's storage after the tensor is gone,
    so the test keeps each storage and looks at its size."""
    make_tiny_hf("gqa-untied-llama3", tmp_path / "hf")
    made: list[str] = []
    storages: list[torch.UntypedStorage] = []
    most_holding_memory_at_a_call = 0
    real = importer_module.hf_to_mcore_tensor

    def tracking(name, get, lay):
        nonlocal most_holding_memory_at_a_call
        tensor = real(name, get, lay)
        if tensor.device.type == "meta":  # the shape-only check before writing
            return tensor
        holding = sum(s.nbytes() > 0 for s in storages)
        most_holding_memory_at_a_call = max(most_holding_memory_at_a_call, holding)
        made.append(name)
        storages.append(tensor.untyped_storage())
        return tensor

    monkeypatch.setattr(importer_module, "hf_to_mcore_tensor", tracking)
    import_hf(ImportConfig(str(tmp_path / "hf"), str(tmp_path / "mc")))

    cfg = TINY["gqa-untied-llama3"]
    # embedding, final norm, untied output + 6 tensors per layer
    assert len(made) == len(set(made)) == 3 + 6 * cfg["num_hidden_layers"]
    assert most_holding_memory_at_a_call <= 1
    assert sum(s.nbytes() > 0 for s in storages) <= 1  # only the last one written


def test_sharded_safetensors_source_imports_like_a_single_file(tmp_path):
    """An HF directory saved in several shards with an index (as 8B/70B checkpoints are) gives
    the same checkpoint as the single-file save of the same model; shards are unmapped between
    tensors, so tensors from different shards must be reopened correctly."""
    model = make_tiny_hf("mha-tied", tmp_path / "hf")
    model.save_pretrained(tmp_path / "hf_sharded", max_shard_size="40KB")
    index = json.loads((tmp_path / "hf_sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3
    import_hf(ImportConfig(str(tmp_path / "hf"), str(tmp_path / "single")))
    import_hf(ImportConfig(str(tmp_path / "hf_sharded"), str(tmp_path / "sharded")))
    a = load_megatron_model(tmp_path / "single")[0].state_dict()
    b = load_megatron_model(tmp_path / "sharded")[0].state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a if torch.is_tensor(a[k]))


def test_dtype_cast_at_import_is_the_cast_of_each_source_tensor(tmp_path):
    """``--dtype bfloat16`` on an fp32 source: every exported tensor is exactly the source
    tensor cast to bf16 (the streaming save casts each tensor as it is made)."""
    from safetensors.torch import load_file

    from megatron_cpt.convert.exporter import ExportConfig, export_hf

    make_tiny_hf("gqa-untied-llama3", tmp_path / "hf", dtype=torch.float32)
    import_hf(ImportConfig(str(tmp_path / "hf"), str(tmp_path / "mc"), dtype="bfloat16"))
    export_hf(ExportConfig(str(tmp_path / "mc"), str(tmp_path / "out")))
    assert_bf16_cast_of(
        load_file(tmp_path / "out" / "model.safetensors"),
        load_file(tmp_path / "hf" / "model.safetensors"),
    )


def assert_bf16_cast_of(narrow: dict, wide: dict) -> None:
    """Every tensor of ``narrow`` is bf16 and exactly its ``wide`` counterpart cast."""
    assert wide.keys() == narrow.keys()
    for name, tensor in wide.items():
        assert narrow[name].dtype == torch.bfloat16, name
        assert torch.equal(narrow[name], tensor.to(torch.bfloat16)), name
