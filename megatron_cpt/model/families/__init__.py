"""Model families: one module per HF ``model_type`` (llama, mistral, qwen2, qwen3).

Each family module is the whole difference between its family and every other: which HF config
keys it reads and writes (``arch_fields`` / ``hf_config``), which HF tensors one decoder layer
has (``hf_layer_names``), the megatron-core features it switches on (``QKV_BIAS``,
``QK_NORM``), whether it has a sliding window (``SLIDING_WINDOW``), how llama.cpp stores it
(``GGUF_ARCH``, ``GGUF_ROPE_PERMUTED``) and its presets, written as the published
``config.json`` values. Everything else (the converter's tensor transforms, the
builder, the trainer, merging, evaluation) is shared and reads these attributes, so adding a
family is adding one module here: the registry below finds every module of this package.

The per-family split follows the idea of torchtitan's state-dict adapters and
Megatron-Bridge's per-model bridges (one object per HF architecture owning its name mapping),
written as plain modules because our families differ by a handful of tensors and keys.
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType

from megatron_cpt.errors import UserError

_REQUIRED = (
    "MODEL_TYPE",
    "HF_ARCHITECTURE",
    "QKV_BIAS",
    "QK_NORM",
    "SLIDING_WINDOW",
    "GGUF_ARCH",
    "GGUF_ROPE_PERMUTED",
    "DEFAULTS",
    "PRESETS",
    "arch_fields",
    "hf_config",
    "hf_layer_names",
)


def _discover() -> dict[str, ModuleType]:
    found = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        missing = [a for a in _REQUIRED if not hasattr(module, a)]
        if missing:
            raise RuntimeError(f"model family module {module.__name__} lacks {missing}")
        found[module.MODEL_TYPE] = module
    return found


FAMILIES: dict[str, ModuleType] = _discover()


def get_family(model_type: str, source: str = "config") -> ModuleType:
    """The family module for an HF ``model_type``; one line naming the field otherwise."""
    if model_type not in FAMILIES:
        raise UserError(
            f"{source}: field 'model_type' is {model_type!r}; supported: {', '.join(sorted(FAMILIES))}"
        )
    return FAMILIES[model_type]


def family_of_gguf(architecture: str | None) -> ModuleType | None:
    """The family whose llama.cpp ``general.architecture`` this is (Mistral GGUFs say llama)."""
    return next((f for f in FAMILIES.values() if f.GGUF_ARCH == architecture), None)
