"""The one module that knows whether we run on CUDA or on a CPU.

megatron-core 0.16.1 is written for NVIDIA GPUs: it allocates scratch tensors with
``device="cuda"``, asks ``torch.cuda.current_device()`` where a tensor should live, keeps its
model-parallel RNG streams in CUDA generators, and synchronises CUDA streams around pipeline
sends. None of that is needed for the maths, so on a machine without CUDA we redirect those
call sites to the CPU (measured one by one, see ``../shared/DESIGN.md``) and keep every other
line of megatron-core unchanged. Everything else in the project asks this module for the
device, the backend and the dtype, and never tests ``torch.cuda.is_available()`` itself.

On CUDA nothing here patches anything: NCCL, the CUDA RNG tracker and (when it imports)
Transformer Engine are used exactly as Megatron-LM does.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import random
import socket
import sys
import types
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from megatron_cpt.errors import UserError

_CPU = torch.device("cpu")


# megatron-core warns "Transformer Engine and Apex are not installed" once per module that has a
# fallback (optimizer, clip_grads, multi-tensor ops, FSDP, norms), several times per run and rank;
# ``startup_notes()`` says it once instead.
for _message in (
    "Transformer Engine and Apex are not installed",
    "Apex is not installed. Falling back to Torch Norm",
):
    warnings.filterwarnings("ignore", message=_message)


def has_cuda() -> bool:
    """True when this process trains on a GPU (the only CUDA check in the project)."""
    return torch.cuda.is_available()


def device() -> torch.device:
    """The device this rank computes on: ``cuda:LOCAL_RANK`` or the CPU."""
    if has_cuda():
        return torch.device("cuda", torch.cuda.current_device())
    return _CPU


def compute_device(name: str) -> torch.device:
    """A device asked for by name (``--device cpu|cuda|cuda:N``) for single-process compute
    such as merging; ``cuda`` without a GPU is the user's error, said in one line."""
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise UserError(f"--device: unknown device {name!r} (use cpu or cuda)") from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise UserError(f"--device: unsupported device {name!r} (use cpu or cuda)")
    if not has_cuda():
        raise UserError(f"--device {name}: no CUDA device is available on this machine")
    return dev


def device_memory_bytes(dev: torch.device) -> int | None:
    """Free memory on a CUDA device (None for the CPU: host memory is not budgeted here)."""
    if dev.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(dev)
    return int(free)


def backend() -> str:
    """NCCL between GPUs, gloo between CPU processes."""
    return "nccl" if has_cuda() else "gloo"


def have_transformer_engine() -> bool:
    """Transformer Engine only helps (and only installs) with CUDA; FP8 needs it."""
    if not has_cuda():
        return False
    try:
        import transformer_engine  # noqa: F401
    except Exception:  # a broken TE build must not stop bf16 training with the local spec
        return False
    return True


def have_apex() -> bool:
    try:
        import apex  # noqa: F401
    except Exception:
        return False
    return True


def startup_notes(bf16: bool, fusions: list[str] | tuple = ()) -> list[str]:
    """The one-line notes a training run prints once at start-up (rank 0): which fused
    libraries are missing (replacing megatron-core's repeated warning), that a GPU run
    without ``--bf16`` trains in plain fp32 (megatron-core leaves ``allow_tf32`` as it is,
    False by default: several times slower than bf16 on an H100, and easy to miss; issue 14,
    Found 7), and which TE-free fused kernels ``enable_cuda_fusions`` switched on."""
    notes = []
    te, apex = have_transformer_engine(), have_apex()
    if not te and not apex:
        where = "GPU" if has_cuda() else "CPU"
        notes.append(
            f"> note: {where} run without Transformer Engine and Apex: megatron-core's local "
            "layer spec, torch AdamW and local multi-tensor ops"
        )
    if has_cuda() and not bf16:
        tf32 = torch.backends.cuda.matmul.allow_tf32
        notes.append(
            f"warning: training in fp32 on a GPU (TF32 matmuls {'on' if tf32 else 'off'}); "
            "give --bf16 for mixed precision, as Megatron-LM runs do"
        )
    if fusions:
        notes.append(f"> fused kernels: {', '.join(fusions)}")
    return notes


def supports_bf16() -> bool:
    """bf16 compute is what H100 runs need; CPU kernels exist but are slow, so we default to fp32."""
    return has_cuda() and torch.cuda.is_bf16_supported()


def sdpa_kernels(kernels):
    """Restrict ``F.scaled_dot_product_attention`` to ``kernels`` (``SDPBackend`` members) on a
    GPU, where flash / cuDNN / memory-efficient kernels compete. A CPU has one fused kernel
    (plus the math fallback), so there is nothing to choose: no restriction there."""
    if not kernels or not has_cuda():
        return contextlib.nullcontext()
    from torch.nn.attention import sdpa_kernel

    return sdpa_kernel(list(kernels))


def sdpa_kernel_dtypes_restricted() -> bool:
    """True where SDPA's flash kernel exists only for fp16/bf16 (CUDA); the CPU's takes fp32."""
    return has_cuda()


def reset_peak_memory() -> None:
    """Start a new peak-memory window (GPU allocator); a CPU process's peak RSS cannot be reset."""
    if has_cuda():
        torch.cuda.reset_peak_memory_stats()


def peak_memory_bytes() -> int:
    """Peak memory of this process: bytes the CUDA allocator held at most since the last
    ``reset_peak_memory`` on a GPU, the peak resident set size (whole process life) on a CPU."""
    if has_cuda():
        return torch.cuda.max_memory_allocated()
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def memory_in_use_bytes() -> int:
    """Memory this process holds now: CUDA allocator bytes on a GPU, resident set on a CPU."""
    if has_cuda():
        return torch.cuda.memory_allocated()
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory_kind() -> str:
    """What ``peak_memory_bytes`` measures, for benchmark output."""
    return "GPU allocated" if has_cuda() else "process RSS"


def use_fused_adam() -> bool:
    """torch's fused AdamW kernel where megatron-core falls back to torch Adam: on CUDA only.
    CPU runs keep torch's default (foreach) path, which the CPU tests were measured with."""
    return has_cuda()


def synchronize() -> None:
    """Wait for queued kernels (for honest timings); nothing to wait for on a CPU."""
    if has_cuda():
        torch.cuda.synchronize()


def peak_flops_per_device(dtype: torch.dtype) -> float | None:
    """Dense peak FLOP/s of the local accelerator for MFU, or None when unknown (CPUs)."""
    if not has_cuda():
        return None
    name = torch.cuda.get_device_name()
    # Dense (non-sparse) peaks from NVIDIA's data sheets.
    table = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "B200": 2250e12}
    for key, value in table.items():
        if key in name:
            return value * (2 if dtype == torch.float8_e4m3fn else 1)
    return None


# --------------------------------------------------------------------------------------------
# Process groups
# --------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_distributed(timeout_minutes: int = 30) -> tuple[int, int]:
    """Create the default process group; returns ``(rank, world_size)``. Idempotent.

    Under torchrun the ``RANK``/``WORLD_SIZE``/``MASTER_*`` variables describe the job. A plain
    ``python tools/pretrain.py`` (or a test) gets a one-rank group on a free local port, because
    megatron-core calls ``torch.distributed.get_rank()`` even for one process (the blended
    dataset builder does). That group is addressed by a private ``tcp://`` URL rather than by
    exporting ``RANK``/``MASTER_PORT``: exported variables would be inherited by any child
    process (a torchrun, a tool run as a subprocess), which would then collide on the port.
    """
    import datetime

    apply_cpu_patches()
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    timeout = datetime.timedelta(minutes=timeout_minutes)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        init = {}
    else:
        rank, world = 0, 1
        init = {"init_method": f"tcp://127.0.0.1:{_free_port()}"}
    if has_cuda():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    dist.init_process_group(backend=backend(), rank=rank, world_size=world, timeout=timeout, **init)
    return rank, world


def init_process_group_only(timeout_minutes: int = 30) -> tuple[int, int]:
    """A torchrun job's process group without megatron-core (data selection needs no model
    parallelism, and skipping megatron's imports and CPU patches saves seconds per rank).

    Each rank computes on ``cuda:LOCAL_RANK`` when there are GPUs, else on the CPU (gloo).
    Returns ``(rank, world_size)``; idempotent.
    """
    import datetime

    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if has_cuda():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    dist.init_process_group(backend=backend(), timeout=datetime.timedelta(minutes=timeout_minutes))
    return dist.get_rank(), dist.get_world_size()


@dataclass(frozen=True)
class ParallelSizes:
    tensor: int = 1
    pipeline: int = 1
    context: int = 1


_PARALLEL_SIZES: ParallelSizes | None = None


def initialize_model_parallel(tp: int = 1, pp: int = 1, cp: int = 1) -> None:
    """megatron-core's process-group grid (tp-cp-dp-pp). Re-initialises if the sizes change.

    Gloo groups are always created: megatron-core uses them for CPU-side collectives (checkpoint
    metadata, the distributed optimizer's gather) on GPU too.
    """
    global _PARALLEL_SIZES
    from megatron.core import parallel_state

    init_distributed()
    sizes = ParallelSizes(tp, pp, cp)
    if parallel_state.model_parallel_is_initialized():
        if sizes == _PARALLEL_SIZES:
            return
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        context_parallel_size=cp,
        create_gloo_process_groups=True,
    )
    _PARALLEL_SIZES = sizes


def destroy_distributed() -> None:
    """Tear down the model-parallel grid and the default group (end of a run or a test)."""
    global _PARALLEL_SIZES
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    _PARALLEL_SIZES = None
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def set_seed(seed: int, data_parallel_random_init: bool = False) -> None:
    """Seed Python, NumPy, torch and megatron-core's model-parallel RNG streams.

    Like Megatron-LM, pipeline stages get different seeds (``+100 * pp_rank``) so that their
    layers are not initialised identically; tensor-parallel ranks are separated by the tracker.
    """
    from megatron.core import parallel_state, tensor_parallel

    seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    if data_parallel_random_init:
        seed += 10 * parallel_state.get_data_parallel_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    apply_cpu_patches()
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


# --------------------------------------------------------------------------------------------
# RNG state (for exact resume)
# --------------------------------------------------------------------------------------------


def get_rng_state() -> dict:
    """Every generator a training step draws from, so a resumed run repeats bit for bit."""
    from megatron.core import tensor_parallel

    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        # numpy's key array as a tensor: the checkpoint must load with weights_only=True
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if has_cuda() else None,
        "tracker": {
            k: v.clone() if torch.is_tensor(v) else v
            for k, v in tensor_parallel.get_cuda_rng_tracker().get_states().items()
        },
    }
    return state


def set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    if torch.is_tensor(keys):
        keys = keys.numpy().astype(np.uint32)
    np.random.set_state((name, keys, pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if has_cuda() and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(dict(state["tracker"]))


# --------------------------------------------------------------------------------------------
# CPU redirections of megatron-core's CUDA assumptions
# --------------------------------------------------------------------------------------------


def _cpu_device(dev):
    """Map any CUDA device spelling (``"cuda"``, ``"cuda:0"``, ``0``, ``torch.device``) to CPU."""
    if dev is None:
        return None
    if isinstance(dev, int) and not isinstance(dev, bool):
        return _CPU
    if isinstance(dev, str) and dev.startswith("cuda"):
        return _CPU
    if isinstance(dev, torch.device) and dev.type == "cuda":
        return _CPU
    return dev


def _redirect_factory(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        return fn(*args, **kwargs)

    return wrapper


class _NullStream:
    """Stands in for ``torch.cuda.Stream``: on a CPU every op is already ordered."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def record_event(self, event=None):
        return event or _NullEvent()

    def synchronize(self):
        pass


class _NullEvent(_NullStream):
    def record(self, *args, **kwargs):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


_FACTORIES = (
    "tensor",
    "as_tensor",
    "zeros",
    "ones",
    "empty",
    "full",
    "arange",
    "rand",
    "randn",
    "randint",
    "empty_strided",
    "zeros_like",
    "ones_like",
    "empty_like",
    "full_like",
)


def _make_cpu_torch() -> types.ModuleType:
    """A stand-in for the ``torch`` name inside megatron-core modules, used only without CUDA.

    It is the real ``torch`` except for the calls megatron-core makes on the assumption that a
    GPU is present (DESIGN.md, items 1, 3, 4, 6, 7):

    - ``torch.cuda.current_device()`` -> the CPU device (rotary embedding, DDP grad buffers,
      pipeline p2p shape tensors);
    - ``device="cuda"`` in tensor factories -> CPU (the default causal mask, ``clip_grads``
      norms, the optimizer's loss-scale/found-inf scalars, the schedule's token counter);
    - ``torch.cuda.synchronize()`` / streams / events -> no-ops (p2p sync, DDP overlap streams,
      ``current_stream()`` in grad sync).

    Rebinding the module-level ``torch`` name per megatron-core module keeps the redirection out
    of the real ``torch`` (user code and other libraries are unaffected) and out of megatron-core
    source (no fork to maintain).
    """
    proxy = types.ModuleType("torch")
    proxy.__dict__.update(torch.__dict__)
    for name in _FACTORIES:
        setattr(proxy, name, _redirect_factory(getattr(torch, name)))
    cuda = types.ModuleType("torch.cuda")
    cuda.__dict__.update(torch.cuda.__dict__)
    cuda.current_device = lambda: _CPU
    cuda.synchronize = lambda *a, **k: None
    cuda.current_stream = lambda *a, **k: _NullStream()
    cuda.default_stream = lambda *a, **k: _NullStream()
    cuda.Stream = _NullStream
    cuda.Event = _NullEvent
    cuda.stream = lambda *a, **k: contextlib.nullcontext()
    cuda.is_current_stream_capturing = lambda: False
    proxy.cuda = cuda
    proxy.__cpu_proxy__ = True
    return proxy


def _clip_grad_by_total_norm_cpu(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """megatron-core's version asserts ``torch.cuda.FloatTensor`` grads (DESIGN.md item 5) and
    uses apex/TE's fused multi-tensor scale; the same scaling with torch's foreach kernels."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = []
    for param in parameters:
        grad = getattr(param, attr, None)
        if grad is not None:
            grads.append(grad.detach())
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0 and grads:
        torch._foreach_mul_(grads, clip_coeff)


@contextlib.contextmanager
def _tensor_cuda_is_identity():
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.Tensor.cuda = original


@contextlib.contextmanager
def _tensor_type_names_cuda():
    """``Tensor.type()`` answers with the CUDA type name for CPU tensors (DESIGN.md item 4).

    megatron-core's mixed-precision optimizers sort parameters into fp16/bf16/fp32 groups by
    comparing ``param.type()`` with ``'torch.cuda.BFloat16Tensor'`` and the like, and refuse
    anything else ("Wrapped parameters must be one of torch.cuda.FloatTensor, ..."). The dtype is
    what matters; the device name is an assumption. Only the no-argument query is changed, and
    only while those constructors run.
    """
    original = torch.Tensor.type

    def type_(self, *args, **kwargs):
        if args or kwargs:
            return original(self, *args, **kwargs)
        name = original(self)
        if name.startswith("torch.") and not name.startswith("torch.cuda."):
            return "torch.cuda." + name[len("torch.") :]
        return name

    torch.Tensor.type = type_
    try:
        yield
    finally:
        torch.Tensor.type = original


def _run_with_cuda_type_names(cls) -> None:
    """Wrap ``cls.__init__`` in :func:`_tensor_type_names_cuda` (once)."""
    init = cls.__init__
    if getattr(init, "__cpu_patched__", False):
        return

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        with _tensor_type_names_cuda():
            init(self, *args, **kwargs)

    __init__.__cpu_patched__ = True
    cls.__init__ = __init__


_CPU_RNG_TRACKER_CLASS = None


def _cpu_rng_tracker_class():
    """megatron-core's model-parallel RNG tracker, backed by the CPU generator (item 2).

    The tracker keeps named generator states ("model-parallel-rng" differs per TP rank so that
    TP-sharded weights are initialised independently) and ``fork()`` swaps them in. On CUDA it
    swaps the CUDA generator; here the CPU generator *is* the compute generator, so we swap that
    one and skip the upstream "CPU RNG changed inside a GPU RNG context" check that would fire on
    every fork.
    """
    global _CPU_RNG_TRACKER_CLASS
    if _CPU_RNG_TRACKER_CLASS is not None:
        return _CPU_RNG_TRACKER_CLASS
    from megatron.core.tensor_parallel.random import CudaRNGStatesTracker

    class CpuRNGStatesTracker(CudaRNGStatesTracker):
        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            self.seeds_.add(seed)
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            orig = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)

        @contextlib.contextmanager
        def fork(self, name="model-parallel-rng"):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            orig = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(orig)

    _CPU_RNG_TRACKER_CLASS = CpuRNGStatesTracker
    return CpuRNGStatesTracker


# megatron-core modules on the training path; imported before patching so that their ``torch``
# name is rebound (modules imported later are caught by the next ``apply_cpu_patches`` call).
_MEGATRON_MODULES = (
    "megatron.core.parallel_state",
    "megatron.core.tensor_parallel",
    "megatron.core.transformer.utils",
    "megatron.core.transformer.attention",
    "megatron.core.transformer.dot_product_attention",
    "megatron.core.models.common.embeddings.rotary_pos_embedding",
    "megatron.core.models.gpt.gpt_model",
    "megatron.core.optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.distributed",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.distributed.distributed_data_parallel",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.dist_checkpointing",
    "megatron.core.dist_checkpointing.strategies.torch",
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
    "megatron.core.dist_checkpointing.strategies.async_utils",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.dist_checkpointing.strategies.fully_parallel",
)

_CPU_TORCH: types.ModuleType | None = None


def apply_cpu_patches() -> None:
    """Redirect megatron-core's CUDA assumptions to the CPU. No-op with CUDA; idempotent.

    Call it again after importing more of megatron-core: newly loaded modules get patched too.
    """
    global _CPU_TORCH
    if has_cuda():
        return
    for name in _MEGATRON_MODULES:
        importlib.import_module(name)
    if _CPU_TORCH is None:
        _CPU_TORCH = _make_cpu_torch()
    for mod_name, mod in list(sys.modules.items()):
        if mod_name.startswith("megatron.core") and getattr(mod, "torch", None) is torch:
            mod.torch = _CPU_TORCH

    # Item 5: the fp32 grad-type assert in clip_grads.
    from megatron.core.optimizer import clip_grads, optimizer

    clip_grads.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_cpu
    optimizer.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_cpu

    # Item 4: bf16 (Float16Optimizer) and the distributed optimizer sort params by CUDA type name.
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    _run_with_cuda_type_names(optimizer.Float16OptimizerWithFloat16Params)
    _run_with_cuda_type_names(DistributedOptimizer)
    # ...and gathers its shards for a reshardable checkpoint with ``send_tensor.cuda()``.
    gather = DistributedOptimizer.get_parameter_state_dp_zero
    if not getattr(gather, "__cpu_patched__", False):

        @functools.wraps(gather)
        def get_parameter_state_dp_zero(self, *args, **kwargs):
            with _tensor_cuda_is_identity():
                return gather(self, *args, **kwargs)

        get_parameter_state_dp_zero.__cpu_patched__ = True
        DistributedOptimizer.get_parameter_state_dp_zero = get_parameter_state_dp_zero

    # Tied embeddings split over pipeline stages: GPTModel's constructor moves the last stage's
    # copy of the embedding with ``weight.data.cuda()`` before all-reducing it with the first
    # stage. A tensor method cannot be redirected through the module's ``torch`` name, so the
    # call is run with ``Tensor.cuda`` as the identity (CPU tensors stay where they are).
    from megatron.core.models.common.language_module.language_module import LanguageModule

    setup = LanguageModule.setup_embeddings_and_output_layer
    if not getattr(setup, "__cpu_patched__", False):

        @functools.wraps(setup)
        def setup_embeddings_and_output_layer(self, *args, **kwargs):
            with _tensor_cuda_is_identity():
                return setup(self, *args, **kwargs)

        setup_embeddings_and_output_layer.__cpu_patched__ = True
        LanguageModule.setup_embeddings_and_output_layer = setup_embeddings_and_output_layer

    # Item 2: model-parallel RNG streams on the CPU generator.
    from megatron.core.tensor_parallel import random as mp_random

    tracker_cls = _cpu_rng_tracker_class()
    if not isinstance(mp_random._CUDA_RNG_STATE_TRACKER, tracker_cls):
        mp_random._CUDA_RNG_STATE_TRACKER = tracker_cls()
        mp_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True

    # ``force_reset_rng`` would replace our tracker with the CUDA one; keep the CPU class.
    if not getattr(mp_random.initialize_rng_tracker, "__cpu_patched__", False):
        upstream = mp_random.initialize_rng_tracker

        def initialize_rng_tracker(*args, force_reset=False, **kwargs):
            if force_reset or not mp_random._CUDA_RNG_STATE_TRACKER_INITIALIZED:
                mp_random._CUDA_RNG_STATE_TRACKER = tracker_cls()
                mp_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
                return None
            return upstream(*args, **kwargs)

        initialize_rng_tracker.__cpu_patched__ = True
        mp_random.initialize_rng_tracker = initialize_rng_tracker

    # Full activation recompute (``--recompute-granularity full``): megatron-core's
    # ``CheckpointFunction`` saves and restores "the CUDA RNG state" around the replayed forward
    # so dropout masks repeat; on CPU that state is the CPU generator's.
    def _get_rng_state(device=-1, clone=False, graph_safe=False):
        return torch.get_rng_state()

    def _set_rng_state(new_state, device=-1, graph_safe=False):
        torch.set_rng_state(new_state)

    mp_random._get_cuda_rng_state = _get_rng_state
    mp_random._set_cuda_rng_state = _set_rng_state


def model_config_overrides() -> dict:
    """TransformerConfig fields that differ between CUDA and CPU runs.

    Fusions are CUDA kernels (apex/TE/triton); CPU initialisation avoids ``.cuda()`` in weight
    init; pipeline p2p uses individual isend/irecv (gloo has no batched p2p) without CUDA syncs.
    """
    if has_cuda():
        return {"use_cpu_initialization": False}
    return {
        "use_cpu_initialization": True,
        "bias_activation_fusion": False,
        "masked_softmax_fusion": False,
        "persist_layer_norm": False,
        "gradient_accumulation_fusion": False,
        "apply_rope_fusion": False,
        "bias_dropout_fusion": False,
        "cross_entropy_loss_fusion": False,
        "batch_p2p_comm": False,
        "batch_p2p_sync": False,
    }


def enable_cuda_fusions(config, cross_entropy: bool = False) -> list[str]:
    """Switch on, on CUDA, megatron-core's fused kernels that need neither TE nor Apex.

    They are torch-scripted/compiled element-wise kernels shipped in ``megatron.core.fusions``:
    the SwiGLU (or biased GeLU) activation, bias-dropout-add and, when asked for
    (``--cross-entropy-loss-fusion``), the native vocab-parallel cross entropy. Each is enabled
    only if its module imports and the model's ``config`` satisfies megatron-core's own rule for
    it (checked in ``TransformerConfig.__post_init__``, which has already run). On a CPU nothing
    changes: the fusions are CUDA kernels, and the CPU path keeps megatron-core's unfused ops.
    Returns the names of the fields set, for the start-up log.
    """
    if not has_cuda():
        return []
    import torch.nn.functional as F

    enabled = []

    def importable(name: str) -> bool:
        try:
            importlib.import_module(name)
        except Exception:
            return False
        return True

    act = config.activation_func
    swiglu = act is F.silu and config.gated_linear_unit
    biased_gelu = act is F.gelu and (config.gated_linear_unit or config.add_bias_linear)
    if (
        (swiglu and importable("megatron.core.fusions.fused_bias_swiglu"))
        or (biased_gelu and importable("megatron.core.fusions.fused_bias_gelu"))
    ) and not getattr(config, "use_te_activation_func", False):
        config.bias_activation_fusion = True
        enabled.append("bias_activation_fusion")
    if importable("megatron.core.fusions.fused_bias_dropout"):
        config.bias_dropout_fusion = True
        enabled.append("bias_dropout_fusion")
    if cross_entropy and importable("megatron.core.fusions.fused_cross_entropy"):
        config.cross_entropy_loss_fusion = True
        config.cross_entropy_fusion_impl = "native"
        enabled.append("cross_entropy_loss_fusion")
    return enabled
