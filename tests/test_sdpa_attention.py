"""SDPA core attention for the local spec against megatron-core's own unfused
``DotProductAttention``: same outputs (fp32, ≤ 1e-5) for causal and explicit
(--reset-attention-mask) masks, GQA, softmax scale and dropout; same parameters and checkpoint
keys; same training losses through tools/pretrain.py; the real SmolLM2 in the slow set."""

from __future__ import annotations

import pytest
import torch

from megatron_cpt import platform
from megatron_cpt.errors import UserError
from megatron_cpt.model import LlamaArch, ModelBuildConfig, build_model, build_transformer_config
from megatron_cpt.model.builder import core_attention, validate_parallelism

TOL = 1e-5
TINY = dict(num_layers=2, hidden_size=96, ffn_hidden_size=192, num_attention_heads=6,
            num_query_groups=2, vocab_size=1000)  # fmt: skip
EOD = 0


@pytest.fixture(scope="module")
def mp():
    platform.init_distributed()
    platform.initialize_model_parallel(1, 1, 1)
    platform.set_seed(3)


def reset_mask(tokens: torch.Tensor, eod: int = EOD) -> tuple[torch.Tensor, torch.Tensor]:
    """megatron-core's own --reset-attention-mask / --reset-position-ids for each row:
    ``[b, 1, s, s]`` boolean (True = masked) and ``[b, s]`` positions."""
    from megatron.core.datasets.gpt_dataset import _get_ltor_masks_and_position_ids

    masks, positions = [], []
    for row in tokens:
        mask, _, pos = _get_ltor_masks_and_position_ids(row, eod, True, True, False, True)
        masks.append(mask)
        positions.append(pos)
    return torch.stack(masks), torch.stack(positions)


def batch_with_documents(batch: int, seq: int, vocab: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, vocab, (batch, seq), generator=gen)
    tokens[0, seq // 3] = tokens[0, seq // 2] = EOD  # three documents in row 0
    tokens[-1, seq - 5] = EOD  # a short last document in the last row
    return tokens


def two_models(arch: LlamaArch, **build_kwargs):
    """The same weights with SDPA (default) and with the unfused module."""
    models = {}
    for backend in ("auto", "unfused"):
        build = ModelBuildConfig(attention_backend=backend, **build_kwargs)
        platform.set_seed(11)
        models[backend] = build_model(arch, build_transformer_config(arch, build), build=build)
    return models["auto"], models["unfused"]


def core(model, i=0):
    return model.decoder.layers[i].self_attention.core_attention


# ---- the module ------------------------------------------------------------------------------


def test_spec_selection_by_attention_backend(mp):
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from megatron_cpt.model.sdpa_attention import SDPAttention

    assert core_attention(ModelBuildConfig()) is SDPAttention  # the default without TE
    for name in ("unfused", "local"):
        assert core_attention(ModelBuildConfig(attention_backend=name)) is DotProductAttention
    for name in ("flash", "fused"):
        cls = core_attention(ModelBuildConfig(attention_backend=name))
        assert issubclass(cls, SDPAttention) and cls.kernels
    sdpa, unfused = two_models(LlamaArch(**TINY))
    assert type(core(sdpa)) is SDPAttention and type(core(unfused)) is DotProductAttention
    with pytest.raises(UserError, match="--attention-backend must be one of"):
        validate_parallelism(LlamaArch(**TINY), ModelBuildConfig(attention_backend="x"), 1)


@pytest.mark.parametrize("groups", [6, 2, 1])  # MHA, GQA, MQA
@pytest.mark.parametrize("masking", ["causal", "reset"])
def test_core_attention_matches_unfused(mp, groups, masking):
    arch = LlamaArch(**dict(TINY, num_query_groups=groups))
    sdpa, unfused = (core(m) for m in two_models(arch))
    s, b, h, d = 40, 3, arch.num_attention_heads, arch.kv_channels
    gen = torch.Generator().manual_seed(groups)
    q = torch.randn(s, b, h, d, generator=gen, requires_grad=True)
    k = torch.randn(s, b, groups, d, generator=gen, requires_grad=True)
    v = torch.randn(s, b, groups, d, generator=gen, requires_grad=True)
    mask = None
    if masking == "reset":
        mask, _ = reset_mask(batch_with_documents(b, s, 100))
    outs, grads = [], []
    for module in (sdpa, unfused):
        out = module(q, k, v, mask)
        assert out.shape == (s, b, h * d)
        (g,) = torch.autograd.grad((out * out.detach().cos()).sum(), [q])
        outs.append(out.detach())
        grads.append(g)
    assert (outs[0] - outs[1]).abs().max() <= TOL
    assert (grads[0] - grads[1]).abs().max() <= TOL
    # The mask is honoured: with documents, the output differs from the plain causal one.
    if masking == "reset":
        assert (sdpa(q, k, v, None) - outs[0]).abs().max() > 1e-2


def test_softmax_scale_and_dropout(mp):
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_cpt.model.sdpa_attention import SDPAttention

    arch = LlamaArch(**TINY)
    config = build_transformer_config(arch, attention_dropout=0.3)
    kw = dict(layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    sdpa = SDPAttention(config, softmax_scale=0.05, **kw)
    unfused = DotProductAttention(config, softmax_scale=0.05, **kw)
    s, b = 24, 2
    q = torch.randn(s, b, 6, 16)
    k, v = torch.randn(s, b, 2, 16), torch.randn(s, b, 2, 16)
    sdpa.eval(), unfused.eval()
    assert (sdpa(q, k, v, None) - unfused(q, k, v, None)).abs().max() <= TOL
    default = SDPAttention(config, **kw).eval()
    assert (default(q, k, v, None) - sdpa(q, k, v, None)).abs().max() > 1e-3  # scale is used
    # Training: dropout applies, drawn from megatron-core's model-parallel RNG stream.
    sdpa.train()
    platform.set_seed(5)
    a = sdpa(q, k, v, None)
    platform.set_seed(5)
    assert torch.equal(a, sdpa(q, k, v, None))  # reproducible from the seed
    assert not torch.equal(a, sdpa(q, k, v, None))  # a fresh mask each call
    assert (a - sdpa.eval()(q, k, v, None)).abs().max() > 1e-2


def test_refuses_what_it_cannot_compute(mp):
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_cpt.model.sdpa_attention import SDPAttention

    kw = dict(layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")
    with pytest.raises(ValueError, match="sliding-window"):
        SDPAttention(build_transformer_config(LlamaArch(**TINY), window_size=(8, 0)), **kw)
    sdpa = SDPAttention(build_transformer_config(LlamaArch(**TINY)), **kw)
    q = torch.randn(4, 1, 6, 16)
    with pytest.raises(ValueError, match="attention bias"):
        sdpa(q, q[:, :, :2], q[:, :, :2], None, attention_bias=torch.zeros(1))


# ---- the model ---------------------------------------------------------------------------


@pytest.mark.parametrize("masking", ["causal", "reset"])
def test_model_logits_match_unfused(mp, masking):
    arch = LlamaArch(**TINY)
    sdpa, unfused = two_models(arch)
    tokens = batch_with_documents(2, 48, arch.vocab_size)
    if masking == "reset":
        mask, pos = reset_mask(tokens)
    else:
        mask, pos = None, torch.arange(48).expand(2, -1)
    with torch.no_grad():
        a, b = sdpa(tokens, pos, mask), unfused(tokens, pos, mask)
    assert a.shape == b.shape == (2, 48, 1024)
    assert (a - b).abs().max() <= TOL


def test_same_parameters_and_checkpoint_keys_interchangeable(mp, tmp_path):
    """A checkpoint saved with SDPA loads into the unfused model (and vice versa) and gives
    the same logits: core attention adds no parameters or checkpoint entries."""
    from megatron.core import dist_checkpointing

    arch = LlamaArch(**TINY)
    sdpa, unfused = two_models(arch)
    assert sdpa.state_dict().keys() == unfused.state_dict().keys()
    assert sdpa.sharded_state_dict().keys() == unfused.sharded_state_dict().keys()
    assert not list(core(sdpa).parameters()) and not list(core(unfused).parameters())
    with torch.no_grad():
        for p in sdpa.parameters():
            p.add_(0.01 * torch.randn_like(p))  # weights the unfused model does not have yet
    from megatron_cpt.training.writer_processes import owned_writer_processes

    with owned_writer_processes():  # megatron-core's writer Manager must not outlive the test
        dist_checkpointing.save(sdpa.sharded_state_dict(), str(tmp_path))
    unfused.load_state_dict(dist_checkpointing.load(unfused.sharded_state_dict(), str(tmp_path)))
    tokens = batch_with_documents(2, 32, arch.vocab_size)
    pos = torch.arange(32).expand(2, -1)
    with torch.no_grad():
        assert (sdpa(tokens, pos, None) - unfused(tokens, pos, None)).abs().max() <= TOL


@pytest.mark.slow
def test_training_losses_match_unfused(shared_data, smollm2_gguf, tmp_path):
    """tools/pretrain.py on real shards, with --reset-attention-mask (explicit masks), SDPA
    (default) vs --attention-backend unfused: the same losses step by step."""
    from megatron_cpt.data.preprocess import PreprocessConfig, run_preprocess
    from tests.test_train import TINY as TRAIN_TINY
    from tests.test_train import check_ok, losses_by_iteration, run_pretrain

    run_preprocess(
        PreprocessConfig(
            inputs=[str(shared_data / "domain/annual_reports.jsonl")],
            output_prefix=str(tmp_path / "reports"),
            tokenizer_type="HuggingFaceTokenizer",
            tokenizer_model=str(smollm2_gguf),
            append_eod=True,
            log_interval=0,
        )
    )
    common = [
        *TRAIN_TINY, "--data-path", "1.0", str(tmp_path / "reports_text_document"),
        "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(smollm2_gguf),
        "--seq-length", "128", "--reset-attention-mask", "--reset-position-ids",
        "--train-iters", "5", "--lr", "5e-3",
    ]  # fmt: skip
    losses = {}
    for backend in ("auto", "unfused"):
        run = tmp_path / backend
        check_ok(run_pretrain([*common, "--attention-backend", backend, "--run-dir", str(run)]))
        losses[backend] = losses_by_iteration(run)
    assert sorted(losses["auto"]) == list(range(1, 6))
    for it, loss in losses["unfused"].items():
        assert abs(losses["auto"][it] - loss) <= 1e-5 * abs(loss), (it, losses)


@pytest.mark.slow
def test_smollm2_logits_match_unfused(smollm2_gguf, shared_data, tmp_path):
    """The real SmolLM2-135M-Instruct (converted from the shipped GGUF), real text, causal and
    with --reset-attention-mask style document masks. In float64 the two modules agree to
    rounding (the maths is the same); in fp32, 30 layers of rounding put both ~5-8e-5 away from
    the float64 logits (|logits| up to ~40), so the fp32 check is that SDPA is no further from
    float64 than the unfused module is, rather than a 1e-5 bound neither fp32 module meets."""
    import json

    from transformers import AutoTokenizer

    from megatron_cpt.convert.importer import ImportConfig, import_hf
    from megatron_cpt.convert.loading import load_megatron_model

    out = tmp_path / "mcore"
    import_hf(ImportConfig(str(smollm2_gguf), str(out)))
    sdpa, arch = load_megatron_model(out)
    assert type(core(sdpa)).__name__ == "SDPAttention"
    build = ModelBuildConfig(attention_backend="unfused")
    unfused = build_model(
        arch,
        build_transformer_config(arch, build, perform_initialization=False),
        build=build,
        vocab_size=sdpa.embedding.word_embeddings.weight.shape[0],
    ).eval()
    unfused.load_state_dict(sdpa.state_dict())  # strict: the same keys
    tok = AutoTokenizer.from_pretrained(out / "hf" / "tokenizer")
    path = shared_data / "domain" / "annual_reports.jsonl"
    texts = [json.loads(line)["text"] for line in path.read_text().splitlines()[:6]]
    ids = [tok(t).input_ids for t in texts]
    row0 = sum((i[:40] + [tok.eos_token_id] for i in ids[:3]), [])[:120]
    row1 = (ids[3] + ids[4] + ids[5])[:120]
    tokens = torch.tensor([row0, row1])
    cases = [(None, torch.arange(120).expand(2, -1)), reset_mask(tokens, tok.eos_token_id)]
    with torch.no_grad():
        fp32 = [(sdpa(tokens, pos, mask), unfused(tokens, pos, mask)) for mask, pos in cases]
        sdpa.double(), unfused.double()
        fp64 = [(sdpa(tokens, pos, mask), unfused(tokens, pos, mask)) for mask, pos in cases]
    for (mask, _), (a, b), (a64, b64) in zip(cases, fp32, fp64):
        exact = (a64 - b64).abs().max().item()
        diff = (a - b).abs().max().item()
        err_sdpa = (a.double() - b64).abs().max().item()
        err_unfused = (b.double() - b64).abs().max().item()
        print(f"SmolLM2 (mask={mask is not None}): fp64 SDPA vs unfused {exact:.3g}; fp32 "
              f"{diff:.3g}; fp32 vs fp64: SDPA {err_sdpa:.3g}, unfused {err_unfused:.3g}")  # fmt: skip
        assert exact <= 1e-10
        assert err_sdpa <= 1.5 * err_unfused and diff <= 1e-4
