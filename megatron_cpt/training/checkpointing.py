"""Checkpoints in megatron-core ``dist_checkpointing`` (torch_dist) layout, published atomically.

Layout (the same as Megatron-LM's, so its tools and ours read each other's checkpoints)::

    SAVE_DIR/
      latest_checkpointed_iteration.txt    "4"  (rewritten last: the publish step)
      iter_0000004/
        metadata.json, common.pt, __*.distcp  dist_checkpointing's files (torch_dist)
        megatron_cpt.json                      our metadata: HF config, padded vocab, TP/PP, ...

Why dist_checkpointing: each tensor is stored with its global shape and every rank writes and
reads only its shards, so a checkpoint saved at one TP/PP loads at another (it re-shards on
load), and an HF -> Megatron converter can write a checkpoint once for every parallel layout.

Why the ``.partial`` directory and the pointer file: a save that is killed half-way leaves
``iter_N.partial`` (ignored) and the old pointer, so the previous checkpoint stays the one that
loads. The directory is renamed into place only once every rank has finished writing, and the
pointer is replaced with an atomic rename after that.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_cpt import platform
from megatron_cpt.errors import UserError
from megatron_cpt.model.arch import LlamaArch, from_hf_config
from megatron_cpt.training.checkpoint_integrity import verify_checkpoint
from megatron_cpt.training.writer_processes import owned_writer_processes

TRACKER_FILE = "latest_checkpointed_iteration.txt"
METADATA_FILE = "megatron_cpt.json"
FORMAT = "megatron-cpt/torch_dist/1"
# Test hook (interrupted-save test): stop after the shards are written but before publishing, so
# that a SIGKILL lands in the worst place for atomicity.
PAUSE_IN_SAVE_ENV = "MEGATRON_CPT_TEST_PAUSE_IN_SAVE"
# Kept in the optimizer's sharded state. The distributed optimizer's layout: "fully_reshardable"
# (Megatron-LM's --dist-ckpt-optim-fully-reshardable) gathers its shards into the canonical
# per-parameter layout, so the checkpoint loads at another DP (and TP/PP) size; 0.16.1 refuses
# the older "fully_sharded_model_space" ("ShardedTensor.flattened_range is not supported").
_SHARDING_METADATA = {
    "distrib_optim_sharding_type": "fully_reshardable",
    "chained_optim_avoid_prefix": True,
    "singleton_local_shards": False,
}


def iteration_dir(save_dir: str | os.PathLike, iteration: int) -> Path:
    return Path(save_dir) / f"iter_{iteration:07d}"


def latest_iteration(save_dir: str | os.PathLike) -> int | None:
    """The published iteration in ``save_dir``, or None when nothing was published there."""
    tracker = Path(save_dir) / TRACKER_FILE
    try:
        text = tracker.read_text().strip()
    except (FileNotFoundError, NotADirectoryError):  # a path under a file is checked elsewhere
        return None
    if text == "release":  # Megatron-LM's marker for converted checkpoints
        return 0
    try:
        return int(text)
    except ValueError:
        raise UserError(f"{tracker}:1: expected an iteration number, got {text!r}") from None


def resolve_checkpoint_dir(path: str | os.PathLike, iteration: int | None = None) -> Path:
    """Accept either a save root (with the pointer file) or an ``iter_*`` directory itself."""
    path = Path(path)
    if (path / METADATA_FILE).exists() or (path / "metadata.json").exists():
        if iteration is None:
            return path
    if iteration is None:
        iteration = latest_iteration(path)
        if iteration is None:
            if not path.exists():
                raise UserError(f"{path}: checkpoint directory does not exist")
            raise UserError(f"{path}: no {TRACKER_FILE} (no published checkpoint here)")
    ckpt = iteration_dir(path, iteration)
    if not ckpt.is_dir():
        release = path / "release"
        if iteration == 0 and release.is_dir():
            return release
        raise UserError(f"{ckpt}: checkpoint for iteration {iteration} is missing")
    return ckpt


def read_metadata(path: str | os.PathLike, iteration: int | None = None) -> dict:
    """Our metadata (HF config, padded vocab, TP/PP, iteration, args) of a checkpoint.

    ``path`` may be the save root or the ``iter_*`` directory. ``metadata["arch"]`` is the
    reconstructed :class:`LlamaArch`.
    """
    ckpt = resolve_checkpoint_dir(path, iteration)
    meta_path = ckpt / METADATA_FILE
    try:
        meta = json.loads(meta_path.read_text())
    except FileNotFoundError:
        raise UserError(f"{meta_path}: missing (not a megatron-cpt checkpoint?)") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{meta_path}:{exc.lineno}: invalid JSON ({exc.msg})") from None
    if "hf_config" not in meta:
        raise UserError(f"{meta_path}: missing field 'hf_config'")
    meta["arch"] = from_hf_config(meta["hf_config"], megatron_only=True)
    meta["path"] = str(ckpt)
    return meta


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _parallel_info() -> dict:
    from megatron.core import parallel_state as ps

    return {
        "tensor_parallel": ps.get_tensor_model_parallel_world_size(),
        "pipeline_parallel": ps.get_pipeline_model_parallel_world_size(),
        "context_parallel": ps.get_context_parallel_world_size(),
        "data_parallel": ps.get_data_parallel_world_size(),
        "world_size": dist.get_world_size() if dist.is_initialized() else 1,
    }


def _rng_sharded_object(rng_state: dict | None):
    """Each rank's RNG states as one shard of a (world_size,) object, so a same-layout resume
    restores every rank's generators (and a different layout simply does not ask for them)."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    world = dist.get_world_size() if dist.is_initialized() else 1
    return ShardedObject("rng_state", rng_state, (world,), (_rank(),), replica_id=0)


def _model_sharded_state_dict(model_chunks: list) -> dict:
    from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group

    metadata = ensure_metadata_has_dp_cp_group({})
    if len(model_chunks) == 1:
        return {"model": model_chunks[0].sharded_state_dict(metadata=metadata)}
    return {
        f"model{i}": chunk.sharded_state_dict(metadata=metadata)
        for i, chunk in enumerate(model_chunks)
    }


def _unwrap(model_chunks: list) -> list:
    """The bare ``GPTModel`` of each chunk, so checkpoint keys never depend on the wrapping.

    megatron-core 0.16.1's DDP (and Float16Module) do not forward ``sharded_state_dict``: the
    generic ``MegatronModule`` walk prefixes every key with ``module.``, so a trainer checkpoint
    and a converted (unwrapped) one would not load into each other.
    """
    from megatron.core.distributed import DistributedDataParallel
    from megatron.core.transformer.module import Float16Module

    chunks = list(model_chunks) if isinstance(model_chunks, (list, tuple)) else [model_chunks]
    bare = []
    for chunk in chunks:
        while isinstance(chunk, (DistributedDataParallel, Float16Module)):
            chunk = chunk.module
        bare.append(chunk)
    return bare


def save_checkpoint(
    save_dir: str | os.PathLike,
    iteration: int,
    model_chunks,
    optimizer=None,
    scheduler=None,
    state: dict | None = None,
    arch: LlamaArch | None = None,
    keep_last: int | None = None,
    args: dict | None = None,
    save_rng: bool = True,
    padded_vocab_size: int | None = None,
    sharded_strategy=None,
) -> Path:
    """Save model (+ optimizer, scheduler, RNG, ``state``) as ``save_dir/iter_<iteration>``.

    Collective: every rank calls it. ``state`` holds small picklable trainer state (consumed
    samples, skipped iterations, ...); ``args`` the run configuration (JSON-serialisable).
    Returns the published checkpoint directory. ``sharded_strategy`` replaces megatron-core's
    default torch_dist writer (the converter's streaming save uses it; the format is the same).
    """
    from megatron.core import dist_checkpointing

    if arch is None:
        raise UserError("save_checkpoint needs the model architecture (arch=)")
    model_chunks = _unwrap(model_chunks)
    save_dir = Path(save_dir)
    final = iteration_dir(save_dir, iteration)
    partial = final.with_name(final.name + ".partial")
    if _rank() == 0:
        save_dir.mkdir(parents=True, exist_ok=True)
        if partial.exists():
            shutil.rmtree(partial)
        partial.mkdir()
    _barrier()

    sharded = _model_sharded_state_dict(model_chunks)
    if optimizer is not None:
        sharded["optimizer"] = optimizer.sharded_state_dict(sharded, metadata=_SHARDING_METADATA)
    if scheduler is not None:
        sharded["opt_param_scheduler"] = scheduler.state_dict()
    if save_rng:
        sharded["rng_state"] = _rng_sharded_object(platform.get_rng_state())
    sharded["iteration"] = iteration
    sharded["state"] = dict(state or {})
    sharded["checkpoint_version"] = 3.0  # what Megatron-LM writes for dist checkpoints

    start = time.time()
    platform.apply_cpu_patches()
    with owned_writer_processes():  # nothing megatron-core starts may outlive this process
        dist_checkpointing.save(
            sharded,
            str(partial),
            sharded_strategy=sharded_strategy,
            content_metadata=dict(_SHARDING_METADATA),
        )
    _barrier()
    if os.environ.get(PAUSE_IN_SAVE_ENV) == str(iteration):
        _pause_for_kill(save_dir / f"paused_in_save_{iteration}")

    if _rank() == 0:
        vocab = padded_vocab_size
        if vocab is None:
            emb = _find_vocab_rows(model_chunks)
            vocab = emb if emb is not None else None
        meta = {
            "format": FORMAT,
            "iteration": iteration,
            "hf_config": arch.to_hf_config(),
            "padded_vocab_size": vocab,
            **_parallel_info(),
            "has_optimizer": optimizer is not None,
            "has_scheduler": scheduler is not None,
            "has_rng": save_rng,
            "state": _jsonable(state or {}),
            "args": _jsonable(args or {}),
            "save_seconds": round(time.time() - start, 3),
        }
        _write_atomic(partial / METADATA_FILE, json.dumps(meta, indent=2, sort_keys=True) + "\n")
        if final.exists():  # re-saving an iteration (e.g. after a crash): replace it
            trash = final.with_name(final.name + ".old")
            if trash.exists():
                shutil.rmtree(trash)
            final.rename(trash)
            shutil.rmtree(trash)
        partial.rename(final)
        _write_atomic(save_dir / TRACKER_FILE, f"{iteration}\n")
        if keep_last:
            _prune(save_dir, keep_last, current=iteration)
    _barrier()
    return final


def _pause_for_kill(marker: Path) -> None:
    if _rank() == 0:
        marker.write_text(str(os.getpid()))
    while True:
        time.sleep(1)


def _find_vocab_rows(model_chunks: list) -> int | None:
    from megatron.core import parallel_state as ps

    for chunk in model_chunks:
        for name, param in chunk.named_parameters():
            if name.endswith("word_embeddings.weight") or name.endswith("output_layer.weight"):
                return param.shape[0] * ps.get_tensor_model_parallel_world_size()
    return None


def _jsonable(obj: Any) -> Any:
    """Best effort: what JSON cannot hold is written as its repr (metadata is for humans/tools)."""
    try:
        json.dumps(obj)
        return obj
    except TypeError:
        if isinstance(obj, dict):
            return {str(k): _jsonable(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [_jsonable(v) for v in obj]
        return repr(obj)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _prune(save_dir: Path, keep_last: int, current: int) -> None:
    iters = []
    for child in save_dir.iterdir():
        name = child.name
        if child.is_dir() and name.startswith("iter_") and name[5:].isdigit():
            iters.append(int(name[5:]))
    for it in sorted(iters)[:-keep_last]:
        if it != current:
            shutil.rmtree(iteration_dir(save_dir, it), ignore_errors=True)


def load_checkpoint(
    load_dir: str | os.PathLike,
    model_chunks,
    optimizer=None,
    scheduler=None,
    weights_only: bool = False,
    iteration: int | None = None,
    load_rng: bool = True,
) -> dict:
    """Load a checkpoint (collective). Returns its trainer state::

        {"iteration", "consumed_samples", ... (whatever ``state`` held),
         "metadata": read_metadata(...), "rng_restored": bool}

    ``weights_only=True`` (CPT start, evaluation, merging) loads the model only; optimizer,
    scheduler, RNG and iteration are ignored and ``iteration`` in the result is 0.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

    platform.apply_cpu_patches()
    ckpt = resolve_checkpoint_dir(load_dir, iteration)
    meta = read_metadata(ckpt)
    verify_checkpoint(ckpt)  # complete and safe, before megatron-core / torch read anything
    model_chunks = _unwrap(model_chunks)

    sharded = _model_sharded_state_dict(model_chunks)
    _check_model_keys(ckpt, sharded, meta)
    sharded = _drop_absent_extra_state(ckpt, sharded)
    same_layout = meta.get("world_size") == _parallel_info()["world_size"] and all(
        meta.get(k) == v for k, v in _parallel_info().items()
    )
    want_optimizer = optimizer is not None and not weights_only
    if want_optimizer:
        if not meta.get("has_optimizer"):
            raise UserError(
                f"{ckpt}: has no optimizer state; use it as --pretrained-checkpoint (weights only)"
            )
        sharded["optimizer"] = optimizer.sharded_state_dict(
            sharded, is_loading=True, metadata=_SHARDING_METADATA
        )
    restore_rng = load_rng and not weights_only and meta.get("has_rng") and same_layout
    if restore_rng:
        sharded["rng_state"] = _rng_sharded_object(None)

    try:
        loaded = dist_checkpointing.load(
            sharded, str(ckpt), strict=StrictHandling.ASSUME_OK_UNEXPECTED
        )
    except UserError:
        raise
    except (Exception, CheckpointException) as exc:  # shape/key mismatches, unreadable data
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{ckpt}: cannot load into this model: {first[:300]}") from exc

    for i, chunk in enumerate(model_chunks):
        key = "model" if len(model_chunks) == 1 else f"model{i}"
        # ``_extra_state`` (TE's FP8 metadata) may be absent from a local-spec or converted
        # checkpoint; every real tensor must be there.
        result = chunk.load_state_dict(loaded[key], strict=False)
        missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
        if missing:
            raise UserError(f"{ckpt}: the checkpoint does not set '{missing[0]}'")
    result: dict = {"metadata": meta, "rng_restored": False, "iteration": 0}
    if weights_only:
        return result

    common = dist_checkpointing.load_common_state_dict(str(ckpt))
    if want_optimizer:
        optimizer.load_state_dict(loaded["optimizer"])
    if scheduler is not None and "opt_param_scheduler" in common:
        scheduler.load_state_dict(common["opt_param_scheduler"])
    if restore_rng:
        platform.set_rng_state(loaded["rng_state"])
        result["rng_restored"] = True
    result.update(common.get("state", {}))
    result["iteration"] = int(common.get("iteration", meta.get("iteration", 0)))
    return result


def _drop_absent_extra_state(ckpt: Path, sharded: dict) -> dict:
    """Don't ask for TE ``_extra_state`` objects a checkpoint written without TE lacks."""
    from megatron.core.dist_checkpointing.dict_utils import extract_matching_values
    from megatron.core.dist_checkpointing.mapping import ShardedBase
    from megatron.core.dist_checkpointing.serialization import load_sharded_metadata

    wanted = [
        v for v in _nested(sharded) if isinstance(v, ShardedBase) and v.key.endswith("_extra_state")
    ]
    if not wanted:
        return sharded
    saved = set(load_sharded_metadata(str(ckpt)).keys())

    def absent(v) -> bool:
        return isinstance(v, ShardedBase) and v.key.endswith("_extra_state") and v.key not in saved

    _, kept = extract_matching_values(sharded, absent)
    return kept


def _nested(d):
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    return nested_values(d)


def _check_model_keys(ckpt: Path, sharded: dict, meta: dict) -> None:
    """A model/checkpoint mismatch as one line naming the first missing tensor and shape."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    try:
        saved = dist_checkpointing.load_tensors_metadata(str(ckpt))
    except Exception as exc:
        raise UserError(f"{ckpt}: unreadable dist_checkpointing metadata ({exc})") from exc
    for value in nested_values(sharded):
        if not isinstance(value, ShardedTensor) or value.key.endswith("_extra_state"):
            continue
        if value.key not in saved:
            raise UserError(
                f"{ckpt}: tensor '{value.key}' is not in the checkpoint (saved model: "
                f"{meta['hf_config'].get('num_hidden_layers')} layers, hidden "
                f"{meta['hf_config'].get('hidden_size')}); does --model match?"
            )
        want, have = tuple(value.global_shape), tuple(saved[value.key].global_shape)
        if want != have:
            raise UserError(
                f"{ckpt}: tensor '{value.key}' has shape {have} in the checkpoint but {want} in "
                f"this model (padded vocab {meta.get('padded_vocab_size')}); does --model match?"
            )


def resumable_iteration(save_dir: str | os.PathLike) -> tuple[int, str]:
    """The newest published iteration in ``save_dir`` that is complete, and a note if that is not
    the latest one (the latest was damaged after publishing: truncated or missing files).

    Falling back to the previous checkpoint costs ``--save-interval`` iterations; refusing to
    start costs the user a manual repair, so we fall back and say so.
    """
    save_dir = Path(save_dir)
    latest = latest_iteration(save_dir)
    if latest is None:
        raise UserError(f"{save_dir}: no published checkpoint to resume from")
    try:
        verify_checkpoint(resolve_checkpoint_dir(save_dir, latest))
        return latest, ""
    except UserError as exc:
        problem = str(exc)
    older = sorted(
        (int(p.name[len("iter_") :]) for p in save_dir.glob("iter_*") if p.name[5:].isdigit()),
        reverse=True,
    )
    for iteration in (i for i in older if i < latest):
        try:
            verify_checkpoint(iteration_dir(save_dir, iteration))
        except UserError:
            continue
        return iteration, (
            f"latest checkpoint (iteration {latest}) is damaged: {problem}; "
            f"resuming from the previous published checkpoint, iteration {iteration}"
        )
    raise UserError(f"{problem}; no earlier complete checkpoint in {save_dir}")


def checkpoint_exists(save_dir: str | os.PathLike | None) -> bool:
    return bool(save_dir) and latest_iteration(save_dir) is not None


def model_state_for_test(model_chunks) -> dict[str, torch.Tensor]:
    """Plain fp32 copies of the local parameters (tests compare them across save/load)."""
    out = {}
    for i, chunk in enumerate(_unwrap(model_chunks)):
        for name, param in chunk.named_parameters():
            out[f"{i}.{name}"] = param.detach().float().clone()
    return out
