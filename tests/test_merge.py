"""Merging: each method against an independent plain-torch reference and against mergekit 0.1.5
on the same checkpoints and YAML, plus edge cases and one-line errors."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from megatron_cpt.errors import UserError
from megatron_cpt.merge import MergeOptions, load_config, merge_checkpoints, methods, parse_config
from megatron_cpt.merge.engine import tensor_seed

ROOT = Path(__file__).resolve().parents[1]
LAYERS, HIDDEN, FFN, VOCAB, HEADS, KV = 2, 32, 64, 96, 4, 2
NO_PROGRESS = MergeOptions(progress=False)


def llama_config(**overrides) -> dict:
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "intermediate_size": FFN,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV,
        "vocab_size": VOCAB,
        "tie_word_embeddings": False,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 128,
        "dtype": "float32",
    }
    cfg.update(overrides)
    return {k: v for k, v in cfg.items() if v is not None}


def llama_tensors(seed: int, dtype: torch.dtype, vocab: int = VOCAB) -> dict[str, torch.Tensor]:
    """A Llama state dict with every weight random (norms too, so no delta is trivially zero)."""
    g = torch.Generator().manual_seed(seed)
    kv = HIDDEN // HEADS * KV
    shapes = {"model.embed_tokens.weight": (vocab, HIDDEN), "model.norm.weight": (HIDDEN,)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (HIDDEN,),
            p + "post_attention_layernorm.weight": (HIDDEN,),
            p + "self_attn.q_proj.weight": (HIDDEN, HIDDEN),
            p + "self_attn.k_proj.weight": (kv, HIDDEN),
            p + "self_attn.v_proj.weight": (kv, HIDDEN),
            p + "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
            p + "mlp.gate_proj.weight": (FFN, HIDDEN),
            p + "mlp.up_proj.weight": (FFN, HIDDEN),
            p + "mlp.down_proj.weight": (HIDDEN, FFN),
        }
    shapes["lm_head.weight"] = (vocab, HIDDEN)
    return {n: (torch.randn(s, generator=g) * 0.05).to(dtype) for n, s in shapes.items()}


def write_checkpoint(path: Path, tensors: dict, config: dict | None = None, shards: int = 1):
    path.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    if shards == 1:
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for s in range(shards):
            file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            part = {n: tensors[n] for n in names[s::shards]}
            save_file(part, str(path / file), metadata={"format": "pt"})
            weight_map |= dict.fromkeys(part, file)
        (path / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map})
        )
    (path / "config.json").write_text(json.dumps(config or llama_config()))
    (path / "tokenizer_config.json").write_text(
        json.dumps({"model_max_length": 128, "src": path.name})
    )
    return path


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Base + two 'fine-tuned' variants (base + small deltas), in fp32 and bf16; one sharded."""
    root = tmp_path_factory.mktemp("ckpts")
    out = {}
    for dtype, tag in ((torch.float32, "f32"), (torch.bfloat16, "bf16")):
        base = llama_tensors(0, torch.float32)
        for i, name in enumerate(("base", "a", "b")):
            tensors = (
                base
                if i == 0
                else {n: t + llama_tensors(i, torch.float32)[n] * 0.2 for n, t in base.items()}
            )
            tensors = {n: t.to(dtype) for n, t in tensors.items()}
            cfg = llama_config(dtype=str(dtype).removeprefix("torch."))
            out[f"{name}_{tag}"] = write_checkpoint(
                root / f"{name}_{tag}", tensors, cfg, shards=3 if name == "a" else 1
            )
    return out


def load_dir(path: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(path.glob("*.safetensors")):
        tensors |= load_file(str(file))
    return tensors


def load_inputs(ckpts, tag):
    return [load_dir(ckpts[f"{n}_{tag}"]) for n in ("base", "a", "b")]


# --------------------------------------------------------------------------- references
def ref_trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the top-k magnitudes; equal magnitudes ranked by flat index (a stable sort)."""
    if density >= 1:
        return delta
    flat = delta.reshape(-1)
    k = max(1, int(density * flat.numel()))
    order = torch.sort(flat.abs().float(), descending=True, stable=True).indices[:k]
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[order] = True
    return (flat * keep).reshape(delta.shape)


def ref_ties(base, others, weights, densities, lam=1.0, normalize=True):
    trimmed = [w * ref_trim(x - base, d) for x, w, d in zip(others, weights, densities)]
    sign = torch.sign(sum(trimmed))
    sign[sign == 0] = 1
    agree = [torch.sign(t) == sign for t in trimmed]
    total = sum(t * a for t, a in zip(trimmed, agree))
    mass = sum(w * a.to(base.dtype) for w, a in zip(weights, agree))
    if normalize:
        total = total / torch.where(mass == 0, torch.ones_like(mass), mass)
    return base + lam * total


def ref_slerp(t, v0, v1):
    a, b = v0.double().reshape(-1), v1.double().reshape(-1)
    cos = torch.dot(a / a.norm(), b / b.norm()).clamp(-1, 1)
    if cos.abs() > 0.9995:
        return ((1 - t) * a + t * b).reshape(v0.shape)
    theta = torch.acos(cos)
    out = (torch.sin((1 - t) * theta) * a + torch.sin(t * theta) * b) / torch.sin(theta)
    return out.reshape(v0.shape)


def run_ours(config: dict, out: Path, **options) -> dict[str, torch.Tensor]:
    merge_checkpoints(parse_config(config), out, MergeOptions(progress=False, **options))
    return load_dir(out)


def cfg(method, ckpts, tag, **extra):
    models = [
        {"model": str(ckpts[f"a_{tag}"]), "parameters": {"weight": 0.7, "density": 0.4}},
        {"model": str(ckpts[f"b_{tag}"]), "parameters": {"weight": 0.5, "density": 0.6}},
    ]
    if method == "linear":
        models = [
            {"model": m["model"], "parameters": {"weight": m["parameters"]["weight"]}}
            for m in models
        ]
    c = {"merge_method": method, "models": models, **extra}
    if method != "linear":
        c["base_model"] = str(ckpts[f"base_{tag}"])
    return c


# --------------------------------------------------------------------------- vs references
def test_ties_matches_reference(ckpts, tmp_path):
    base, a, b = load_inputs(ckpts, "f32")
    config = cfg("ties", ckpts, "f32", parameters={"lambda": 0.8})
    config["models"].insert(0, {"model": str(ckpts["base_f32"])})  # mergekit style: base listed
    merged = run_ours(config, tmp_path / "o")
    for name in base:
        want = ref_ties(base[name], [a[name], b[name]], [0.7, 0.5], [0.4, 0.6], lam=0.8)
        torch.testing.assert_close(merged[name], want, rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.parametrize("normalize", [True, False])
def test_task_arithmetic_and_linear_match_reference(ckpts, tmp_path, normalize):
    base, a, b = load_inputs(ckpts, "f32")
    params = {"lambda": 1.5, "normalize": normalize}
    ta = run_ours(cfg("task_arithmetic", ckpts, "f32", parameters=params), tmp_path / "ta")
    lin = run_ours(
        cfg("linear", ckpts, "f32", parameters={"normalize": normalize}), tmp_path / "li"
    )
    for n in base:
        delta = 0.7 * (a[n] - base[n]) + 0.5 * (b[n] - base[n])
        torch.testing.assert_close(ta[n], base[n] + 1.5 * delta / (1.2 if normalize else 1.0))
        avg = (0.7 * a[n] + 0.5 * b[n]) / (1.2 if normalize else 1.0)
        torch.testing.assert_close(lin[n], avg)


def test_slerp_matches_reference_with_filters_and_gradients(ckpts, tmp_path):
    base, a, _ = load_inputs(ckpts, "f32")
    t_setting = [{"filter": "self_attn", "value": [0.0, 1.0]}, {"value": 0.3}]
    config = {
        "merge_method": "slerp",
        "base_model": str(ckpts["base_f32"]),
        "models": [{"model": str(ckpts["base_f32"])}, {"model": str(ckpts["a_f32"])}],
        "parameters": {"t": t_setting},
    }
    merged = run_ours(config, tmp_path / "s")
    for n in base:
        t = (0.0 if "layers.0." in n else 1.0) if "self_attn" in n else 0.3
        want = ref_slerp(t, base[n], a[n]).float()
        torch.testing.assert_close(merged[n], want, rtol=1e-5, atol=1e-6, msg=n)
    assert torch.equal(
        merged["model.layers.0.self_attn.q_proj.weight"],
        base["model.layers.0.self_attn.q_proj.weight"],
    )


def test_dare_matches_reference_and_is_seeded(ckpts, tmp_path):
    base, a, b = load_inputs(ckpts, "f32")
    config = cfg("dare_linear", ckpts, "f32")
    merged = run_ours(config, tmp_path / "d1", random_seed=7)
    for n in ("model.layers.1.mlp.up_proj.weight", "lm_head.weight"):
        g = torch.Generator().manual_seed(tensor_seed(7, n))
        want = base[n].clone()
        for x, w, d in ((a[n], 0.7, 0.4), (b[n], 0.5, 0.6)):
            mask = torch.bernoulli(torch.full_like(x, d), generator=g)
            want += w * (x - base[n]) * mask / d  # published DARE: rescale by 1/(1-p)
        torch.testing.assert_close(merged[n], want)
    again = run_ours(config, tmp_path / "d2", random_seed=7)
    other = run_ours(config, tmp_path / "d3", random_seed=8)
    assert all(torch.equal(merged[n], again[n]) for n in merged)
    assert not torch.equal(merged["lm_head.weight"], other["lm_head.weight"])


def test_dare_keeps_density_fraction_and_expected_delta():
    delta = torch.randn(400_000, generator=torch.Generator().manual_seed(1)) + 0.5
    kept = methods.random_drop(delta, 0.3, torch.Generator().manual_seed(2), rescale=True)
    assert abs((kept != 0).float().mean().item() - 0.3) < 0.005
    assert abs(kept.mean().item() - delta.mean().item()) < 0.02
    torch.testing.assert_close(kept[kept != 0], delta[kept != 0] / 0.3)


def test_dare_ties_reference_with_fixed_masks():
    """dare_ties = DARE drop, then TIES sign election + disjoint mean over the dropped deltas."""
    g = torch.Generator().manual_seed(0)
    base, a, b = (torch.randn(64, 48, generator=g) for _ in range(3))
    spec = methods.TASK_ARITHMETIC_FAMILY["dare_ties"]
    ours = methods.task_arithmetic_family(
        spec,
        base,
        [a, b],
        [1.0, 0.5],
        [0.5, 0.7],
        normalize=True,
        lambda_=1.0,
        rescale=True,
        generator=torch.Generator().manual_seed(3),
    )
    g = torch.Generator().manual_seed(3)
    dropped = [
        (x - base) * torch.bernoulli(torch.full_like(x, d), generator=g) / d
        for x, d in ((a, 0.5), (b, 0.7))
    ]
    want = ref_ties(base, [base + d for d in dropped], [1.0, 0.5], [1.0, 1.0])
    torch.testing.assert_close(ours, want)


# --------------------------------------------------------------------------- edge cases
def test_radix_select_equals_kthvalue_with_duplicates():
    g = torch.Generator().manual_seed(0)
    for w in (
        torch.randn(10_001, generator=g).abs(),
        torch.randint(0, 5, (5000,), generator=g).float(),
        torch.tensor([0.0, 0.0, 0.0]),
        torch.tensor([3.0, float("inf"), 1e-40, 0.0]),
    ):
        for k in {1, 2, w.numel() // 2, w.numel() - 1, w.numel()} - {0}:
            want = torch.kthvalue(w, w.numel() - k + 1).values
            assert methods.kth_largest_magnitude(w, k).item() == want.item(), (w[:5], k)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_trim_equals_stable_sort_reference_in_every_dtype(dtype):
    """16-bit tensors are ranked on their own bit patterns (no float32 copy): same order."""
    g = torch.Generator().manual_seed(3)
    delta = (torch.randn(300, 70, generator=g) * 0.01).to(dtype)  # bf16/fp16: many equal values
    delta[0, :10] = 0
    for density in (0.01, 0.37, 0.5, 0.99):
        assert torch.equal(methods.magnitude_trim(delta, density), ref_trim(delta, density))


def test_trim_ties_at_threshold_keep_exactly_k_lowest_index_first():
    delta = torch.tensor([0.5, -1.0, 1.0, 0.2, -1.0, 1.0, 3.0])
    kept = methods.magnitude_trim(delta, 0.5)  # k = 3: the 3.0, then the first two of the 1.0s
    assert kept.tolist() == [0.0, -1.0, 1.0, 0.0, 0.0, 0.0, 3.0]
    torch.testing.assert_close(kept, ref_trim(delta, 0.5))
    assert torch.equal(methods.magnitude_trim(delta, 1.0), delta)
    assert methods.magnitude_trim(delta, 0.01).count_nonzero() == 1  # at least one survives


def test_ties_edge_cases():
    spec = methods.TASK_ARITHMETIC_FAMILY["ties"]

    def ties(base, others, weights, densities=None, **kw):
        kw = {"normalize": True, "lambda_": 1.0, "rescale": False} | kw
        return methods.task_arithmetic_family(
            spec, base, others, weights, densities or [1.0] * len(others), **kw
        )

    # exactly representable values, so deltas cancel exactly and the election is about signs
    base = torch.randint(-8, 8, (8, 8), generator=torch.Generator().manual_seed(0)).float() / 4
    # all-zero deltas: nothing survives the sign election, the base comes back unchanged
    assert torch.equal(ties(base, [base.clone(), base.clone()], [1.0, 1.0], [0.3, 0.3]), base)
    # opposite signs: equal mass elects +, the disjoint mean keeps only the + model's delta
    d = torch.full_like(base, 0.25)
    torch.testing.assert_close(ties(base, [base + d, base - d], [1.0, 1.0]), base + d)
    # the heavier side wins the election and is not diluted by the other model's weight
    torch.testing.assert_close(ties(base, [base + d, base - d], [0.4, 0.6]), base - d)
    # normalize off: the agreeing weighted deltas are summed, not averaged
    torch.testing.assert_close(
        ties(base, [base + d, base + 3 * d], [1.0, 1.0], normalize=False), base + 4 * d
    )
    torch.testing.assert_close(ties(base, [base + d, base + 3 * d], [1.0, 1.0]), base + 2 * d)
    # density 1.0 is no trimming: equal to the untrimmed reference
    x, y = base + torch.randn_like(base) * 0.1, base + torch.randn_like(base) * 0.1
    torch.testing.assert_close(
        ties(x * 0 + base, [x, y], [0.6, 0.9]), ref_ties(base, [x, y], [0.6, 0.9], [1.0, 1.0])
    )


def test_int8_mask_and_dtype_handling(ckpts, tmp_path):
    plain = run_ours(cfg("ties", ckpts, "bf16"), tmp_path / "p")
    int8 = run_ours(cfg("ties", ckpts, "bf16", parameters={"int8_mask": True}), tmp_path / "i")
    assert all(torch.equal(plain[n], int8[n]) for n in plain)
    assert {t.dtype for t in plain.values()} == {torch.bfloat16}  # default: compute in input dtype
    # compute in float32, save bf16; the recorded dtype follows the saved tensors
    hi = run_ours(cfg("ties", ckpts, "bf16", dtype="float32", out_dtype="bfloat16"), tmp_path / "h")
    assert {t.dtype for t in hi.values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "h" / "config.json").read_text())["dtype"] == "bfloat16"
    base, a, b = (load_dir(ckpts[f"{n}_bf16"]) for n in ("base", "a", "b"))
    n = "model.layers.0.mlp.down_proj.weight"
    want = ref_ties(base[n].float(), [a[n].float(), b[n].float()], [0.7, 0.5], [0.4, 0.6])
    torch.testing.assert_close(hi[n], want.to(torch.bfloat16), rtol=0, atol=0)
    # mixed input dtypes promote (bf16 + fp32 -> fp32), as mergekit does
    mixed = cfg("task_arithmetic", ckpts, "bf16")
    mixed["models"][0]["model"] = str(ckpts["a_f32"])
    assert {t.dtype for t in run_ours(mixed, tmp_path / "m").values()} == {torch.float32}


# --------------------------------------------------------------------------- vs mergekit
def run_mergekit(config: dict, out: Path) -> dict[str, torch.Tensor]:
    pytest.importorskip("mergekit")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions as MKOptions
    from mergekit.merge import run_merge

    logging.getLogger("mergekit").setLevel(logging.CRITICAL)
    run_merge(MergeConfiguration.model_validate(config), str(out), MKOptions(quiet=True))
    return load_dir(out)


@pytest.mark.parametrize(
    "method,tag,extra",
    [
        ("ties", "f32", {"parameters": {"lambda": 0.9, "normalize": True}}),
        ("ties", "f32", {"parameters": {"normalize": False, "int8_mask": True}}),
        ("task_arithmetic", "bf16", {"parameters": {"lambda": 0.5}}),
        ("task_arithmetic", "f32", {"dtype": "float32", "out_dtype": "bfloat16"}),
        ("linear", "bf16", {}),
        ("linear", "f32", {"parameters": {"normalize": False}}),
        (
            "slerp",
            "bf16",
            {"parameters": {"t": [{"filter": "mlp", "value": [0.2, 0.9]}, {"value": 0.6}]}},
        ),
        ("slerp", "f32", {"parameters": {"t": 0.5}}),
    ],
)
def test_bit_identical_to_mergekit(ckpts, tmp_path, method, tag, extra):
    config = cfg(method, ckpts, tag, **extra)
    if method == "slerp":
        config["models"] = [{"model": str(ckpts[f"base_{tag}"])}, {"model": str(ckpts[f"a_{tag}"])}]
    theirs = run_mergekit(config, tmp_path / "mk")
    ours = run_ours(config, tmp_path / "ours")
    assert set(ours) == set(theirs)
    for n in theirs:
        assert ours[n].dtype == theirs[n].dtype, n
        assert torch.equal(ours[n], theirs[n]), (
            n,
            (ours[n].float() - theirs[n].float()).abs().max(),
        )


def test_ties_bf16_differs_from_mergekit_only_at_threshold_ties(ckpts, tmp_path):
    """bf16 deltas repeat magnitudes; mergekit picks among equals at the threshold by an
    unstable sort, we by flat index. Every differing entry must be such a tie."""
    config = cfg("ties", ckpts, "bf16")
    theirs = run_mergekit(config, tmp_path / "mk")
    ours = run_ours(config, tmp_path / "ours")
    base, a, b = load_inputs(ckpts, "bf16")
    differing = 0
    for n in theirs:
        diff = ours[n] != theirs[n]
        if not diff.any():
            continue
        differing += int(diff.sum())
        at_threshold = torch.zeros_like(diff)
        for x, density in ((a[n], 0.4), (b[n], 0.6)):
            mag = (x - base[n]).abs().float().reshape(-1)
            k = max(1, int(density * mag.numel()))
            kth = torch.kthvalue(mag, mag.numel() - k + 1).values
            at_threshold |= (mag == kth).reshape(diff.shape)
        assert not (diff & ~at_threshold).any(), n
    assert differing < sum(t.numel() for t in ours.values()) * 0.01


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_kernel_equals_mergekit_with_same_stream(method):
    """Same seed, same Bernoulli draws: with mergekit's L1 rescale (or none) the outputs match."""
    mergekit_api = pytest.importorskip("mergekit.merge_methods.api")
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        base, a, b = ((torch.randn(96, 40, generator=g) * 0.1).to(dtype) for _ in range(3))
        for rescale in (False, "l1"):
            torch.manual_seed(11)
            theirs = mergekit_api.merge_tensors(
                [base, a, b],
                method,
                base_index=0,
                parameters={"weight": [0.8, 0.5], "density": [0.3, 0.6], "rescale": bool(rescale)},
            )
            ours = methods.task_arithmetic_family(
                methods.TASK_ARITHMETIC_FAMILY[method],
                base,
                [a, b],
                [0.8, 0.5],
                [0.3, 0.6],
                normalize=False,
                lambda_=1.0,
                rescale=rescale,
                generator=torch.Generator().manual_seed(11),
            )
            assert torch.equal(ours, theirs), (method, dtype, rescale)


# --------------------------------------------------------------------------- output and errors
def test_sharded_output_tokenizer_and_config_carried(ckpts, tmp_path):
    config = cfg("ties", ckpts, "f32", tokenizer_source=str(ckpts["b_f32"]))
    one = run_ours(config, tmp_path / "one")
    out = tmp_path / "many"
    merge_checkpoints(
        parse_config(config), out, MergeOptions(progress=False, max_shard_bytes=20_000)
    )
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted({*index["weight_map"].values()})
    assert len(files) > 3 and all(f.endswith(f"-of-{len(files):05d}.safetensors") for f in files)
    for name, file in index["weight_map"].items():
        with safe_open(str(out / file), "pt") as fh:
            assert torch.equal(fh.get_tensor(name), one[name])
    assert json.loads((out / "tokenizer_config.json").read_text())["src"] == "b_f32"
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == LAYERS
    assert not list(tmp_path.glob(".*tmp*"))


def _broken(ckpts, tmp_path, name, tensors=None, config=None):
    base = load_dir(ckpts["base_f32"])
    return write_checkpoint(tmp_path / name, tensors(base) if tensors else base, config)


@pytest.mark.parametrize(
    "case,expect",
    [
        ("shape", "shape mismatch for model.layers.1.mlp.up_proj.weight"),
        ("vocab", "vocabularies differ: model.embed_tokens.weight has 96 rows"),
        ("arch", "architectures differ:"),
        ("missing", "lacks tensor model.norm.weight"),
    ],
)
def test_incompatible_inputs_are_one_line_errors(ckpts, tmp_path, case, expect):
    if case == "shape":
        bad = _broken(
            ckpts,
            tmp_path,
            "x",
            lambda t: t | {"model.layers.1.mlp.up_proj.weight": torch.zeros(FFN + 1, HIDDEN)},
        )
    elif case == "vocab":
        bad = _broken(
            ckpts,
            tmp_path,
            "x",
            lambda t: t | {"model.embed_tokens.weight": torch.zeros(VOCAB + 8, HIDDEN)},
            llama_config(vocab_size=None),
        )
    elif case == "arch":
        bad = _broken(ckpts, tmp_path, "x", config=llama_config(num_key_value_heads=HEADS))
    else:
        bad = _broken(
            ckpts, tmp_path, "x", lambda t: {n: v for n, v in t.items() if n != "model.norm.weight"}
        )
    config = cfg("ties", ckpts, "f32")
    config["models"][1]["model"] = str(bad)
    with pytest.raises(UserError, match=expect.replace("(", r"\(")):
        merge_checkpoints(parse_config(config), tmp_path / "out", NO_PROGRESS)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "mutate,expect",
    [
        (
            lambda c: c.update(merge_method="frankenmerge"),
            "merge_method: 'frankenmerge' is not supported",
        ),
        (
            lambda c: c["models"][0]["parameters"].pop("weight"),
            r"models\[0\].parameters.weight: required",
        ),
        (lambda c: c["models"][0]["parameters"].update(density=1.5), "density: must be within"),
        (
            lambda c: c.update(base_model="/nonexistent/x"),
            "base_model: '/nonexistent/x' is not a local directory",
        ),
        (lambda c: c.update(slices=[]), "slices: slice-based"),
        (lambda c: c.update(dtype="float8"), "unknown dtype 'float8'"),
        (lambda c: c.update(tokenizer_source="union"), "tokenizer_source: union"),
        (lambda c: c["models"][0]["parameters"].update(t=0.5), "ties does not take t"),
    ],
)
def test_config_errors(ckpts, mutate, expect):
    config = cfg("ties", ckpts, "f32")
    mutate(config)
    with pytest.raises(UserError, match=expect):
        parse_config(config)


def test_cli_end_to_end_and_errors(ckpts, tmp_path):
    import yaml

    path = tmp_path / "merge.yml"
    path.write_text(yaml.safe_dump(cfg("dare_ties", ckpts, "bf16")))
    tool = [sys.executable, str(ROOT / "tools" / "merge_models.py")]
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    ok = subprocess.run(
        [*tool, str(path), str(tmp_path / "out"), "--no-progress", "--random-seed", "3"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert ok.returncode == 0, ok.stderr
    ours = run_ours(cfg("dare_ties", ckpts, "bf16"), tmp_path / "lib", random_seed=3)
    assert all(torch.equal(t, ours[n]) for n, t in load_dir(tmp_path / "out").items())
    again = subprocess.run(
        [*tool, str(path), str(tmp_path / "out")], capture_output=True, text=True, env=env
    )
    assert again.returncode == 2 and again.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'out'}: already exists and is not empty (use --overwrite)"
    ]
    path.write_text("merge_method: ties\nmodels: [\n")
    bad = subprocess.run(
        [*tool, str(path), str(tmp_path / "o2")], capture_output=True, text=True, env=env
    )
    assert (
        bad.returncode == 2
        and bad.stderr.startswith(f"error: {path}:")
        and "invalid YAML" in bad.stderr
    )
    assert len(bad.stderr.strip().splitlines()) == 1


def test_failure_midway_leaves_no_output(ckpts, tmp_path):
    base = load_dir(ckpts["base_f32"])
    good = write_checkpoint(tmp_path / "g", base | {"z.ids": torch.arange(4)})
    bad = write_checkpoint(tmp_path / "b", base | {"z.ids": torch.arange(4) + 1})
    config = {
        "merge_method": "task_arithmetic",
        "base_model": str(good),
        "models": [{"model": str(bad), "parameters": {"weight": 1.0}}],
    }
    with pytest.raises(UserError, match="non-float tensor z.ids differs"):
        merge_checkpoints(parse_config(config), tmp_path / "out", NO_PROGRESS)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp*"))


def test_load_config_resolves_paths_relative_to_config(ckpts, tmp_path):
    import yaml

    rel = os.path.relpath(ckpts["a_f32"], tmp_path)
    path = tmp_path / "c.yml"
    path.write_text(
        yaml.safe_dump(
            {"merge_method": "linear", "models": [{"model": rel, "parameters": {"weight": 1}}]}
        )
    )
    assert load_config(path).models[0].path == ckpts["a_f32"].resolve()
