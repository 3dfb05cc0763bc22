"""mergekit-compatible merge configuration: parsed and checked before any tensor is read.

Users already have mergekit YAML files (Llama-3-SEC published its TIES config in that format),
so we accept the same keys rather than inventing ours. Everything that can be wrong with a
config is reported here, as one line naming the key, so a typo never costs a half-done merge.
Per-tensor values (filters such as ``{filter: mlp, value: 0.5}`` and layer gradients such as
``[0, 0.5, 1]``) are resolved later, per tensor, with :func:`resolve_setting`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from megatron_cpt.errors import UserError
from megatron_cpt.merge.methods import METHODS, TASK_ARITHMETIC_FAMILY

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float64": torch.float64,
}

# Parameters each method understands (mergekit 0.1.5's specs); mergekit rejects unknown ones and
# so do we. Per-model parameters may also be given at the top level (they then apply to every
# model), as in mergekit.
_TASK_SHARED = {"normalize", "lambda", "int8_mask", "rescale"}
_PER_MODEL_BY_METHOD: dict[str, set[str]] = {
    **{name: {"weight", "density"} for name in TASK_ARITHMETIC_FAMILY},
    "breadcrumbs": {"weight", "density", "gamma"},
    "breadcrumbs_ties": {"weight", "density", "gamma"},
    "della": {"weight", "density", "epsilon"},
    "della_linear": {"weight", "density", "epsilon"},
    "linear": {"weight"},
    "slerp": set(),
    "nuslerp": {"weight"},
    "multislerp": {"weight"},
    "karcher": set(),
    "model_stock": set(),
    "sce": set(),
    "nearswap": set(),
}
_SHARED: dict[str, set[str]] = {
    **{name: _TASK_SHARED for name in TASK_ARITHMETIC_FAMILY},
    "linear": {"normalize"},
    "slerp": {"t"},
    "nuslerp": {"nuslerp_row_wise", "nuslerp_flatten"},
    "multislerp": {"normalize_weights", "eps"},
    "karcher": {"max_iter", "tol"},
    "model_stock": {"filter_wise"},
    "sce": {"int8_mask", "select_topk"},
    "nearswap": {"t"},
}
# Methods whose base_model is required / may be given / is merged like any other input.
_BASE_REQUIRED = {*TASK_ARITHMETIC_FAMILY, "slerp", "model_stock", "sce", "nearswap"}
# Methods that need a weight for every non-base model.
_WEIGHTED = {*TASK_ARITHMETIC_FAMILY, "linear", "nuslerp", "multislerp"}
_BOOLEAN = {
    "normalize",
    "int8_mask",
    "filter_wise",
    "nuslerp_row_wise",
    "nuslerp_flatten",
    "normalize_weights",
}
_FRACTION = {"density", "gamma", "epsilon", "select_topk"}  # within [0, 1]
_UNSUPPORTED_KEYS = {
    "slices": "slice-based (layer-range) configs are not supported; list whole models under models:",
    "modules": "module-based configs are not supported; list whole models under models:",
    "tokenizer": "the tokenizer: block (vocabulary surgery) is not supported; inputs must share "
    "one vocabulary (use tokenizer_source to pick whose files are copied)",
    "chat_template": "chat_template is not supported; the tokenizer files (and their chat "
    "template) are copied from tokenizer_source",
}
_KNOWN_KEYS = {
    "merge_method",
    "base_model",
    "models",
    "parameters",
    "dtype",
    "out_dtype",
    "tokenizer_source",
    "name",
}

Setting = Any  # scalar | list of scalars (layer gradient) | list of {filter, value}


@dataclass(frozen=True)
class InputModel:
    """One entry of ``models:``; ``parameters`` are raw settings, resolved per tensor."""

    path: Path
    parameters: dict[str, Setting] = field(default_factory=dict)


@dataclass(frozen=True)
class MergeConfig:
    merge_method: str
    models: tuple[InputModel, ...]
    base_model: Path | None = None
    parameters: dict[str, Setting] = field(default_factory=dict)
    dtype: torch.dtype | None = None  # compute dtype (mergekit: inputs are loaded as this)
    out_dtype: torch.dtype | None = None  # saved dtype; default: the compute dtype
    tokenizer_source: Path | None = None  # whose tokenizer files are copied; default: base
    source: str = "<config>"  # where it came from, for error messages

    @property
    def inputs(self) -> tuple[Path, ...]:
        """Every checkpoint to read, base first, each once."""
        paths = [self.base_model] if self.base_model is not None else []
        paths += [m.path for m in self.models if m.path not in paths]
        return tuple(paths)

    def model(self, path: Path) -> InputModel:
        for entry in self.models:
            if entry.path == path:
                return entry
        return InputModel(path)


def _parse_dtype(value: Any, where: str) -> torch.dtype | None:
    if value is None:
        return None
    dtype = DTYPES.get(str(value).lower())
    if dtype is None:
        raise UserError(f"{where}: unknown dtype {value!r} (use one of {', '.join(DTYPES)})")
    return dtype


def _resolve_path(value: Any, where: str, config_dir: Path) -> Path:
    if not isinstance(value, str) or not value:
        raise UserError(f"{where}: expected a checkpoint directory path, got {value!r}")
    if "+" in value and not Path(value).exists():
        raise UserError(f"{where}: LoRA references ({value!r}) are not supported")
    for candidate in (Path(value), config_dir / value):
        if candidate.is_dir():
            return candidate.resolve()
    raise UserError(
        f"{where}: {value!r} is not a local directory (model hubs are not used; "
        "give a path, absolute or relative to the config file)"
    )


def _check_setting(name: str, setting: Setting, where: str, method: str = "") -> None:
    """Type-check a setting's leaves now, so a bad value fails before the merge starts."""
    if isinstance(setting, dict) and "value" in setting:
        _check_setting(name, setting["value"], where, method)
        return
    if isinstance(setting, list):
        if not setting:
            raise UserError(f"{where}.{name}: empty list")
        for item in setting:
            if isinstance(item, dict):
                extra = set(item) - {"filter", "value"}
                if extra or "value" not in item:
                    raise UserError(
                        f"{where}.{name}: conditional entries need {{filter, value}}, got {item}"
                    )
                _check_setting(name, item["value"], where, method)
            else:
                _check_setting(name, item, where, method)
        return
    if name in _BOOLEAN:
        if not isinstance(setting, bool):
            raise UserError(f"{where}.{name}: expected true/false, got {setting!r}")
    elif name == "rescale":
        if not isinstance(setting, bool) and setting != "l1":
            raise UserError(f"{where}.{name}: expected true, false or l1, got {setting!r}")
    elif isinstance(setting, bool) or not isinstance(setting, int | float):
        raise UserError(f"{where}.{name}: expected a number, got {setting!r}")
    elif not math.isfinite(setting):  # YAML's .nan/.inf would make every merged value NaN
        raise UserError(f"{where}.{name}: must be a finite number, got {setting}")
    elif (name in _FRACTION or (name == "t" and method == "slerp")) and not 0 <= setting <= 1:
        raise UserError(f"{where}.{name}: must be within [0, 1], got {setting}")
    elif name == "max_iter" and (not isinstance(setting, int) or setting < 1):
        raise UserError(f"{where}.{name}: expected a positive integer, got {setting!r}")
    elif name in {"eps", "tol", "t"} and setting < 0:
        raise UserError(f"{where}.{name}: must be >= 0, got {setting}")


def resolve_setting(setting: Setting, tensor_name: str, t: float) -> Any:
    """mergekit semantics: first matching ``filter`` (substring of the tensor name) wins; a list
    of plain numbers is a gradient interpolated over ``t`` = layer / (layers - 1)."""
    if isinstance(setting, dict):
        setting = [setting]
    if not isinstance(setting, list):
        return setting
    if all(not isinstance(item, dict) for item in setting):
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in setting):
            return setting[int(t * (len(setting) - 1))]
        scaled = t * (len(setting) - 1)
        low = int(scaled)
        high = min(len(setting) - 1, low + 1)
        frac = scaled - low
        return (1 - frac) * setting[low] + frac * setting[high]
    for item in setting:
        pattern = item.get("filter")
        if pattern is None or pattern == "*" or pattern in tensor_name:
            return resolve_setting(item["value"], tensor_name, t)
    return None


def parse_config(raw: Any, source: str = "<config>", config_dir: Path | None = None) -> MergeConfig:
    """Validate a mergekit-style mapping (as loaded from YAML) into a :class:`MergeConfig`."""
    config_dir = config_dir or Path.cwd()
    if not isinstance(raw, dict):
        raise UserError(f"{source}: expected a YAML mapping at the top level")
    for key, why in _UNSUPPORTED_KEYS.items():
        if raw.get(key) is not None:
            raise UserError(f"{source}: {key}: {why}")
    unknown = set(raw) - _KNOWN_KEYS
    if unknown:
        raise UserError(f"{source}: unknown key(s) {', '.join(sorted(unknown))}")

    method = raw.get("merge_method")
    if method not in METHODS:
        raise UserError(
            f"{source}: merge_method: {method!r} is not supported (use one of {', '.join(METHODS)})"
        )
    base = raw.get("base_model")
    base_path = _resolve_path(base, f"{source}: base_model", config_dir) if base else None

    models_raw = raw.get("models")
    if not isinstance(models_raw, list) or not models_raw:
        raise UserError(f"{source}: models: expected a non-empty list of {{model: PATH}}")
    models = []
    allowed_per_model = _PER_MODEL_BY_METHOD[method]
    for index, entry in enumerate(models_raw):
        where = f"{source}: models[{index}]"
        if isinstance(entry, str):
            entry = {"model": entry}
        if not isinstance(entry, dict) or "model" not in entry:
            raise UserError(f"{where}: expected {{model: PATH, parameters: {{...}}}}")
        extra = set(entry) - {"model", "parameters"}
        if extra:
            raise UserError(f"{where}: unknown key(s) {', '.join(sorted(extra))}")
        params = entry.get("parameters") or {}
        if not isinstance(params, dict):
            raise UserError(f"{where}.parameters: expected a mapping")
        bad = set(params) - allowed_per_model - _SHARED[method]
        if bad:
            raise UserError(f"{where}.parameters: {method} does not take {', '.join(sorted(bad))}")
        for name, setting in params.items():
            _check_setting(name, setting, f"{where}.parameters", method)
        path = _resolve_path(entry["model"], f"{where}.model", config_dir)
        if any(m.path == path for m in models):
            raise UserError(f"{where}.model: {path} is listed twice")
        models.append(InputModel(path, dict(params)))

    params = raw.get("parameters") or {}
    if not isinstance(params, dict):
        raise UserError(f"{source}: parameters: expected a mapping")
    bad = set(params) - _SHARED[method] - allowed_per_model
    if bad:
        raise UserError(f"{source}: parameters: {method} does not take {', '.join(sorted(bad))}")
    for name, setting in params.items():
        _check_setting(name, setting, f"{source}: parameters", method)

    config = MergeConfig(
        merge_method=method,
        models=tuple(models),
        base_model=base_path,
        parameters=dict(params),
        dtype=_parse_dtype(raw.get("dtype"), f"{source}: dtype"),
        out_dtype=_parse_dtype(raw.get("out_dtype"), f"{source}: out_dtype"),
        tokenizer_source=_tokenizer_source(
            raw.get("tokenizer_source"), base_path, source, config_dir
        ),
        source=source,
    )
    _check_method_inputs(config)
    return config


def _tokenizer_source(value: Any, base: Path | None, source: str, config_dir: Path) -> Path | None:
    if value is None or value == "base":
        return base
    if value == "union":
        raise UserError(
            f"{source}: tokenizer_source: union (vocabulary surgery) is not supported; inputs "
            "must share one vocabulary"
        )
    return _resolve_path(value, f"{source}: tokenizer_source", config_dir)


def _check_method_inputs(config: MergeConfig) -> None:
    source, method = config.source, config.merge_method
    if method in _BASE_REQUIRED and config.base_model is None:
        raise UserError(f"{source}: base_model: {method} needs a base model")
    if method == "slerp":
        if len(config.inputs) != 2:
            raise UserError(
                f"{source}: models: slerp interpolates exactly two models (the base and one "
                f"other), got {len(config.inputs)}"
            )
        if "t" not in config.parameters:
            raise UserError(f"{source}: parameters.t: slerp needs t (0 = base, 1 = other)")
        return
    if method == "linear" and config.base_model is not None:
        if all(m.path != config.base_model for m in config.models):
            raise UserError(
                f"{source}: base_model: linear averages the listed models only; list the base "
                "under models: with a weight, or drop base_model"
            )
    merges_base = method in {"linear", "karcher"}
    others = [m for m in config.models if m.path != config.base_model or merges_base]
    if not others:
        raise UserError(f"{source}: models: nothing to merge into the base")
    counts = {
        "nuslerp": (2, 2, "nuslerp interpolates exactly two models besides the base"),
        "model_stock": (2, None, "model_stock needs at least two models besides the base"),
        "nearswap": (1, 1, "nearswap takes exactly one model besides the base"),
    }
    if method in counts:
        low, high, why = counts[method]
        if len(others) < low or (high is not None and len(others) > high):
            raise UserError(f"{source}: models: {why}, got {len(others)}")
    if method == "nearswap" and "t" not in config.parameters:
        raise UserError(f"{source}: parameters.t: nearswap needs t (the distance threshold)")
    if method in {"della", "della_linear"}:
        for entry in others:
            density = entry.parameters.get("density", config.parameters.get("density", 1.0))
            epsilon = entry.parameters.get("epsilon", config.parameters.get("epsilon", 0.15))
            scalars = all(isinstance(v, int | float) for v in (density, epsilon))
            if scalars and 0 < density < 1 and not 0 < density - epsilon < density + epsilon < 1:
                raise UserError(
                    f"{source}: models: epsilon={epsilon} must keep density +/- epsilon within "
                    f"(0, 1) for {entry.path} (density={density})"
                )
    if method not in _WEIGHTED:
        return
    for index, entry in enumerate(config.models):
        if entry.path == config.base_model and method != "linear":
            continue
        if "weight" not in entry.parameters and "weight" not in config.parameters:
            raise UserError(f"{source}: models[{index}].parameters.weight: required for {method}")


def load_config(path: str | Path) -> MergeConfig:
    """Read a mergekit YAML file; YAML syntax errors become one line with the position."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise UserError(f"{path}: cannot read config: {exc.strerror}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f"{mark.line + 1}:" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UserError(f"{path}:{line} invalid YAML: {problem}") from None
    return parse_config(raw, source=str(path), config_dir=path.parent)
