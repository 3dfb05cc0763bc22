"""Per-tensor merge kernels: the task-vector family (task arithmetic, TIES, DARE, Model
Breadcrumbs, DELLA), linear, SLERP, NuSLERP, Multi-SLERP, Karcher, Model Stock, SCE, NearSwap.

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
- DARE's rescale is the published ``1/density`` (= ``1/(1-p)``), DELLA's the published per-entry
  ``1/p_i``; ``rescale: l1`` reproduces mergekit 0.1.5, which rescales to preserve the L1 norm
  instead. Random draws come from a per-tensor CPU generator (mergekit: the global one), so the
  same generator state gives mergekit's masks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

import torch

from megatron_cpt.merge import native

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
    MAGNITUDE_OUTLIERS = "magnitude_outliers"  # Model Breadcrumbs: drop the largest and smallest
    DELLA = "della_magprune"  # DELLA: keep probability grows with the magnitude's rank


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
    "breadcrumbs": MethodSpec("breadcrumbs", Sparsify.MAGNITUDE_OUTLIERS, False, False, False),
    "breadcrumbs_ties": MethodSpec(
        "breadcrumbs_ties", Sparsify.MAGNITUDE_OUTLIERS, True, False, False
    ),
    "della": MethodSpec("della", Sparsify.DELLA, True, True, True),
    "della_linear": MethodSpec("della_linear", Sparsify.DELLA, False, False, True),
}
# Methods whose result depends on a random draw (seeded per tensor by the engine).
RANDOMIZED = {"dare_ties", "dare_linear", "della", "della_linear"}
OTHER_METHODS = (
    "linear",
    "slerp",
    "nuslerp",
    "multislerp",
    "karcher",
    "model_stock",
    "sce",
    "nearswap",
)
METHODS = (*TASK_ARITHMETIC_FAMILY, *OTHER_METHODS)


# Radix-select passes histogram this many elements at a time, so no full-size integer temporary
# (bincount may widen its input) is ever allocated for a large tensor.
_HIST_CHUNK = 1 << 24


def _histogram(keys: torch.Tensor, bins: int, shift: int = 0, mask: int | None = None):
    counts = torch.zeros(bins, dtype=torch.int64, device=keys.device)
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


def trim_count(density: float, numel: int) -> int:
    """The TIES trim's k: ``max(1, int(density * numel))`` kept entries; -1 keeps all, 0 none.
    One rule for the PyTorch kernel below and the native kernel (``native.ties``)."""
    if density >= 1:
        return -1
    if density <= 0 or numel == 0:
        return 0
    return max(1, int(density * numel))


def magnitude_trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """TIES trim: keep the ``max(1, int(density * n))`` largest-magnitude entries, zero the rest.

    Exactly k survive; among entries equal in magnitude at the threshold the lower flat indices
    win, so the result is deterministic and independent of how the tensor is sharded. Working
    memory is the integer keys (2 or 4 bytes per element) and a bool mask.
    """
    k = trim_count(density, delta.numel())
    if k < 0:
        return delta
    if k == 0:
        return torch.zeros_like(delta)
    keys = magnitude_keys(delta)
    threshold = kth_largest_key(keys, k)
    keep = keys > threshold
    missing = k - int(keep.sum())
    if missing > 0:
        keep[(keys == threshold).nonzero().squeeze(1)[:missing]] = True
    del keys
    return delta.masked_fill(~keep.reshape(delta.shape), 0)


def _l1_rescaled(tensor: torch.Tensor, kept: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """mergekit's ``rescale``: scale the survivors so the delta keeps its L1 norm."""
    before, after = tensor.abs().sum(), kept.abs().sum()
    if before < eps or after < eps:
        return kept
    return kept * (before / after)


def random_drop(
    delta: torch.Tensor, density: float, generator: torch.Generator, rescale: bool | str
) -> torch.Tensor:
    """DARE: keep each entry with probability ``density`` (seeded), then rescale the survivors.

    ``rescale=True`` divides by ``density`` (the paper's 1/(1-p)), keeping the expected delta
    unchanged; ``"l1"`` matches mergekit 0.1.5, which restores the L1 norm of the delta instead.
    The Bernoulli draw uses the same dtype and call as mergekit, so the same seed yields the same
    mask. The draw is made on the generator's device (the CPU) whatever device ``delta`` is on,
    so a GPU merge keeps the CPU merge's masks.
    """
    if density >= 1:
        return delta
    if density <= 0:
        return torch.zeros_like(delta)
    work_dtype = torch.bfloat16 if delta.dtype == torch.bfloat16 else torch.float32
    fill = torch.full(delta.shape, density, dtype=work_dtype, device=generator.device)
    mask = torch.bernoulli(fill, generator=generator).to(delta.device)
    work = delta.to(work_dtype)
    kept = work * mask
    if rescale == "l1":
        kept = _l1_rescaled(work, kept)
    elif rescale:
        kept = kept / density
    return kept.to(delta.dtype)


def magnitude_outliers(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Model Breadcrumbs (Davari & Belilovsky 2023): drop the ``gamma`` fraction of largest
    magnitudes (outliers) and the smallest, keeping ``int(density * n)`` entries in between.

    Deterministic. The ranking is mergekit's own call (an ascending ``torch.sort`` of the
    magnitudes as float32), so entries equal in magnitude at either cut are chosen exactly as
    mergekit chooses them and results are bit-identical to it on the CPU.
    """
    if density >= 1:
        return delta
    numel = delta.numel()
    target = int(density * numel)
    n_top = int(gamma * numel)
    n_bottom = max(0, numel - target - n_top)
    order = torch.sort(delta.abs().reshape(-1).float(), descending=False).indices
    mask = torch.zeros(numel, dtype=delta.dtype, device=delta.device)
    mask[order[n_bottom : n_bottom + target]] = 1
    del order
    return delta * mask.reshape(delta.shape)


# DELLA ranks magnitudes row by row; rows are ranked this many elements at a time so the int64
# sort indices stay bounded for the embedding matrix (ranks are per row, so this changes nothing).
_DELLA_ROWS_ELEMENTS = 1 << 24


def della_magprune(
    delta: torch.Tensor,
    density: float,
    epsilon: float,
    generator: torch.Generator,
    rescale: bool | str,
) -> torch.Tensor:
    """DELLA's MagPrune (Deep et al. 2024): within each row, the entry of magnitude rank r
    (1 = smallest) is kept with probability ``density - epsilon + 2 epsilon (r-1)/(cols-1)``.

    The probabilities are computed with mergekit's operations (argsort of argsort, in the same
    work dtype), so the same generator stream gives mergekit's mask. ``rescale=True`` divides each
    survivor by its own keep probability (the paper's 1/p_i: the expected delta is unchanged);
    ``"l1"`` is mergekit's rescale (restore the delta's L1 norm); ``False`` none.
    """
    if density >= 1:
        return delta
    if density <= 0:
        return torch.zeros_like(delta)
    if density + epsilon >= 1 or density - epsilon <= 0:
        raise ValueError("epsilon must keep density +/- epsilon within (0, 1)")
    shape = delta.shape
    work_dtype = torch.bfloat16 if delta.dtype == torch.bfloat16 else torch.float32
    rows = delta if delta.dim() >= 2 else delta.unsqueeze(0)
    probs = torch.empty(rows.shape, dtype=work_dtype, device=generator.device)
    step = max(1, _DELLA_ROWS_ELEMENTS // max(1, rows.shape[1]))
    for start in range(0, rows.shape[0], step):
        part = rows[start : start + step].to(generator.device)
        ranks = torch.argsort(part.abs(), dim=1).argsort(dim=1).to(work_dtype) + 1
        low = ranks.min(dim=1, keepdim=True).values
        high = ranks.max(dim=1, keepdim=True).values
        norm = ((ranks - low) / (high - low)).clamp(0, 1)
        probs[start : start + step] = (density - epsilon) + norm * 2 * epsilon
        del ranks, norm
    mask = torch.bernoulli(probs, generator=generator).to(work_dtype).to(delta.device)
    work = rows.to(work_dtype)
    kept = work * mask
    if rescale == "l1":
        kept = _l1_rescaled(work, kept)
    elif rescale:
        kept = kept / probs.to(delta.device)
    return kept.to(delta.dtype).reshape(shape)


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
    gammas: Sequence[float] | None = None,
    epsilons: Sequence[float] | None = None,
) -> torch.Tensor:
    """``base + lambda * combine(sparsify(w_i * (x_i - base)))`` for the task-vector methods.

    TIES (Yadav et al. 2023): trim, elect each entry's sign by the sign of the summed weighted
    mass, average only the entries that agree with it (a "disjoint mean": divide by the summed
    weights of the agreeing models, not of all models). Task arithmetic and DARE-linear just sum.
    Breadcrumbs and DELLA differ only in the sparsifier (``spec.sparsify``).
    """
    if not tensors:
        return base
    if spec.sparsify is Sparsify.MAGNITUDE and spec.sign_consensus and not rescale:
        # TIES: the fused native kernel where it is built (bit-identical; native.py says when
        # it does not apply), this function's PyTorch code otherwise.
        fused = native.ties(base, tensors, weights, densities, normalize=normalize, lambda_=lambda_)
        if fused is not None:
            return fused
    gammas = gammas or [0.01] * len(tensors)
    epsilons = epsilons or [0.15] * len(tensors)
    deltas = base.new_empty((len(tensors), *base.shape))
    for index, (tensor, density) in enumerate(zip(tensors, densities)):
        delta = tensor - base
        if spec.sparsify is Sparsify.MAGNITUDE:
            trimmed = magnitude_trim(delta, density)
            delta = _l1_rescaled(delta, trimmed) if rescale else trimmed
        elif spec.sparsify is Sparsify.MAGNITUDE_OUTLIERS:
            trimmed = magnitude_outliers(delta, density, gammas[index])
            delta = _l1_rescaled(delta, trimmed) if rescale else trimmed
        elif spec.sparsify in (Sparsify.RANDOM, Sparsify.DELLA):
            if generator is None:
                raise ValueError(f"{spec.name} needs a seeded generator")
            if spec.sparsify is Sparsify.RANDOM:
                delta = random_drop(delta, density, generator, rescale)
            else:
                delta = della_magprune(delta, density, epsilons[index], generator, rescale)
        deltas[index] = delta
        del delta

    weight = torch.tensor(list(weights), dtype=deltas.dtype, device=deltas.device)
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
    coefficients = torch.tensor(list(weights), dtype=dtype, device=first.device)
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
    tt = torch.tensor([[t]], dtype=dtype, device=v0.device)
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


# --------------------------------------------------------------------------------------------
# The methods below follow mergekit 0.1.5's kernels operation for operation (same dtypes, same
# reduction order), so that they are bit-identical to it on the CPU. Each docstring says why a
# user would pick it.


def model_stock(base: torch.Tensor, tensors: Sequence[torch.Tensor], filter_wise: bool):
    """Model Stock (Jang et al. 2024): move from the base towards the fine-tunes' average by
    ``t = k cos / (1 + (k-1) cos)``, where ``cos`` is the mean pairwise cosine between the
    fine-tunes' deltas (per row with ``filter_wise``). Needs two or more fine-tunes; no weights.
    At the singular point (denominator ~ 0) the base is kept."""
    shape = base.shape
    if filter_wise:
        w0 = base.unsqueeze(0) if base.dim() == 1 else base
        ws = [w.unsqueeze(0) for w in tensors] if base.dim() == 1 else list(tensors)
    else:
        w0 = base.reshape(-1)
        ws = [w.reshape(-1) for w in tensors]
    offsets = [w - w0 for w in ws]
    cosines = []
    for index, a in enumerate(offsets):
        for b in offsets[index + 1 :]:
            norms = torch.norm(a, dim=-1) * torch.norm(b, dim=-1)
            cosines.append(((a * b).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    del offsets
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    count = len(ws)
    denominator = 1 + (count - 1) * cos
    singular = denominator.abs() < 1e-6
    safe = torch.where(singular, torch.ones_like(denominator), denominator)
    t = torch.where(singular, torch.zeros_like(cos), (count * cos) / safe)
    average = sum(ws) / count
    return (t * average + (1 - t) * w0).reshape(shape)


def sce(base: torch.Tensor, tensors: Sequence[torch.Tensor], select_topk: float, int8_mask: bool):
    """SCE (Wan et al. 2024, FuseChat): Select the ``select_topk`` fraction of entries with the
    largest variance across the task vectors, Calculate each model's weight as its share of the
    mean squared delta, Erase entries whose sign disagrees with the elected (summed) sign."""
    if not tensors:
        return base
    mask_dtype = torch.int8 if int8_mask else base.dtype
    vectors = torch.stack([t - base for t in tensors], dim=0)
    if select_topk < 1:
        vectors = vectors * _sce_mask(vectors, select_topk, mask_dtype).unsqueeze(0)
    sign = vectors.sign().to(mask_dtype)
    elected = (vectors.sum(dim=0) >= 0).to(mask_dtype) * 2 - 1
    erase = sign == elected
    del sign, elected
    weights = vectors.square().reshape(vectors.shape[0], -1).mean(dim=1)
    total = torch.sum(weights).item()
    weights = torch.ones_like(weights) / weights.shape[0] if abs(total) < 1e-6 else weights / total
    while weights.dim() < vectors.dim():
        weights = weights.unsqueeze(-1)
    erased = weights * erase
    merged = (vectors * erased).sum(dim=0)
    return base + merged / torch.sum(erased, dim=0).clamp(min=1e-6)


def _sce_mask(vectors: torch.Tensor, density: float, mask_dtype: torch.dtype) -> torch.Tensor:
    if density <= 0:
        return torch.zeros_like(vectors[0], dtype=mask_dtype)
    var = torch.var(vectors, dim=0, unbiased=False)
    k = int(torch.count_nonzero(var) * density)
    mask = torch.zeros_like(var, dtype=mask_dtype)
    if k == 0:
        return mask
    _, indices = torch.topk(var.abs().view(-1), k=k, largest=True)
    mask.view(-1)[indices] = 1
    return mask


def _nuslerp(t: float, v0: torch.Tensor, v1: torch.Tensor, row_wise: bool, flatten: bool):
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)

    def unit(x: torch.Tensor) -> torch.Tensor:
        return x / torch.norm(x, dim=-1, keepdim=True).clamp(min=1e-7)

    cos = torch.sum(unit(v0) * unit(v1), dim=-1, keepdim=True).clamp(-1, 1)
    collinear = (1 - cos.square()) <= 1e-8**2
    theta = torch.acos(torch.where(collinear, 0, cos))
    result = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    result = torch.where(collinear, (1 - t) * v0 + t * v1, result)
    if row_wise and not flatten:
        result = result.transpose(0, -1)
    return result.reshape(shape)


def nuslerp(
    base: torch.Tensor | None,
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    row_wise: bool,
    flatten: bool,
) -> torch.Tensor:
    """NuSLERP: SLERP between exactly two models with t = w1 / (w0 + w1); with a base, between
    their task vectors (then added to the base); per row/column unless flattened (the default,
    which is classic SLERP's whole-tensor angle)."""
    total = sum(weights)
    t = 0.5 if abs(total) < 1e-6 else weights[1] / total
    if base is not None:
        return base + _nuslerp(t, tensors[0] - base, tensors[1] - base, row_wise, flatten)
    return _nuslerp(t, tensors[0], tensors[1], row_wise, flatten)


def multislerp(
    base: torch.Tensor | None,
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    normalize_weights: bool,
    eps: float,
) -> torch.Tensor:
    """Multi-SLERP: barycentric interpolation of any number of models (or, with a base, of their
    task vectors) on the hypersphere: project onto the tangent space at the weighted mean
    direction, average there, map back, and scale by the weighted mean norm."""
    if len(tensors) == 1:
        return tensors[0]
    stacked = torch.stack(list(tensors), dim=0)
    if base is not None:
        stacked -= base
    flat = stacked.view(stacked.shape[0], -1)
    w = torch.tensor(list(weights), dtype=stacked.dtype, device=stacked.device)
    if normalize_weights:
        w = w / w.sum()
    norms = torch.norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * w.view(-1, 1)).sum(0)
    mean_norm = torch.norm(mean)
    if mean_norm < eps:
        if stacked.shape[0] != 2:
            raise ValueError("the weighted mean direction of the inputs is zero")
        result = (stacked[0] * w[0] + stacked[1] * w[1]).view(stacked.shape[1:])
        return result + base if base is not None else result
    mean = mean / mean_norm
    dots = (units * mean).sum(-1, keepdim=True)
    tangent = ((units - dots * mean) * w.view(-1, 1)).sum(0)
    del units
    tangent_norm = torch.norm(tangent) + eps
    result = mean * torch.cos(tangent_norm) + tangent * (torch.sin(tangent_norm) / tangent_norm)
    result = (result * (norms.squeeze(-1) * w).sum()).view(stacked.shape[1:])
    return result + base if base is not None else result


def karcher(tensors: Sequence[torch.Tensor], max_iter: int, tol: float) -> torch.Tensor:
    """Karcher (Riemannian) mean of the models' directions on the unit sphere, equal weights,
    scaled by the mean norm: the multi-model generalisation of SLERP, found by at most
    ``max_iter`` fixed-point steps (stopping when the tangent step is below ``tol``)."""
    if len(tensors) == 1:
        return tensors[0]
    alphas = [1.0 / len(tensors)] * len(tensors)
    dtype = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    norms, units = [], []
    for tensor in tensors:
        norm = torch.linalg.vector_norm(tensor.to(dtype))
        norms.append(norm)
        units.append(
            torch.zeros_like(tensor) if norm.item() == 0.0 else (tensor / norm).to(tensor.dtype)
        )
    valid = [i for i, norm in enumerate(norms) if norm.item() > tol]
    if not valid:
        return sum(tensor * 0 for tensor in tensors)
    valid_alphas = [alphas[i] for i in valid]
    alpha_sum = sum(valid_alphas)
    alphas_n = [a / alpha_sum for a in valid_alphas]
    valid_units = [units[i] for i in valid]
    mean = torch.zeros_like(valid_units[0])
    for alpha, unit in zip(alphas_n, valid_units):
        mean += alpha * unit
    mean_norm = torch.linalg.vector_norm(mean.to(dtype))
    mean = valid_units[0].clone() if mean_norm.item() < tol else (mean / mean_norm).to(mean.dtype)
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for alpha, unit in zip(alphas_n, valid_units):
            dot = torch.clamp(torch.dot(mean.flatten(), unit.flatten()), -1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() < tol:
                continue
            tangent += alpha * (theta / torch.sin(theta)) * (unit - dot * mean)
        tangent_norm = torch.linalg.vector_norm(tangent.to(dtype))
        if tangent_norm.item() < tol:
            break
        mean = (
            torch.cos(tangent_norm) * mean + torch.sin(tangent_norm) * (tangent / tangent_norm)
        ).to(mean.dtype)
        unit_norm = torch.linalg.vector_norm(mean.to(dtype))
        if unit_norm.item() > tol:
            mean = (mean / unit_norm).to(mean.dtype)
    scale = sum(alpha * norm for alpha, norm in zip(alphas, norms))
    return scale * mean


def nearswap(base: torch.Tensor, other: torch.Tensor, t: float) -> torch.Tensor:
    """NearSwap: take the other model's value where it is within ``t`` of the base's, blending
    with weight ``t / |a - b|`` (clamped to [0, 1]) elsewhere: keeps the base except where the
    two already nearly agree."""
    weight = (t / torch.abs(base - other).clamp(min=1e-6)).clamp(min=0, max=1)
    return weight * other + (1 - weight) * base
