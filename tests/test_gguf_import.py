"""GGUF input is read a tensor at a time and equals what transformers loads from the same file.

Tiny random Llamas are written as GGUF the way llama.cpp's converter writes them
(``tests/gguf_files.py``: q/k rows permuted for its interleaved RoPE, matrices quantized), so the reader's un-permutation and dequantization are checked on every layout
without the 93 MB embedded model; the real SmolLM2-135M-Instruct GGUF is checked too."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_cpt.convert.hf_reader import open_hf_checkpoint
from megatron_cpt.convert.importer import ImportConfig, import_hf
from megatron_cpt.convert.loading import load_megatron_model, megatron_logits
from megatron_cpt.errors import UserError
from tests.gguf_files import write_llama_gguf
from tests.test_convert import TOL, hf_logits, make_tiny_hf, sample_ids
from tests.test_streaming_import import assert_bf16_cast_of

REPO = Path(__file__).resolve().parent.parent


# GQA/untied with Q8_0 matrices (every row length a multiple of its 32-value blocks), MHA/tied
# with F16 (its ffn of 80 is not). GGUF carries no llama3 RoPE scaling (see the refusal test).
GGUF_CASES = {"gqa-untied-llama3": "Q8_0", "mha-tied": "F16"}


def transformers_gguf_model(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    ).eval()


def assert_reader_equals_transformers(path: Path) -> None:
    reference = transformers_gguf_model(path)
    expected = reference.state_dict()
    with open_hf_checkpoint(path) as ckpt:
        tied = reference.config.tie_word_embeddings
        assert ckpt.names() == set(expected) - ({"lm_head.weight"} if tied else set())
        for name in sorted(ckpt.names()):
            assert ckpt.shape(name) == tuple(expected[name].shape), name
            tensor = ckpt.get(name)
            assert tensor.dtype == torch.float32
            assert torch.equal(tensor, expected[name]), name
        assert ckpt.config.to_dict() == {
            k: v
            for k, v in reference.config.to_dict().items()
            if k not in ("quantization_config", "dtype")  # from_pretrained's own additions
        } | {"dtype": None}


@pytest.fixture(scope="module")
def tiny_ggufs(tmp_path_factory):
    out = {}
    for name, matrix_type in GGUF_CASES.items():
        root = tmp_path_factory.mktemp(f"gguf-{name}")
        model = make_tiny_hf(name, root / "hf", rope_scaling=None)
        path = root / f"{name}.{matrix_type}.gguf"
        out[name] = write_llama_gguf(model.config, model.state_dict().items(), path, matrix_type)
    return out


@pytest.mark.parametrize("name", list(GGUF_CASES))
def test_gguf_reader_equals_transformers_from_pretrained(tiny_ggufs, name):
    assert_reader_equals_transformers(tiny_ggufs[name])


@pytest.mark.slow
def test_real_smollm2_gguf_reader_equals_transformers_from_pretrained(smollm2_gguf):
    """Q8_0 embedding, Q4_1 matrices, F32 norms, tied head: all 272 tensors, bit for bit."""
    assert_reader_equals_transformers(smollm2_gguf)


@pytest.mark.parametrize("name", list(GGUF_CASES))
def test_gguf_import_logits_parity(tiny_ggufs, tmp_path, name):
    path = tiny_ggufs[name]
    import_hf(ImportConfig(str(path), str(tmp_path / "mc")))
    reference = transformers_gguf_model(path)
    model, arch = load_megatron_model(tmp_path / "mc")
    ids = sample_ids(arch.vocab_size)
    diff = (megatron_logits(model, ids, arch.vocab_size) - hf_logits(reference, ids)).abs().max()
    print(f"{name} from GGUF TP=1 max |logits diff| {diff:.3g}")
    assert hf_logits(reference, ids).abs().max() > 1.0
    assert diff <= TOL, f"{name} from GGUF: max |logits diff| {diff:.3g}"


def test_gguf_with_llama3_rope_factors_is_refused(tmp_path):
    """llama.cpp stores Llama-3.1's RoPE scaling as a ``rope_freqs`` tensor that transformers'
    GGUF loader drops: converting it would silently lose the scaling, so it is refused."""
    model = make_tiny_hf("mha-tied", tmp_path / "hf")
    factors = np.ones(model.config.hidden_size // model.config.num_attention_heads // 2, np.float32)
    path = write_llama_gguf(
        model.config,
        model.state_dict().items(),
        tmp_path / "llama31.gguf",
        "F16",
        extra_tensors=[("rope_freqs.weight", factors)],
    )
    with pytest.raises(UserError, match=r"rope_freqs\.weight"):
        open_hf_checkpoint(path)
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "convert_checkpoint.py"), "hf-to-mcore",
         "--hf", str(path), "--out", str(tmp_path / "mc")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "rope_freqs.weight" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "mc").exists()


def test_unsupported_gguf_architecture_is_refused(tmp_path):
    model = make_tiny_hf("mha-tied", tmp_path / "hf")
    path = tmp_path / "gemma.gguf"
    write_llama_gguf(model.config, model.state_dict().items(), path, "F16", architecture="gemma")
    with pytest.raises(
        UserError, match="general.architecture is 'gemma'; GGUFs of llama, qwen2, qwen3 convert"
    ):
        open_hf_checkpoint(path)


def test_unreadable_gguf_is_one_line(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 20)
    with pytest.raises(UserError, match=r"broken\.gguf: not a readable GGUF file"):
        open_hf_checkpoint(bad)
    with pytest.raises(UserError, match="no such file"):
        open_hf_checkpoint(tmp_path / "missing.gguf")


def test_gguf_import_to_bfloat16_is_the_cast_of_the_float32_import(tiny_ggufs, tmp_path):
    """``--dtype bfloat16`` dequantizes straight into bf16 a chunk at a time (no float32 copy
    of the tensor): the values must be exactly the float32 import's, cast."""
    from safetensors.torch import load_file

    from megatron_cpt.convert.exporter import ExportConfig, export_hf

    path = tiny_ggufs["gqa-untied-llama3"]
    for dtype in ("float32", "bfloat16"):
        import_hf(ImportConfig(str(path), str(tmp_path / f"mc_{dtype}"), dtype=dtype))
        export_hf(ExportConfig(str(tmp_path / f"mc_{dtype}"), str(tmp_path / f"hf_{dtype}")))
    assert_bf16_cast_of(
        load_file(tmp_path / "hf_bfloat16" / "model.safetensors"),
        load_file(tmp_path / "hf_float32" / "model.safetensors"),
    )
