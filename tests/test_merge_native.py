"""The native fused TIES kernel (csrc/ties.cpp) against the PyTorch kernel it replaces: bit for
bit, on random tensors and the edge cases of the trim and the sign election, and through a whole
merge. The PyTorch kernel itself is checked against mergekit and a plain reference in
tests/test_merge.py (which, with the library built, runs the native kernel too)."""

from __future__ import annotations

import pytest
import torch
from test_merge import cfg, ckpts, run_ours  # noqa: F401

from megatron_cpt.merge import methods, native

TIES = methods.TASK_ARITHMETIC_FAMILY["ties"]
BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
built = pytest.mark.skipif(
    not native.enabled(), reason="native merge library not built (cmake -S . -B build/native)"
)


@pytest.fixture(autouse=True, params=["dispatch", "generic"])
def variant(request, monkeypatch):
    """Each test runs the kernel the library picks for this CPU (AVX2 here) and the generic
    build (what a CPU without AVX2 runs)."""
    if request.param == "generic":
        monkeypatch.setenv(native.ENV_SWITCH, "generic")
    return request.param


def both(monkeypatch, base, tensors, weights, densities, normalize=True, lambda_=1.0):
    """(native, PyTorch) results of the same TIES call."""
    fused = native.ties(base, tensors, weights, densities, normalize=normalize, lambda_=lambda_)
    assert fused is not None, "the native kernel declined a case it should handle"
    with monkeypatch.context() as m:
        m.setenv(native.ENV_SWITCH, "0")
        reference = methods.task_arithmetic_family(
            TIES,
            base,
            tensors,
            weights,
            densities,
            normalize=normalize,
            lambda_=lambda_,
            rescale=False,
        )
    return fused, reference


def assert_bits_equal(fused: torch.Tensor, reference: torch.Tensor):
    assert fused.dtype == reference.dtype and fused.shape == reference.shape
    a = fused.contiguous().view(BITS[fused.dtype]).reshape(-1)
    b = reference.contiguous().view(BITS[reference.dtype]).reshape(-1)
    differing = int((a != b).sum())
    assert differing == 0, (
        f"{differing} of {a.numel()} entries differ; max "
        f"{(fused.float() - reference.float()).abs().max().item()}"
    )


def finetunes(base, count, scale, generator, quantum=None):
    out = []
    for i in range(count):
        noise = torch.randn(base.shape, generator=generator) * scale * (i + 1)
        if quantum is not None:  # few distinct magnitudes: many ties at the threshold
            noise = torch.round(noise / quantum) * quantum
        out.append((base.float() + noise).to(base.dtype))
    return out


def test_switch_forces_the_pytorch_kernel(monkeypatch):
    monkeypatch.setenv(native.ENV_SWITCH, "0")
    base = torch.zeros(8)
    assert native.ties(base, [base + 1], [1.0], [0.5], normalize=True, lambda_=1.0) is None
    assert "PyTorch" in native.describe()


@built
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("count", [1, 2, 3, 4])
@pytest.mark.parametrize("normalize,lambda_", [(True, 1.0), (False, 0.7), (True, 1.3)])
def test_random_tensors(monkeypatch, dtype, count, normalize, lambda_):
    g = torch.Generator().manual_seed(count * 10 + DTYPES.index(dtype))
    base = (torch.randn(97, 61, generator=g) * 0.02).to(dtype)
    tensors = finetunes(base, count, 0.002, g)
    weights = (torch.rand(count, generator=g) * 1.5 - 0.3).tolist()
    densities = (torch.rand(count, generator=g) * 0.9 + 0.05).tolist()
    assert_bits_equal(*both(monkeypatch, base, tensors, weights, densities, normalize, lambda_))


@built
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sixteen_bit_up_to_eight_models(monkeypatch, dtype):
    g = torch.Generator().manual_seed(8)
    base = (torch.randn(4099, generator=g) * 0.02).to(dtype)
    tensors = finetunes(base, 8, 0.001, g)
    weights = [0.1 * (i + 1) for i in range(8)]
    densities = [0.1 * (i + 1) for i in range(8)]
    assert_bits_equal(*both(monkeypatch, base, tensors, weights, densities))


def test_declines_where_pytorch_sums_in_another_order():
    """float32 with five or more models: PyTorch's reduction order depends on the shape, so the
    PyTorch kernel runs (and so do float64, mixed dtypes and empty tensors)."""
    base = torch.zeros(16)
    five = [base + i for i in range(1, 6)]
    call = dict(normalize=True, lambda_=1.0)
    assert native.ties(base, five, [1.0] * 5, [0.5] * 5, **call) is None
    assert native.ties(base.double(), [base.double() + 1], [1.0], [0.5], **call) is None
    assert native.ties(base, [base.bfloat16() + 1], [1.0], [0.5], **call) is None
    assert native.ties(torch.zeros(0), [torch.zeros(0)], [1.0], [0.5], **call) is None


@built
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "case",
    [
        "density_0_and_1",
        "equal_magnitudes",
        "zero_deltas",
        "signed_zero_base",
        "sign_tie",
        "zero_weight_sum",
        "non_contiguous",
        "tiny_density",
    ],
)
def test_edge_cases(monkeypatch, dtype, case):
    g = torch.Generator().manual_seed(3)
    base = (torch.randn(53, 37, generator=g) * 0.02).to(dtype)
    tensors = finetunes(base, 3, 0.002, g)
    weights, densities = [0.7, 0.5, 0.3], [0.4, 0.6, 0.5]
    if case == "density_0_and_1":
        densities = [0.0, 1.0, 0.5]
    elif case == "equal_magnitudes":  # every |delta| the same: the trim is all tie-break
        signs = torch.randint(0, 2, base.shape, generator=g) * 2 - 1
        tensors = [(base.float() + signs * 2**-8 * (i + 1)).to(dtype) for i in range(3)]
    elif case == "zero_deltas":
        tensors = [base.clone(), base.clone(), tensors[2]]
    elif case == "signed_zero_base":
        base = torch.where(torch.rand(base.shape, generator=g) < 0.5, -0.0, 0.0).to(dtype)
        tensors = [torch.where(t.abs() > 0.01, t, -0.0 * t) for t in tensors]
    elif case == "sign_tie":  # opposite deltas of equal weight: the summed mass is exactly 0
        delta = (tensors[0].float() - base.float()).to(dtype)
        tensors = [
            (base.float() + delta.float()).to(dtype),
            (base.float() - delta.float()).to(dtype),
        ]
        weights, densities = [0.5, 0.5], [0.5, 0.5]
    elif case == "zero_weight_sum":  # agreeing weights cancel: the divisor is 0, replaced by 1
        weights = [0.5, -0.5, 0.25]
    elif case == "non_contiguous":
        base = base.t()
        tensors = [t.t() for t in tensors]
    elif case == "tiny_density":  # k = max(1, int(d * n)) = 1
        densities = [1e-9, 1e-9, 1e-9]
    assert_bits_equal(*both(monkeypatch, base, tensors, weights, densities))


@built
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_many_chunks_many_threads_many_ties(monkeypatch, dtype):
    """Over a million entries the kernel splits the tensor into chunks run by several threads;
    ties at the threshold must still keep the lowest flat indices across chunk boundaries."""
    g = torch.Generator().manual_seed(5)
    base = (torch.randn(3 * 2**20 + 7, generator=g) * 0.02).to(dtype)
    tensors = finetunes(base, 2, 0.002, g, quantum=2**-12)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        result = both(monkeypatch, base, tensors, [0.6, 0.4], [0.3, 0.55])
    finally:
        torch.set_num_threads(threads)
    assert_bits_equal(*result)


@built
@pytest.mark.parametrize("tag", ["f32", "bf16"])
def test_whole_merge_equal_both_ways(ckpts, tmp_path, monkeypatch, tag):  # noqa: F811
    calls = []
    original = native.ties

    def counting(*args, **kwargs):
        result = original(*args, **kwargs)
        calls.append(result is not None)
        return result

    monkeypatch.setattr(native, "ties", counting)
    config = cfg("ties", ckpts, tag, parameters={"lambda": 0.9})
    fused = run_ours(config, tmp_path / "native")
    assert calls and all(calls), "the merge did not run the native kernel"
    monkeypatch.setenv(native.ENV_SWITCH, "0")
    reference = run_ours(config, tmp_path / "pytorch")
    assert set(fused) == set(reference)
    for name in reference:
        assert_bits_equal(fused[name], reference[name])


@built
def test_tie_cut_at_a_chunk_boundary(monkeypatch):
    """Every magnitude equal over two chunks (2**20 entries each) and k = one chunk: the cut
    falls exactly on the boundary, and the first chunk's entries are the ones kept."""
    g = torch.Generator().manual_seed(6)
    # base in [1, 1.5) on bf16's grid there (2**-7), so base +- 2**-7 is exact
    base = (1 + torch.randint(0, 64, (2**21,), generator=g) * 2**-7).bfloat16()
    signs = torch.randint(0, 2, base.shape, generator=g) * 2 - 1
    tensor = (base.float() + signs * 2**-7).bfloat16()
    assert (tensor.float() - base.float()).abs().unique().tolist() == [2**-7]
    fused, reference = both(monkeypatch, base, [tensor], [1.0], [0.5])
    assert_bits_equal(fused, reference)
    assert torch.equal(fused[: 2**20], tensor[: 2**20]) and torch.equal(
        fused[2**20 :], base[2**20 :]
    )
