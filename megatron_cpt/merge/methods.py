"""Per-tensor merge kernels: TIES, DARE-TIES, DARE-linear, task arithmetic, linear, SLERP.

Each kernel sees every model's copy of ONE logical tensor (an HF-named weight) and nothing else,
which is what lets the engine stream a checkpoint tensor by tensor with bounded memory, and lets
Megatron-space merging reuse the same kernels on the same logical tensors.

Arithmetic follows mergekit's order of operations (same compute dtype, same casts, same
reduction order) so that results are bit-identical to mergekit 0.1.5 wherever the published
algorithm and mergekit agree; the two deliberate differences are documented where they occur:

- magnitude trimming keeps exactly ``k`` entries and breaks ties in magnitude at the threshold by
  the lower flat index (mergekit's unstable argsort leaves that choice unspecified), and finds the
  threshold by a two-pass radix select instead of a full argsort (~15x faster on CPU, no int64
  index tensor);
- DARE's rescale is the published ``1/density`` (= ``1/(1-p)``); ``rescale: l1`` reproduces
  mergekit 0.1.5, which rescales to preserve the L1 norm instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

import torch

# SLERP works through the flattened tensor in chunks so its float32 scratch stays bounded
# regardless of tensor size; the chunking also fixes the rounding of the norms (mergekit uses the
# same chunk size, which is what makes SLERP outputs bit-identical to its).
_SLERP_CHUNK = 1024 * 1024
SLERP_DOT_THRESHOLD = 0.9995
SLERP_EPS = 1e-8


class Sparsify(StrEnum):
    NONE = "none"
    MAGNITUDE = "magnitude"  # TIES trim
    RANDOM = "random"  # DARE drop


@dataclass(frozen=True)
class MethodSpec:
    """How a task-arithmetic-family method is composed, with mergekit's per-method defaults."""

    name: str
    sparsify: Sparsify
    sign_consensus: bool
    default_normalize: bool
    default_rescale: bool


TASK_ARITHMETIC_FAMILY: dict[str, MethodSpec] = {
    "task_arithmetic": MethodSpec("task_arithmetic", Sparsify.NONE, False, False, False),
    "ties": MethodSpec("ties", Sparsify.MAGNITUDE, True, True, False),
    "dare_ties": MethodSpec("dare_ties", Sparsify.RANDOM, True, False, True),
    "dare_linear": MethodSpec("dare_linear", Sparsify.RANDOM, False, False, True),
}
METHODS = (*TASK_ARITHMETIC_FAMILY, "linear", "slerp")


# Radix-select passes histogram this many elements at a time, so no full-size integer temporary
# (bincount may widen its input) is ever allocated for a large tensor.
_HIST_CHUNK = 1 << 24


def _histogram(keys: torch.Tensor, bins: int, shift: int = 0, mask: int | None = None):
    counts = torch.zeros(bins, dtype=torch.int64)
    for start in range(0, keys.numel(), _HIST_CHUNK):
        part = keys[start : start + _HIST_CHUNK]
        if shift:
            part = part >> shift
        if mask is not None:
            part = part & mask
        counts += torch.bincount(part, minlength=bins)
    return counts


def _select(counts: torch.Tensor, k: int) -> tuple[int, int]:
    """The bin holding the k-th largest element, and how many elements lie above that bin."""
    at_or_above = counts.flip(0).cumsum(0).flip(0)
    index = int((at_or_above >= k).nonzero().max())
    above = int(at_or_above[index + 1]) if index + 1 < at_or_above.numel() else 0
    return index, above


def magnitude_keys(tensor: torch.Tensor) -> torch.Tensor:
    """Flat integer keys ordered exactly like ``|tensor|`` as float32 (mergekit's sort key).

    Non-negative IEEE floats order like their bit patterns read as integers, so a 16-bit tensor
    needs no float32 copy at all (bf16/fp16 -> fp32 is exact and monotonic) and fp32 needs none
    beyond ``abs``. float64 is rounded to float32 first, as mergekit does on CPU.
    """
    magnitudes = tensor.abs().reshape(-1)
    if magnitudes.dtype in (torch.bfloat16, torch.float16):
        return magnitudes.view(torch.int16)
    return magnitudes.to(torch.float32).view(torch.int32)


def kth_largest_key(keys: torch.Tensor, k: int) -> int:
    """The k-th largest of non-negative int16/int32 keys by radix select: O(n), no sort.

    NaNs have the largest keys, as in a descending sort that puts NaN first.
    """
    if keys.dtype == torch.int16:
        return _select(_histogram(keys, 1 << 15), k)[0]
    high, above = _select(_histogram(keys, 1 << 15, shift=16), k)
    low_keys = torch.cat(
        [p[(p >> 16) == high] for p in keys.split(_HIST_CHUNK)]
    )  # only the elements of the selected high bucket
    low, _ = _select(_histogram(low_keys, 1 << 16, mask=0xFFFF), k - above)
    return (high << 16) | low


def kth_largest_magnitude(magnitudes: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest value of a flat, non-negative float32 tensor (see kth_largest_key)."""
    key = kth_largest_key(magnitudes.view(torch.int32), k)
    return torch.tensor(key, dtype=torch.int32).view(torch.float32)


def magnitude_trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """TIES trim: keep the ``max(1, int(density * n))`` largest-magnitude entries, zero the rest.

    Exactly k survive; among entries equal in magnitude at the threshold the lower flat indices
    win, so the result is deterministic and independent of how the tensor is sharded. Working
    memory is the integer keys (2 or 4 bytes per element) and a bool mask.
    """
    if density >= 1:
        return delta
    numel = delta.numel()
    if density <= 0 or numel == 0:
        return torch.zeros_like(delta)
    k = max(1, int(density * numel))
    keys = magnitude_keys(delta)
    threshold = kth_largest_key(keys, k)
    keep = keys > threshold
    missing = k - int(keep.sum())
    if missing > 0:
        keep[(keys == threshold).nonzero().squeeze(1)[:missing]] = True
    del keys
    return delta.masked_fill(~keep.reshape(delta.shape), 0)


def random_drop(
    delta: torch.Tensor, density: float, generator: torch.Generator, rescale: bool | str
) -> torch.Tensor:
    """DARE: keep each entry with probability ``density`` (seeded), then rescale the survivors.

    ``rescale=True`` divides by ``density`` (the paper's 1/(1-p)), keeping the expected delta
    unchanged; ``"l1"`` matches mergekit 0.1.5, which restores the L1 norm of the delta instead.
    The Bernoulli draw uses the same dtype and call as mergekit, so the same seed yields the same
    mask.
    """
    if density >= 1:
        return delta
    if density <= 0:
        return torch.zeros_like(delta)
    work_dtype = torch.bfloat16 if delta.dtype == torch.bfloat16 else torch.float32
    mask = torch.bernoulli(torch.full_like(delta, density, dtype=work_dtype), generator=generator)
    work = delta.to(work_dtype)
    kept = work * mask
    if rescale == "l1":
        before, after = work.abs().sum(), kept.abs().sum()
        if before >= 1e-7 and after >= 1e-7:
            kept = kept * (before / after)
    elif rescale:
        kept = kept / density
    return kept.to(delta.dtype)


def task_arithmetic_family(
    spec: MethodSpec,
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    *,
    normalize: bool,
    lambda_: float,
    rescale: bool | str,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``base + lambda * combine(sparsify(w_i * (x_i - base)))`` for the task-vector methods.

    TIES (Yadav et al. 2023): trim, elect each entry's sign by the sign of the summed weighted
    mass, average only the entries that agree with it (a "disjoint mean": divide by the summed
    weights of the agreeing models, not of all models). Task arithmetic and DARE-linear just sum.
    """
    if not tensors:
        return base
    deltas = base.new_empty((len(tensors), *base.shape))
    for index, (tensor, density) in enumerate(zip(tensors, densities)):
        delta = tensor - base
        if spec.sparsify is Sparsify.MAGNITUDE:
            delta = magnitude_trim(delta, density)
        elif spec.sparsify is Sparsify.RANDOM:
            if generator is None:
                raise ValueError(f"{spec.name} needs a seeded generator")
            delta = random_drop(delta, density, generator, rescale)
        deltas[index] = delta
        del delta

    weight = torch.tensor(list(weights), dtype=deltas.dtype)
    weight = weight.reshape(-1, *([1] * base.dim()))
    deltas.mul_(weight)

    if spec.sign_consensus:
        elected = (deltas.sum(dim=0) >= 0).to(deltas.dtype) * 2 - 1
        agree = deltas.sign() == elected
        del elected
        mixed = (deltas * agree).sum(dim=0)
        divisor = (weight * agree).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = deltas.sum(dim=0)
        divisor = weight.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    del deltas

    if normalize:
        mixed /= divisor
    if lambda_ != 1:
        mixed *= lambda_
    return (base + mixed).to(base.dtype)


def linear(tensors: Sequence[torch.Tensor], weights: Sequence[float], normalize: bool):
    """Weighted average (Wortsman et al. 2022, "model soups"), accumulated in float32."""
    first = tensors[0]
    dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
    coefficients = torch.tensor(list(weights), dtype=dtype)
    result = torch.zeros_like(first, dtype=dtype)
    for tensor, coefficient in zip(tensors, coefficients.unbind(0)):
        result.addcmul_(tensor, coefficient.reshape((1,) * first.dim()))
    if normalize:
        result.div_(coefficients.sum().reshape((1,) * first.dim()))
    return result.to(first.dtype)


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation of the whole tensor from ``v0`` (t=0, the base) to ``v1`` (t=1).

    The angle is taken between the two tensors as flat vectors; nearly collinear pairs
    (|cos| > 0.9995) fall back to linear interpolation, where the sine formula is ill-conditioned.
    """
    dtype = torch.float64 if v0.dtype == torch.float64 else torch.float32
    a = v0.reshape(1, -1)
    b = v1.reshape(1, -1)
    tt = torch.tensor([[t]], dtype=dtype)
    if not a.shape[1]:
        return ((1 - tt) * a + tt * b).reshape(v0.shape).to(v0.dtype)
    chunks = range(0, a.shape[1], _SLERP_CHUNK)

    def part(x: torch.Tensor, start: int) -> torch.Tensor:
        return x[:, start : start + _SLERP_CHUNK].to(dtype)

    norm_a = torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(part(a, s), dim=1, keepdim=True) for s in chunks]),
        dim=0,
    )
    norm_b = torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(part(b, s), dim=1, keepdim=True) for s in chunks]),
        dim=0,
    )
    norm_a = torch.where(norm_a > SLERP_EPS, norm_a, 1)
    norm_b = torch.where(norm_b > SLERP_EPS, norm_b, 1)
    dot = (
        torch.stack(
            [
                ((part(a, s) / norm_a) * (part(b, s) / norm_b)).sum(dim=1, keepdim=True)
                for s in chunks
            ]
        )
        .sum(dim=0)
        .clamp(-1, 1)
    )
    collinear = dot.abs() > SLERP_DOT_THRESHOLD
    theta = torch.acos(torch.where(collinear, 0, dot))
    sin_theta = torch.sin(theta)
    coef_a = torch.where(collinear, 1 - tt, torch.sin((1 - tt) * theta) / sin_theta)
    coef_b = torch.where(collinear, tt, torch.sin(tt * theta) / sin_theta)
    result = torch.empty_like(a)
    for start in chunks:
        result[:, start : start + _SLERP_CHUNK] = coef_a * part(a, start) + coef_b * part(b, start)
    return result.reshape(v0.shape)
