"""The streaming merge: check every input up front, then merge one logical tensor at a time.

Peak memory is one tensor from each input plus the method's scratch (TIES holds one delta per
model), independent of model size; the output is written as each tensor is produced. The output
directory appears only when complete (written under a temporary name, then renamed), so an
interrupted merge never leaves a checkpoint that looks valid.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
import yaml
from tqdm import tqdm

from megatron_cpt import platform
from megatron_cpt.errors import UserError
from megatron_cpt.merge import methods
from megatron_cpt.merge.config import MergeConfig, resolve_setting
from megatron_cpt.merge.megatron_io import (
    MegatronCheckpoint,
    MegatronWriter,
    is_megatron_checkpoint,
    tokenizer_dir,
)
from megatron_cpt.merge.tokenizer_source import check_tokenizer_source
from megatron_cpt.safetensors_io import (
    TOKENIZER_FILES,
    SafetensorsCheckpoint,
    StreamingSafetensorsWriter,
    TensorInfo,
)
from megatron_cpt.temp_dirs import remove_stale_temporaries, temp_prefix

# Config fields that must agree for tensors with the same name to mean the same thing.
ARCHITECTURE_FIELDS = (
    "architectures",
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "tie_word_embeddings",
)
_VOCAB_TENSORS = ("embed_tokens", "lm_head", "word_embeddings", "output_layer", "wte")
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


class Checkpoint(Protocol):
    """What the engine needs from an input: named logical tensors and an HF-style config."""

    path: Path
    config: dict | None

    @property
    def names(self) -> list[str]: ...

    def info(self, name: str) -> TensorInfo: ...

    def get(self, name: str) -> torch.Tensor: ...


@dataclass(frozen=True)
class MergeOptions:
    """Run-time choices that are not part of the (shareable) merge recipe."""

    random_seed: int = 0  # DARE masks: per-tensor generators derived from (seed, tensor name)
    max_shard_bytes: int = 5 * 10**9  # mergekit's and HF's default shard size
    progress: bool = True
    overwrite: bool = False
    device: str = "cpu"  # where the arithmetic runs; inputs and outputs stay on the host
    # Device working-set limit per step; None: the free device memory (CUDA) or unlimited (CPU).
    device_budget_bytes: int | None = None


@dataclass(frozen=True)
class MergeResult:
    out_dir: Path
    tensors: int
    bytes_written: int
    seconds: float


def tensor_seed(seed: int, name: str) -> int:
    """A per-tensor seed, so DARE masks do not depend on merge order, sharding or parallelism."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def layer_fraction(name: str, num_layers: int) -> float:
    """mergekit's gradient coordinate: layer / (layers - 1); 0 for embeddings, norm and head."""
    match = _LAYER.search(name)
    if match is None:
        return 0.0
    return int(match.group(1)) / (num_layers - 1) if num_layers > 1 else 1.0


def check_compatible(config: MergeConfig, checkpoints: dict[Path, Checkpoint]) -> None:
    """Fail before writing anything if the inputs cannot be merged tensor by tensor."""
    base_path = config.inputs[0]
    base = checkpoints[base_path]
    base_cfg = base.config or {}
    for path, ckpt in checkpoints.items():
        if path == base_path:
            continue
        other_cfg = ckpt.config or {}
        for key in ARCHITECTURE_FIELDS:
            if key in base_cfg and key in other_cfg and base_cfg[key] != other_cfg[key]:
                what = "vocabularies" if key == "vocab_size" else "architectures"
                raise UserError(
                    f"{what} differ: {base_path} has {key}={base_cfg[key]} but {path} has "
                    f"{key}={other_cfg[key]}"
                )
        base_names, names = set(base.names), set(ckpt.names)
        if base_names - names:
            missing = sorted(base_names - names)
            raise UserError(
                f"{path} lacks tensor {missing[0]} (present in {base_path})"
                + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
            )
        if names - base_names:
            extra = sorted(names - base_names)
            raise UserError(f"{path} has tensor {extra[0]} that {base_path} lacks")
        for name in base.names:
            a, b = base.info(name), ckpt.info(name)
            if a.shape != b.shape:
                if any(v in name for v in _VOCAB_TENSORS) and a.shape[1:] == b.shape[1:]:
                    raise UserError(
                        f"vocabularies differ: {name} has {a.shape[0]} rows in {base_path} but "
                        f"{b.shape[0]} in {path}"
                    )
                raise UserError(
                    f"shape mismatch for {name}: {a.shape} in {base_path}, {b.shape} in {path}"
                )
            if a.dtype.is_floating_point != b.dtype.is_floating_point:
                raise UserError(
                    f"dtype mismatch for {name}: {a.dtype} in {base_path}, {b.dtype} in {path}"
                )
        _check_same_vocabulary(_tokenizer_dir(base), _tokenizer_dir(ckpt))


def _tokenizer_dir(ckpt: Checkpoint) -> Path | None:
    if isinstance(ckpt, MegatronCheckpoint):
        return ckpt.tokenizer_dir()
    return ckpt.path


def _vocabulary(path: Path | None) -> dict | None:
    if path is None:
        return None
    file = path / "tokenizer.json"
    if not file.exists():
        return None
    try:
        data = json.loads(file.read_text())
    except ValueError as exc:
        raise UserError(f"{file}: invalid JSON ({exc})") from None
    model = data.get("model") or {}
    return {
        "vocab": model.get("vocab"),
        "added": [(t.get("id"), t.get("content")) for t in data.get("added_tokens") or []],
    }


def _check_same_vocabulary(base_path: Path | None, path: Path | None) -> None:
    a, b = _vocabulary(base_path), _vocabulary(path)
    if a is None or b is None or a == b:
        return
    if a["vocab"] != b["vocab"]:
        raise UserError(
            f"vocabularies differ: {base_path}/tokenizer.json and {path}/tokenizer.json"
        )
    raise UserError(
        f"vocabularies differ: added/special tokens of {base_path}/tokenizer.json and "
        f"{path}/tokenizer.json"
    )


# Methods whose output entry depends only on the same entry of the inputs: these are computed
# in row chunks when a tensor's working set exceeds the device budget. The others need a whole
# tensor at once (a top-k, a norm, an angle, a random stream); one too large for the budget is
# computed on the host instead, so device memory stays bounded either way.
ROW_SEPARABLE = {"task_arithmetic", "linear", "nearswap"}


class TensorMerger:
    """Applies the configured method to one logical tensor, given every input's copy of it."""

    def __init__(
        self,
        config: MergeConfig,
        num_layers: int,
        seed: int,
        device: torch.device | None = None,
        budget_bytes: int | None = None,
    ):
        self.config = config
        self.num_layers = num_layers
        self.seed = seed
        self.method = config.merge_method
        self.device = device or torch.device("cpu")
        self.budget_bytes = budget_bytes
        self.chunked = 0  # tensors computed in row chunks (for tests and logs)
        self.on_host = 0  # tensors too large for the device budget, computed on the host

    def _param(self, name: str, path: Path | None, tensor_name: str, t: float, default=None):
        sources = [self.config.model(path).parameters] if path is not None else []
        sources.append(self.config.parameters)
        for settings in sources:
            if name in settings:
                value = resolve_setting(settings[name], tensor_name, t)
                if value is not None:
                    return value
        if default is None:
            raise UserError(f"{self.config.source}: no {name} applies to {tensor_name} for {path}")
        return default

    def compute_dtype(self, dtypes: list[torch.dtype]) -> torch.dtype:
        if self.config.dtype is not None:
            return self.config.dtype
        dtype = dtypes[0]
        for other in dtypes[1:]:
            dtype = torch.promote_types(dtype, other)
        return dtype

    def out_dtype(self, dtypes: list[torch.dtype]) -> torch.dtype:
        if not dtypes[0].is_floating_point:
            return dtypes[0]
        return self.config.out_dtype or self.compute_dtype(dtypes)

    def merge(self, name: str, tensors: dict[Path, torch.Tensor]) -> torch.Tensor:
        """``tensors`` maps each input path (base first) to its copy of tensor ``name``."""
        paths = list(tensors)
        first = tensors[paths[0]]
        if not first.is_floating_point():
            # Integer buffers (position ids, masks) are not weights: they must agree exactly.
            for path in paths[1:]:
                if not torch.equal(first, tensors[path]):
                    raise UserError(
                        f"non-float tensor {name} differs between {paths[0]} and {path}"
                    )
            return first
        dtypes = [t.dtype for t in tensors.values()]
        dtype = self.compute_dtype(dtypes)
        out_dtype = self.out_dtype(dtypes)
        if self.device.type == "cpu" and self.budget_bytes is None:
            tensors = {p: t.to(dtype) for p, t in tensors.items()}
            result = self._compute(name, tensors).to(out_dtype)
        else:
            result = self._on_device(name, tensors, dtype, out_dtype)
        if not bool(torch.isfinite(result).all()):  # never write a NaN model with exit 0
            raise UserError(f"merged tensor {name} has NaN/inf values; nothing was written")
        return result

    def _on_device(self, name, tensors, dtype, out_dtype) -> torch.Tensor:
        """Move to the device, compute, move back: whole, in row chunks, or on the host."""
        first = next(iter(tensors.values()))
        element = max(torch.finfo(dtype).bits // 8, 4)
        # inputs + the method's scratch (deltas, masks, float32 temporaries): a generous bound
        per_element = element * (2 * len(tensors) + 4)
        budget = self.budget_bytes
        if budget is None:
            budget = platform.device_memory_bytes(self.device)
        if budget is None or first.numel() * per_element <= budget:
            moved = {p: t.to(self.device).to(dtype) for p, t in tensors.items()}
            return self._compute(name, moved).to(out_dtype).cpu()
        if self.method in ROW_SEPARABLE and first.dim() >= 1:
            rows = max(1, budget // max(1, first[0].numel() * per_element))
            out = torch.empty(first.shape, dtype=out_dtype)
            for start in range(0, first.shape[0], rows):
                part = {
                    p: t[start : start + rows].to(self.device).to(dtype) for p, t in tensors.items()
                }
                out[start : start + rows] = self._compute(name, part).to(out_dtype).cpu()
            self.chunked += 1
            return out
        self.on_host += 1
        host = {p: t.to(dtype) for p, t in tensors.items()}
        return self._compute(name, host).to(out_dtype)

    def _compute(self, name: str, tensors: dict[Path, torch.Tensor]) -> torch.Tensor:
        paths = list(tensors)
        t = layer_fraction(name, self.num_layers)
        method, cfg = self.method, self.config
        base = cfg.base_model

        def shared(key: str, default=None):
            return self._param(key, None, name, t, default=default)

        def per_model(key: str, order: list[Path], default=None) -> list[float]:
            return [float(self._param(key, p, name, t, default=default)) for p in order]

        others = [m.path for m in cfg.models if m.path != base]
        try:
            if method == "linear":
                order = [m.path for m in cfg.models]
                weights = per_model("weight", order)
                normalize = bool(shared("normalize", default=True))
                if normalize and sum(weights) == 0:
                    raise UserError(
                        f"{cfg.source}: linear weights for {name} sum to 0; normalizing by that "
                        "sum would make every value NaN (give non-zero weights or normalize: false)"
                    )
                return methods.linear([tensors[p] for p in order], weights, normalize=normalize)
            if method == "slerp":
                other = next(p for p in paths if p != base)
                return methods.slerp(float(shared("t")), tensors[base], tensors[other])
            if method == "nuslerp":
                return methods.nuslerp(
                    tensors[base] if base is not None else None,
                    [tensors[p] for p in others],
                    per_model("weight", others),
                    row_wise=bool(shared("nuslerp_row_wise", default=False)),
                    flatten=bool(shared("nuslerp_flatten", default=True)),
                )
            if method == "multislerp":
                return methods.multislerp(
                    tensors[base] if base is not None else None,
                    [tensors[p] for p in others],
                    per_model("weight", others),
                    normalize_weights=bool(shared("normalize_weights", default=True)),
                    eps=float(shared("eps", default=1e-8)),
                )
            if method == "karcher":
                return methods.karcher(
                    [tensors[p] for p in self._karcher_order()],
                    max_iter=int(shared("max_iter", default=10)),
                    tol=float(shared("tol", default=1e-5)),
                )
            if method == "model_stock":
                return methods.model_stock(
                    tensors[base],
                    [tensors[p] for p in others],
                    filter_wise=bool(shared("filter_wise", default=False)),
                )
            if method == "sce":
                return methods.sce(
                    tensors[base],
                    [tensors[p] for p in others],
                    select_topk=float(shared("select_topk", default=1.0)),
                    int8_mask=bool(shared("int8_mask", default=False)),
                )
            if method == "nearswap":
                return methods.nearswap(tensors[base], tensors[others[0]], float(shared("t")))
            spec = methods.TASK_ARITHMETIC_FAMILY[method]
            generator = None
            if method in methods.RANDOMIZED:
                # Always a CPU generator: the masks are the CPU merge's on any device.
                generator = torch.Generator().manual_seed(tensor_seed(self.seed, name))
            return methods.task_arithmetic_family(
                spec,
                tensors[base],
                [tensors[p] for p in others],
                per_model("weight", others),
                per_model("density", others, default=1.0),
                normalize=bool(shared("normalize", default=spec.default_normalize)),
                lambda_=float(shared("lambda", default=1.0)),
                rescale=shared("rescale", default=spec.default_rescale),
                generator=generator,
                gammas=per_model("gamma", others, default=0.01),
                epsilons=per_model("epsilon", others, default=0.15),
            )
        except ValueError as exc:  # a kernel's documented precondition, per tensor
            raise UserError(f"{cfg.source}: {method} cannot merge {name}: {exc}") from None

    def _karcher_order(self) -> list[Path]:
        """mergekit's input order: the listed models, then the base if it is not listed."""
        order = [m.path for m in self.config.models]
        if self.config.base_model is not None and self.config.base_model not in order:
            order.append(self.config.base_model)
        return order


def _num_layers(base: Checkpoint) -> int:
    if base.config and isinstance(base.config.get("num_hidden_layers"), int):
        return base.config["num_hidden_layers"]
    layers = {int(m.group(1)) for n in base.names if (m := _LAYER.search(n))}
    return max(layers) + 1 if layers else 1


def _prepare_out_dir(out_dir: Path, overwrite: bool) -> Path:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        if not overwrite:
            raise UserError(f"{out_dir}: already exists and is not empty (use --overwrite)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out_dir)  # left by a killed earlier merge to this out_dir
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(out_dir), dir=out_dir.parent))
    os.chmod(tmp, 0o755)  # mkdtemp's 0700 would make the merged model private
    return tmp


def _finish_out_dir(tmp: Path, out_dir: Path) -> None:
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
        out_dir.rename(old)
        tmp.rename(out_dir)
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    else:
        tmp.rename(out_dir)


def _write_metadata(config: MergeConfig, base: Checkpoint, tmp: Path, out_dtype, raw_yaml):
    if base.config is not None:
        cfg = dict(base.config)
        if out_dtype is not None:
            name = str(out_dtype).removeprefix("torch.")
            keys = [k for k in ("dtype", "torch_dtype") if k in cfg] or ["dtype"]
            for key in keys:
                cfg[key] = name
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    generation = base.path / "generation_config.json"
    if generation.exists():
        shutil.copy2(generation, tmp / generation.name)
    source = tokenizer_dir(config.tokenizer_source) if config.tokenizer_source else base.path
    for file in TOKENIZER_FILES:
        if (source / file).exists():
            shutil.copy2(source / file, tmp / file)
    (tmp / "merge_config.yml").write_text(raw_yaml)


def _check_tokenizer(config: MergeConfig, base: Checkpoint) -> None:
    base_dir = _tokenizer_dir(base)
    explicit = config.tokenizer_source is not None and config.tokenizer_source != base.path
    source = tokenizer_dir(config.tokenizer_source) if explicit else base_dir
    if source is None:
        return
    rows = (base.config or {}).get("vocab_size")
    check_tokenizer_source(
        source,
        explicit=explicit,
        vocab_rows=rows if isinstance(rows, int) else None,
        base_dir=base_dir if explicit else None,
    )


def open_checkpoint(path: Path) -> Checkpoint:
    """A Megatron checkpoint (save root or ``iter_*`` directory) or an HF safetensors directory."""
    if is_megatron_checkpoint(path):
        return MegatronCheckpoint(path)
    return SafetensorsCheckpoint(path)


def merge_checkpoints(
    config: MergeConfig, out_dir: str | Path, options: MergeOptions = MergeOptions()
) -> MergeResult:
    """Merge the configured checkpoints into ``out_dir``, in the base's format: HF (sharded
    safetensors + index, config, tokenizer) or megatron-core torch_dist."""
    start = time.perf_counter()
    out_dir = Path(out_dir)
    checkpoints: dict[Path, Checkpoint] = {p: open_checkpoint(p) for p in config.inputs}
    kinds = {type(c).__name__ for c in checkpoints.values()}
    if len(kinds) > 1:
        megatron = [str(p) for p, c in checkpoints.items() if isinstance(c, MegatronCheckpoint)]
        raise UserError(
            f"mixing Megatron ({megatron[0]}) and HF inputs is not supported: convert one side "
            "with tools/convert_checkpoint.py"
        )
    check_compatible(config, checkpoints)
    base_path = config.inputs[0]
    base = checkpoints[base_path]
    _check_tokenizer(config, base)
    merger = TensorMerger(
        config,
        _num_layers(base),
        options.random_seed,
        device=platform.compute_device(options.device),
        budget_bytes=options.device_budget_bytes,
    )

    plan = []
    for name in base.names:
        dtypes = [checkpoints[p].info(name).dtype for p in config.inputs]
        plan.append(TensorInfo(name, merger.out_dtype(dtypes), base.info(name).shape))
    float_dtypes = {i.dtype for i in plan if i.dtype.is_floating_point}
    out_dtype = float_dtypes.pop() if len(float_dtypes) == 1 else None

    tmp = _prepare_out_dir(out_dir, options.overwrite)
    try:
        progress = tqdm(
            total=len(plan),
            desc=f"{config.merge_method} merge",
            unit="tensor",
            disable=not options.progress,
        )

        def merged(name: str) -> torch.Tensor:
            tensors = {p: checkpoints[p].get(name) for p in config.inputs}
            out = merger.merge(name, tensors)
            progress.update()
            return out

        raw = yaml.safe_dump(_config_to_yaml(config), sort_keys=False)
        if isinstance(base, MegatronCheckpoint):
            if out_dtype is None:
                raise UserError(
                    f"{base_path}: Megatron output needs one float dtype for all tensors"
                )
            merged_from = {"config": _config_to_yaml(config), "seed": options.random_seed}
            done: list[str] = []

            def merged_once(name: str) -> torch.Tensor:
                done.append(name)
                return merged(name)

            writer = MegatronWriter(base, out_dtype, merged_from)
            writer.finish(tmp, config.tokenizer_source, merged_once)
            if sorted(done) != sorted(i.name for i in plan):  # a mapping bug, not a user error
                raise RuntimeError("the Megatron output did not take every tensor exactly once")
            (tmp / "merge_config.yml").write_text(raw)
        else:
            writer = StreamingSafetensorsWriter(tmp, plan, options.max_shard_bytes)
            for info in plan:
                writer.write(info.name, merged(info.name))
            writer.close()
            _write_metadata(config, base, tmp, out_dtype, raw)
        progress.close()
        _finish_out_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return MergeResult(
        out_dir=out_dir,
        tensors=len(plan),
        bytes_written=sum(i.nbytes for i in plan),
        seconds=time.perf_counter() - start,
    )


def _config_to_yaml(config: MergeConfig) -> dict:
    """The resolved recipe, saved next to the weights for provenance (paths made absolute)."""
    out: dict = {"merge_method": config.merge_method}
    if config.base_model is not None:
        out["base_model"] = str(config.base_model)
    out["models"] = [
        {"model": str(m.path), **({"parameters": m.parameters} if m.parameters else {})}
        for m in config.models
    ]
    if config.parameters:
        out["parameters"] = config.parameters
    for key in ("dtype", "out_dtype"):
        value = getattr(config, key)
        if value is not None:
            out[key] = str(value).removeprefix("torch.")
    if config.tokenizer_source is not None:
        out["tokenizer_source"] = str(config.tokenizer_source)
    return out
