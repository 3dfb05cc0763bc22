"""The mergekit methods added for issue 19 (della, della_linear, breadcrumbs, breadcrumbs_ties,
model_stock, sce, nuslerp, multislerp, karcher, nearswap): bit-identical to mergekit's kernels
and to mergekit's own run on the same checkpoints and YAML, DELLA's statistics under our
(paper) rescale, edge cases, Megatron space == HF space, and the chunked device path."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from test_merge import ROOT, ckpts, load_dir, run_mergekit, run_ours  # noqa: F401 (fixture)

from megatron_cpt.errors import UserError
from megatron_cpt.merge import MergeOptions, merge_checkpoints, methods, parse_config
from megatron_cpt.merge.engine import ROW_SEPARABLE, TensorMerger

FAMILY = methods.TASK_ARITHMETIC_FAMILY


def mk_merge(tensors, method, **kwargs):
    api = pytest.importorskip("mergekit.merge_methods.api")
    return api.merge_tensors(tensors, method, **kwargs)


def inputs(dtype, count=4, shape=(96, 40), seed=0, scale=0.1):
    """A base and ``count - 1`` fine-tunes (base + small random deltas)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g) * 0.1
    others = [base + torch.randn(shape, generator=g) * 0.1 * scale for _ in range(count - 1)]
    return [t.to(dtype) for t in (base, *others)]


def assert_identical(ours, theirs, what):
    assert ours.dtype == theirs.dtype, what
    assert torch.equal(ours, theirs), (what, (ours.float() - theirs.float()).abs().max())


# --------------------------------------------------------------------------- kernels vs mergekit
DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_kernel(dtype, filter_wise):
    base, a, b, c = inputs(dtype)
    theirs = mk_merge([base, a, b, c], "model_stock", base_index=0,
                      parameters={"filter_wise": filter_wise})  # fmt: skip
    assert_identical(methods.model_stock(base, [a, b, c], filter_wise), theirs, dtype)
    # 1-D tensors (norms) take the filter-wise unsqueeze branch
    v = [t[0] for t in (base, a, b)]
    theirs = mk_merge(v, "model_stock", base_index=0, parameters={"filter_wise": filter_wise})
    assert_identical(methods.model_stock(v[0], v[1:], filter_wise), theirs, "1-D")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("topk,int8", [(1.0, False), (0.3, False), (0.3, True), (0.0, False)])
def test_sce_kernel(dtype, topk, int8):
    base, a, b, c = inputs(dtype)
    params = {"select_topk": topk, "int8_mask": int8}
    theirs = mk_merge([base, a, b, c], "sce", base_index=0, parameters=params)
    assert_identical(methods.sce(base, [a, b, c], topk, int8), theirs, params)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("row_wise,flatten", [(False, True), (True, False), (False, False)])
def test_nuslerp_kernel(dtype, row_wise, flatten):
    base, a, b = inputs(dtype, 3)
    params = {"weight": [0.3, 0.6], "nuslerp_row_wise": row_wise, "nuslerp_flatten": flatten}
    with_base = mk_merge([base, a, b], "nuslerp", base_index=0, parameters=params)
    ours = methods.nuslerp(base, [a, b], [0.3, 0.6], row_wise, flatten)
    assert_identical(ours, with_base, "with base")
    without = mk_merge([a, b], "nuslerp", parameters=params)
    assert_identical(methods.nuslerp(None, [a, b], [0.3, 0.6], row_wise, flatten), without, "none")
    # zero total weight: t = 0.5; collinear inputs: the linear branch
    theirs = mk_merge([a, 2 * a], "nuslerp", parameters={"weight": [1.0, -1.0]})
    assert_identical(methods.nuslerp(None, [a, 2 * a], [1.0, -1.0], False, True), theirs, "t=.5")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("normalize", [True, False])
def test_multislerp_kernel(dtype, normalize):
    base, a, b, c = inputs(dtype)
    w = [0.2, 0.5, 0.3]
    params = {"weight": w, "normalize_weights": normalize}
    theirs = mk_merge([base, a, b, c], "multislerp", base_index=0, parameters=params)
    assert_identical(methods.multislerp(base, [a, b, c], w, normalize, 1e-8), theirs, "base")
    theirs = mk_merge([a, b, c], "multislerp", parameters=params)
    assert_identical(methods.multislerp(None, [a, b, c], w, normalize, 1e-8), theirs, "no base")
    # antipodal pair with equal weights: mergekit's linear fallback
    theirs = mk_merge([a, -a], "multislerp", parameters={"weight": [0.5, 0.5]})
    assert_identical(methods.multislerp(None, [a, -a], [0.5, 0.5], True, 1e-8), theirs, "anti")
    with pytest.raises(ValueError, match="zero"):
        methods.multislerp(None, [a, -a, torch.zeros_like(a)], [0.5, 0.5, 0.1], False, 1e-8)


@pytest.mark.parametrize("dtype", DTYPES)
def test_karcher_kernel(dtype):
    base, a, b, c = inputs(dtype, scale=3.0)
    for group, kwargs in (([a, b, c, base], {}), ([a, b], {"max_iter": 2, "tol": 1e-3})):
        theirs = mk_merge(group, "karcher", parameters=kwargs)
        ours = methods.karcher(group, kwargs.get("max_iter", 10), kwargs.get("tol", 1e-5))
        assert_identical(ours, theirs, kwargs)
    zeros = [torch.zeros_like(a), torch.zeros_like(a)]
    assert_identical(methods.karcher(zeros, 10, 1e-5), mk_merge(zeros, "karcher"), "all zero")
    mixed = [torch.zeros_like(a), a]
    assert_identical(methods.karcher(mixed, 10, 1e-5), mk_merge(mixed, "karcher"), "one zero")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t", [0.0, 1e-3, 0.02, 5.0])
def test_nearswap_kernel(dtype, t):
    base, a = inputs(dtype, 2)
    theirs = mk_merge([base, a], "nearswap", base_index=0, parameters={"t": t})
    assert_identical(methods.nearswap(base, a, t), theirs, t)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties"])
@pytest.mark.parametrize("rescale", [False, True])
def test_breadcrumbs_kernel(dtype, method, rescale):
    """Deterministic (no random draw), and bit-identical even with bf16 magnitude ties, because
    the ranking is mergekit's own sort call."""
    base, a, b = inputs(dtype, 3)
    for density, gamma in (([0.3, 0.6], [0.05, 0.01]), ([0.9, 0.0], [0.2, 0.0]), ([0, 1], [0, 0])):
        params = {"weight": [0.8, 0.5], "density": density, "gamma": gamma, "rescale": rescale}
        theirs = mk_merge([base, a, b], method, base_index=0, parameters=params)
        ours = methods.task_arithmetic_family(
            FAMILY[method], base, [a, b], [0.8, 0.5], density,
            normalize=False, lambda_=1.0, rescale=rescale, gammas=gamma,
        )  # fmt: skip
        assert_identical(ours, theirs, params)


def test_breadcrumbs_keeps_the_band_between_outliers_and_small():
    delta = torch.arange(1, 101, dtype=torch.float32) * torch.tensor([1.0, -1.0]).repeat(50)
    kept = methods.magnitude_outliers(delta, density=0.5, gamma=0.1)
    magnitudes = kept.abs()[kept != 0]
    assert magnitudes.numel() == 50
    assert magnitudes.min() == 41 and magnitudes.max() == 90  # top 10 and bottom 40 dropped
    assert torch.equal(kept[kept != 0], delta[(delta.abs() >= 41) & (delta.abs() <= 90)])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", ["della", "della_linear"])
@pytest.mark.parametrize("rescale", [False, "l1"])
def test_della_kernel_equals_mergekit_with_same_stream(dtype, method, rescale):
    """mergekit draws from the global generator, we from a per-tensor one: seeded alike, the
    masks and (with mergekit's L1 rescale, or none) the outputs are identical."""
    base, a, b = inputs(dtype, 3)
    params = {"weight": [0.8, 0.5], "density": [0.3, 0.6], "epsilon": [0.1, 0.2],
              "rescale": bool(rescale), "lambda": 1.3}  # fmt: skip
    torch.manual_seed(5)
    theirs = mk_merge([base, a, b], method, base_index=0, parameters=params)
    spec = FAMILY[method]
    ours = methods.task_arithmetic_family(
        spec, base, [a, b], [0.8, 0.5], [0.3, 0.6], normalize=spec.default_normalize,
        lambda_=1.3, rescale=rescale, generator=torch.Generator().manual_seed(5),
        epsilons=[0.1, 0.2],
    )  # fmt: skip
    assert_identical(ours, theirs, (method, rescale))


def test_della_statistics_with_paper_rescale():
    """Our default rescale divides each survivor by its own keep probability: the kept fraction
    is the density, keep probability rises with the magnitude's rank within its row, and the
    expected delta is the delta."""
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(64, 200, generator=g)
    density, epsilon, draws = 0.4, 0.15, 300
    total = torch.zeros_like(delta)
    kept = torch.zeros_like(delta)
    for _ in range(draws):
        out = methods.della_magprune(delta, density, epsilon, g, rescale=True)
        total += out
        kept += out != 0
    frac = kept / draws
    assert abs(float(frac.mean()) - density) < 0.01
    ranks = delta.abs().argsort(dim=1).argsort(dim=1)
    smallest, largest = frac[ranks < 20].mean(), frac[ranks >= 180].mean()
    assert abs(float(smallest) - (density - epsilon)) < 0.03
    assert abs(float(largest) - (density + epsilon)) < 0.03
    # E[out] = delta: per-entry standard error is |d| sqrt((1-p)/p / draws) <= 1.0 |d| / 12
    rel = (total / draws - delta).abs() / delta.abs().clamp(min=1e-3)
    assert float(rel.median()) < 0.1
    survivors = out[out != 0] / delta[out != 0]  # each scaled by 1/p in [1/0.55, 1/0.25]
    assert float(survivors.min()) >= 1 / 0.55 - 1e-5 and float(survivors.max()) <= 1 / 0.25 + 1e-5


def test_della_edge_cases():
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(8, 16, generator=g)
    assert torch.equal(methods.della_magprune(delta, 1.0, 0.1, g, True), delta)
    assert not methods.della_magprune(delta, 0.0, 0.1, g, True).any()
    with pytest.raises(ValueError, match="epsilon"):
        methods.della_magprune(delta, 0.1, 0.15, g, True)
    vector = torch.randn(50, generator=g)  # 1-D: ranked as one row, shape kept
    assert methods.della_magprune(vector, 0.5, 0.1, g, False).shape == vector.shape


def test_sce_and_model_stock_edge_cases():
    base = torch.randn(6, 5)
    same = [base.clone(), base.clone()]
    # all deltas zero: SCE weights fall back to uniform, result is the base
    assert torch.equal(methods.sce(base, same, 0.5, False), base)
    # zero deltas in model_stock: cos = 0 -> t = 0 -> the base
    assert torch.equal(methods.model_stock(base, same, False), base)
    # opposite deltas, two models: cos = -1, denominator 0 -> singular, keep the base
    d = torch.randn(6, 5)
    assert torch.equal(methods.model_stock(base, [base + d, base - d], False), base)
    # identical fine-tunes: cos = 1 -> t = 1 -> their average (= the fine-tune)
    torch.testing.assert_close(methods.model_stock(base, [base + d, base + d], False), base + d)


# --------------------------------------------------------------------------- checkpoints vs mergekit
def recipe(method, ckpts, tag, **extra):  # noqa: F811 (ckpts is the fixture's value)
    path = {n: str(ckpts[f"{n}_{tag}"]) for n in ("base", "a", "b")}
    weighted = [
        {"model": path["a"], "parameters": {"weight": 0.7}},
        {"model": path["b"], "parameters": {"weight": 0.4}},
    ]
    plain = [{"model": path["a"]}, {"model": path["b"]}]
    out = {
        "breadcrumbs": {"models": weighted, "parameters": {"density": 0.5, "gamma": 0.02}},
        "breadcrumbs_ties": {
            "models": weighted,
            "parameters": {"density": [0.3, 0.8], "gamma": 0.05, "normalize": True},
        },
        "model_stock": {"models": plain},
        "sce": {"models": plain, "parameters": {"select_topk": 0.4}},
        "nuslerp": {"models": weighted},
        "multislerp": {"models": weighted},
        "karcher": {"models": plain},
        "nearswap": {"models": plain[:1], "parameters": {"t": 0.004}},
    }[method]
    return {"merge_method": method, "base_model": path["base"], **out, **extra}


NEW_DETERMINISTIC = [
    "breadcrumbs",
    "breadcrumbs_ties",
    "model_stock",
    "sce",
    "nuslerp",
    "multislerp",
    "karcher",
    "nearswap",
]


@pytest.mark.parametrize("method", NEW_DETERMINISTIC)
def test_checkpoint_merge_bit_identical_to_mergekit(ckpts, tmp_path, method):  # noqa: F811
    for tag, extra in (("bf16", {}), ("f32", {"out_dtype": "bfloat16"})):
        config = recipe(method, ckpts, tag, **extra)
        theirs = run_mergekit(config, tmp_path / f"mk-{tag}")
        ours = run_ours(config, tmp_path / f"ours-{tag}")
        assert set(ours) == set(theirs)
        for name in theirs:
            assert_identical(ours[name], theirs[name], (method, tag, name))


def test_baseless_nuslerp_multislerp_and_karcher_with_base_listed(ckpts, tmp_path):  # noqa: F811
    for method in ("nuslerp", "multislerp"):
        config = recipe(method, ckpts, "bf16")
        del config["base_model"]
        theirs, ours = (
            run_mergekit(config, tmp_path / f"mk-{method}"),
            run_ours(config, tmp_path / f"o-{method}"),
        )
        for name in theirs:
            assert_identical(ours[name], theirs[name], (method, name))
    config = recipe("karcher", ckpts, "f32")
    config["models"].insert(1, {"model": config["base_model"]})  # input order matters
    theirs, ours = run_mergekit(config, tmp_path / "mk-k"), run_ours(config, tmp_path / "o-k")
    for name in theirs:
        assert_identical(ours[name], theirs[name], ("karcher", name))


@pytest.mark.parametrize("method", ["della", "della_linear"])
def test_della_checkpoint_merge_is_seeded_and_keeps_density(ckpts, tmp_path, method):  # noqa: F811
    config = recipe("breadcrumbs", ckpts, "f32")
    config["merge_method"] = method
    config["parameters"] = {"density": 0.4, "epsilon": 0.1, "rescale": False, "normalize": False}
    one = run_ours(config, tmp_path / "one", random_seed=3)
    two = run_ours(config, tmp_path / "two", random_seed=3)
    other = run_ours(config, tmp_path / "three", random_seed=4)
    assert all(torch.equal(one[n], two[n]) for n in one)
    assert any(not torch.equal(one[n], other[n]) for n in one)
    # with one model of weight 1 and no rescale, the merge minus the base is the kept delta
    config["models"] = [{"model": str(ckpts["a_f32"]), "parameters": {"weight": 1.0}}]
    merged = run_ours(config, tmp_path / "single", random_seed=3)
    base = load_dir(ckpts["base_f32"])
    kept = sum(int(((merged[n] - base[n]) != 0).sum()) for n in base)
    total = sum(base[n].numel() for n in base)
    assert abs(kept / total - 0.4) < 0.02


# --------------------------------------------------------------------------- config errors
@pytest.mark.parametrize(
    "method,change,expect",
    [
        ("model_stock", {"models": "one"}, "at least two models besides the base"),
        ("nearswap", {"parameters": {}}, "nearswap needs t"),
        ("nearswap", {"models": "two"}, "exactly one model besides the base"),
        ("nuslerp", {"models": "one"}, "exactly two models besides the base"),
        ("multislerp", {"weights": None}, "weight: required for multislerp"),
        ("sce", {"parameters": {"select_topk": 1.5}}, "select_topk: must be within [0, 1]"),
        ("sce", {"parameters": {"density": 0.5}}, "sce does not take density"),
        ("karcher", {"parameters": {"max_iter": 0}}, "max_iter: expected a positive integer"),
        ("breadcrumbs", {"parameters": {"gamma": -0.1, "density": 0.5}}, "gamma: must be within"),
        ("della", {"parameters": {"density": 0.1, "epsilon": 0.2}}, "density +/- epsilon"),
        ("model_stock", {"no_base": True}, "model_stock needs a base model"),
    ],
)
def test_new_method_config_errors(ckpts, method, change, expect):  # noqa: F811
    config = recipe("breadcrumbs" if method == "della" else method, ckpts, "f32")
    config["merge_method"] = method
    if change.get("models") == "one":
        config["models"] = config["models"][:1]
    if change.get("models") == "two":
        config["models"] = recipe("karcher", ckpts, "f32")["models"]
    if "weights" in change:
        config["models"] = [{"model": m["model"]} for m in config["models"]]
    if "parameters" in change:
        config["parameters"] = change["parameters"]
    if change.get("no_base"):
        del config["base_model"]
    with pytest.raises(UserError, match=expect.replace("[", r"\[").replace("+", r"\+")):
        parse_config(config)


# --------------------------------------------------------------------------- Megatron space
@pytest.mark.parametrize("method", ["breadcrumbs_ties", "della", "model_stock", "multislerp"])
def test_megatron_merge_equals_merge_of_hf_exports(tmp_path, method, mc):
    from megatron_cpt.convert.exporter import ExportConfig, export_hf

    params = {
        "breadcrumbs_ties": {"density": 0.4, "gamma": 0.05, "weight": 0.8},
        "della": {"density": 0.4, "epsilon": 0.1, "weight": 0.8},
        "model_stock": {},
        "multislerp": {"weight": 0.5},
    }[method]

    def config(prefix):
        return {
            "merge_method": method,
            "base_model": str(mc[f"{prefix}base"]),
            "models": [{"model": str(mc[f"{prefix}{n}"])} for n in ("a", "b")],
            **({"parameters": params} if params else {}),
        }

    options = MergeOptions(progress=False, random_seed=7)
    merge_checkpoints(parse_config(config("")), tmp_path / "mc-merged", options)
    export_hf(ExportConfig(str(tmp_path / "mc-merged"), str(tmp_path / "exported")))
    merge_checkpoints(parse_config(config("export-")), tmp_path / "hf-merged", options)
    exported, hf = load_dir(tmp_path / "exported"), load_dir(tmp_path / "hf-merged")
    assert set(exported) == set(hf)
    for name in hf:
        assert torch.equal(exported[name], hf[name]), (method, name)


@pytest.fixture(scope="module")
def mc(tmp_path_factory):
    """base / a / b as HF, imported to Megatron at TP=2 (vocab padded), and their HF exports."""
    pytest.importorskip("megatron.core")
    from test_merge_megatron import write_hf

    from megatron_cpt.convert.exporter import ExportConfig, export_hf
    from megatron_cpt.convert.importer import ImportConfig, import_hf

    root = tmp_path_factory.mktemp("mc")
    base = write_hf(root / "hf-base", 0)
    write_hf(root / "hf-a", 1, base)
    write_hf(root / "hf-b", 2, base)
    out = {}
    for name in ("base", "a", "b"):
        import_hf(ImportConfig(str(root / f"hf-{name}"), str(root / f"mc-{name}"), 2))
        export_hf(ExportConfig(str(root / f"mc-{name}"), str(root / f"export-{name}")))
        out[name], out[f"export-{name}"] = root / f"mc-{name}", root / f"export-{name}"
    return out


# --------------------------------------------------------------------------- device path
@pytest.mark.parametrize(
    "method", ["task_arithmetic", "linear", "nearswap", "ties", "dare_ties", "multislerp"]
)
def test_chunked_device_path_equals_plain_merge(ckpts, tmp_path, method):  # noqa: F811
    """The device code path (move, compute in row chunks or on the host, move back) run with
    device=cpu and a budget far below one tensor equals the plain merge bit for bit."""
    if method in ("ties", "dare_ties", "task_arithmetic"):
        config = recipe("breadcrumbs", ckpts, "bf16", parameters={"density": 0.5})
        config["merge_method"] = method
    elif method == "linear":
        config = recipe("multislerp", ckpts, "bf16")
        config["merge_method"] = "linear"
        del config["base_model"]
    else:
        config = recipe(method, ckpts, "bf16")
    plain = run_ours(config, tmp_path / "plain", random_seed=2)
    merger_stats = {}
    original = TensorMerger._on_device

    def spy(self, *args):
        out = original(self, *args)
        merger_stats["chunked"], merger_stats["on_host"] = self.chunked, self.on_host
        return out

    TensorMerger._on_device = spy
    try:
        chunked = run_ours(config, tmp_path / "dev", random_seed=2, device_budget_bytes=4096)
    finally:
        TensorMerger._on_device = original
    for name in plain:
        assert_identical(chunked[name], plain[name], (method, name))
    if method in ROW_SEPARABLE:
        assert merger_stats["chunked"] > 0 and merger_stats["on_host"] == 0
    else:
        assert merger_stats["on_host"] > 0


def test_cli_device_cuda_without_gpu_is_one_line(ckpts, tmp_path):  # noqa: F811
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    import yaml

    cfg_file = tmp_path / "m.yml"
    cfg_file.write_text(yaml.safe_dump(recipe("karcher", ckpts, "f32")))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools/merge_models.py"), str(cfg_file), str(tmp_path / "o"),
         "--device", "cuda", "--no-progress"],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: --device cuda: no CUDA device is available on this machine"
    ]
    assert not (tmp_path / "o").exists()
