"""HF (safetensors dir or GGUF) -> megatron-core distributed checkpoint.

The model is built at TP=1/PP=1 on the meta device (no memory) only for megatron-core's
``sharded_state_dict``; the checkpoint is written by a streaming save that maps each tensor from
the memory-mapped HF files just before writing it (``streaming_save.py``), so peak memory is one
tensor and its sources, not the model. ``sharded_state_dict`` describes every tensor by its
*global* shape, so the saved ``torch_dist`` checkpoint loads at the requested TP/PP (or any
other) through ``dist_checkpointing``: no per-rank files are written by us and no torchrun is
needed to convert. What the target TP does change is the vocabulary padding (a multiple of
128*TP, as Megatron-LM pads), so it is fixed here, at conversion.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_cpt import platform
from megatron_cpt.convert import mcore_checkpoint
from megatron_cpt.convert.atomic_directory import AtomicDirectory
from megatron_cpt.convert.hf_reader import open_hf_checkpoint
from megatron_cpt.convert.layout import check_hf_shapes, check_requested_model, tensor_layout
from megatron_cpt.convert.mapping import MC_OUTPUT, hf_to_mcore_tensor, mcore_group_order
from megatron_cpt.convert.streaming_save import streaming_save_strategy
from megatron_cpt.errors import UserError
from megatron_cpt.model import (
    ModelBuildConfig,
    build_model,
    build_transformer_config,
    from_hf_config,
    get_arch,
    padded_vocab_size,
    validate_parallelism,
)
from megatron_cpt.training.checkpointing import save_checkpoint

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ImportConfig:
    hf_path: str
    out_dir: str
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    model: str | None = None  # a preset name or config path the checkpoint must match
    dtype: str | None = None  # None: the checkpoint's own storage dtype (GGUF: float32)
    make_vocab_size_divisible_by: int = 128
    overwrite: bool = False


def import_hf(cfg: ImportConfig) -> Path:
    """Convert; returns the output directory. Raises UserError for anything the user can fix."""
    if cfg.make_vocab_size_divisible_by < 1:
        raise UserError(
            f"--make-vocab-size-divisible-by {cfg.make_vocab_size_divisible_by}: must be at least 1"
        )
    output = AtomicDirectory(cfg.out_dir, overwrite=cfg.overwrite)  # refuses a non-empty --out now
    with open_hf_checkpoint(cfg.hf_path) as ckpt:
        arch = from_hf_config(ckpt.config)
        if cfg.model is not None:
            check_requested_model(get_arch(cfg.model), arch, cfg.model)
        build = ModelBuildConfig(
            tensor_parallel=cfg.tensor_parallel,
            pipeline_parallel=cfg.pipeline_parallel,
            make_vocab_size_divisible_by=cfg.make_vocab_size_divisible_by,
            use_transformer_engine=False,
        )
        validate_parallelism(arch, build, world_size=cfg.tensor_parallel * cfg.pipeline_parallel)
        padded = padded_vocab_size(
            arch.vocab_size, cfg.tensor_parallel, cfg.make_vocab_size_divisible_by
        )
        lay = tensor_layout(arch, padded)
        check_hf_shapes(ckpt, lay)
        dtype_name = cfg.dtype or ckpt.dtype_name()
        if dtype_name not in _DTYPES:
            raise UserError(f"--dtype {dtype_name}: choose one of {', '.join(_DTYPES)}")
        dtype = _DTYPES[dtype_name]

        platform.initialize_model_parallel(1, 1)
        tconfig = build_transformer_config(
            arch,
            ModelBuildConfig(use_transformer_engine=False),
            params_dtype=dtype,
            pipeline_dtype=dtype,
            bf16=dtype == torch.bfloat16,
            fp16=dtype == torch.float16,
            perform_initialization=False,
            use_cpu_initialization=True,  # meta parameters need no device
        )
        model = build_model(
            arch,
            tconfig,
            pre_process=True,
            post_process=True,
            build=ModelBuildConfig(use_transformer_engine=False),
            vocab_size=padded,
            meta=True,  # the checkpoint is written from the HF tensors, never from a model
        )
        _check_every_parameter_has_a_source(model, ckpt, lay)

        def source(name: str, param_dtype: torch.dtype) -> torch.Tensor:
            # each HF tensor read straight into the parameter's dtype (norms stay float32 in
            # a bf16 model: megatron-core's local RMSNorm keeps its weight in float32)
            return hf_to_mcore_tensor(name, lambda hf_name: ckpt.get(hf_name, param_dtype), lay)

        conversion = {
            "converted_from": str(cfg.hf_path),
            "target_tensor_parallel": cfg.tensor_parallel,
            "target_pipeline_parallel": cfg.pipeline_parallel,
            "dtype": dtype_name,
        }
        with output as tmp:
            save_checkpoint(
                tmp,
                0,
                [model],
                arch=arch,
                args=conversion,
                save_rng=False,
                padded_vocab_size=padded,
                sharded_strategy=streaming_save_strategy(source, order=mcore_group_order(lay)),
            )
            _save_hf_side_files(ckpt, tmp / mcore_checkpoint.HF_SIDE_DIR)
    return Path(cfg.out_dir)


def _check_every_parameter_has_a_source(model, ckpt, lay) -> None:
    """Run the whole mapping on meta tensors (shapes only) before anything is written: a
    parameter the mapping cannot make, or makes in the wrong shape, is a bug caught here rather
    than a checkpoint that fails to load later."""

    def shape_only(name: str) -> torch.Tensor:
        return torch.empty(ckpt.shape(name), device="meta")

    for name, param in model.state_dict(keep_vars=True).items():
        if not torch.is_tensor(param) or name.endswith("._extra_state"):
            continue
        if lay.tie_word_embeddings and name == MC_OUTPUT:
            continue  # megatron-core ties it to the embedding; it is not saved
        try:
            shape = tuple(hf_to_mcore_tensor(name, shape_only, lay).shape)
        except KeyError:
            raise RuntimeError(f"parameter {name} has no HF source") from None
        if shape != tuple(param.shape):
            raise RuntimeError(f"{name}: mapped shape {shape} != parameter {tuple(param.shape)}")


def _save_hf_side_files(ckpt, side: Path) -> None:
    """Keep the source config, generation config and tokenizer, so the export is complete."""
    from transformers import AutoTokenizer

    side.mkdir(parents=True, exist_ok=True)
    (side / "config.json").write_text(
        json.dumps(ckpt.config.to_dict(), indent=2, sort_keys=True) + "\n"
    )
    src = Path(ckpt.path)
    if src.is_dir() and (src / "generation_config.json").exists():
        shutil.copy(src / "generation_config.json", side / "generation_config.json")
    if ckpt.tokenizer_source is not None:
        path, kwargs = ckpt.tokenizer_source
        try:
            tok = AutoTokenizer.from_pretrained(path, **kwargs)
        except Exception:  # a weights-only directory: the export takes --tokenizer-from
            return
        tok.save_pretrained(side / "tokenizer")
