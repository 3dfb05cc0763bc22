"""The native fused TIES kernel (csrc/ties.cpp, built by CMake from ``make install``), loaded
with ctypes, and the switch back to the PyTorch kernel.

Why native: PyTorch makes one pass over memory per operation, which put TIES at ~17x the I/O
floor per tensor; the C++ kernel makes two (three for float32) and is bit-identical to the
PyTorch kernel in ``methods`` (tests/test_merge_native.py compares the two). Why ctypes over a
plain C ABI: the build then needs only CMake and a C++ compiler, no torch or Python headers,
and a machine without them still merges, with the PyTorch kernel.

``MEGATRON_CPT_NATIVE=0`` forces the PyTorch kernel (tests, benchmarks), ``=generic`` the
native kernel's portable build even where the CPU has AVX2 (the library carries both and picks
at run time); ``MEGATRON_CPT_NATIVE_LIB`` points at a library built elsewhere.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Sequence
from pathlib import Path

import torch

ENV_SWITCH = "MEGATRON_CPT_NATIVE"
ENV_LIBRARY = "MEGATRON_CPT_NATIVE_LIB"
LIBRARY = Path(__file__).with_name("libmcpt_merge.so")
_ABI_VERSION = 2
_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
# PyTorch sums over the model axis sequentially for float32 only up to 4 rows; from 5 rows its
# CPU reduction switches to several accumulators in a shape-dependent order, which a plain C
# loop does not reproduce bit for bit. 16-bit tensors accumulate sequentially in float32 (checked
# up to 8 rows over 90 shapes). Beyond these counts the PyTorch kernel runs: identical results
# matter more than speed for a recipe with that many fine-tunes.
_MAX_MODELS = {torch.float32: 4, torch.bfloat16: 8, torch.float16: 8}

_library: ctypes.CDLL | None = None
_loaded = False


def _load() -> ctypes.CDLL | None:
    global _library, _loaded
    if _loaded:
        return _library
    _loaded = True
    path = Path(os.environ.get(ENV_LIBRARY) or LIBRARY)
    if not path.is_file():
        return None
    try:
        lib = ctypes.CDLL(str(path))
        if lib.mcpt_abi_version() != _ABI_VERSION:  # stale build: `make native` again
            return None
    except (OSError, AttributeError):
        return None
    for entry in (lib.mcpt_ties, lib.mcpt_ties_generic):
        entry.restype = ctypes.c_int
        entry.argtypes = _ARGTYPES
    _library = lib
    return lib


_ARGTYPES = [
    ctypes.c_int,  # dtype
    ctypes.c_void_p,  # base
    ctypes.POINTER(ctypes.c_void_p),  # inputs
    ctypes.c_int,  # models
    ctypes.c_int64,  # n
    ctypes.POINTER(ctypes.c_int64),  # ks
    ctypes.POINTER(ctypes.c_float),  # weights
    ctypes.c_int,  # normalize
    ctypes.c_float,  # lambda
    ctypes.c_int,  # apply_lambda
    ctypes.c_void_p,  # out
    ctypes.c_int,  # threads
]


def enabled() -> bool:
    """Whether merges use the native kernel: the library is built and not switched off."""
    return os.environ.get(ENV_SWITCH, "1") != "0" and _load() is not None


def describe() -> str:
    """One line for tools and benchmarks: which TIES kernel a merge would use, and why."""
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return f"TIES kernel: PyTorch ({ENV_SWITCH}=0)"
    lib = _load()
    if lib is None:
        return f"TIES kernel: PyTorch (native library not built: {LIBRARY.name}; `make install`)"
    threads = "OpenMP" if lib.mcpt_openmp() else "one thread, no OpenMP"
    generic = os.environ.get(ENV_SWITCH) == "generic" or not lib.mcpt_has_avx2()
    return f"TIES kernel: native ({'generic' if generic else 'AVX2'}, {threads})"


def ties(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    *,
    normalize: bool,
    lambda_: float,
) -> torch.Tensor | None:
    """TIES without rescale, as ``methods.task_arithmetic_family`` computes it, or None where
    the native kernel does not apply (switched off, not built, not a CPU tensor, float64,
    mixed dtypes, empty, more fine-tunes than ``_MAX_MODELS``): the caller then runs the PyTorch kernel."""
    if not enabled() or not tensors:
        return None
    dtype = base.dtype
    if dtype not in _DTYPES or base.device.type != "cpu" or base.numel() == 0:
        return None
    if len(tensors) > _MAX_MODELS[dtype]:
        return None
    if any(t.dtype != dtype or t.device.type != "cpu" or t.shape != base.shape for t in tensors):
        return None
    base_c = base.contiguous()
    inputs = [t.contiguous() for t in tensors]
    out = torch.empty(base.shape, dtype=dtype)
    # The weights exactly as the PyTorch kernel rounds them (a tensor of the compute dtype).
    rounded = torch.tensor(list(weights), dtype=dtype).float().tolist()
    n = base.numel()
    from megatron_cpt.merge.methods import trim_count  # methods imports this module

    ks = (ctypes.c_int64 * len(inputs))(*(trim_count(d, n) for d in densities))
    pointers = (ctypes.c_void_p * len(inputs))(*(t.data_ptr() for t in inputs))
    entry = _library.mcpt_ties_generic if os.environ.get(ENV_SWITCH) == "generic" else None
    status = (entry or _library.mcpt_ties)(
        _DTYPES[dtype],
        base_c.data_ptr(),
        pointers,
        len(inputs),
        n,
        ks,
        (ctypes.c_float * len(inputs))(*rounded),
        int(bool(normalize)),
        float(lambda_),
        int(lambda_ != 1),
        out.data_ptr(),
        torch.get_num_threads(),
    )
    return out if status == 0 else None
