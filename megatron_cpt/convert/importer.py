"""HF (safetensors dir or GGUF) -> megatron-core distributed checkpoint.

The model is built once at TP=1/PP=1 in this process and filled group by group from the
memory-mapped HF tensors; megatron-core's ``sharded_state_dict`` then describes every tensor by
its *global* shape, so the saved ``torch_dist`` checkpoint loads at the requested TP/PP (or any
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
from megatron_cpt.convert.hf_reader import open_hf_checkpoint
from megatron_cpt.convert.hf_writer import AtomicDirectory
from megatron_cpt.convert.layout import check_hf_shapes, check_requested_model, tensor_layout
from megatron_cpt.convert.mapping import hf_group_names, hf_to_mcore_group
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
            perform_initialization=False,  # every parameter is overwritten below
        )
        model = build_model(
            arch,
            tconfig,
            pre_process=True,
            post_process=True,
            build=ModelBuildConfig(use_transformer_engine=False),
            vocab_size=padded,
        )
        params = model.state_dict(keep_vars=True)
        filled: set[str] = set()
        with torch.no_grad():
            for names in hf_group_names(lay):
                for name, tensor in hf_to_mcore_group(names, ckpt.get, lay).items():
                    params[name].data.copy_(tensor)
                    filled.add(name)
                ckpt.release()
        missing = sorted(
            k
            for k, v in params.items()
            if torch.is_tensor(v)
            and k not in filled
            and not (arch.tie_word_embeddings and k == "output_layer.weight")
        )
        if missing:  # a mapping bug, not a user error
            raise RuntimeError(f"parameters left unconverted: {missing[:5]}")

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
            )
            _save_hf_side_files(ckpt, tmp / mcore_checkpoint.HF_SIDE_DIR)
    return Path(cfg.out_dir)


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
