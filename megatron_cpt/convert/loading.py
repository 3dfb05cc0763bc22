"""Load a converted (or trained) megatron-core checkpoint as a model, and get its logits.

For evaluation, merging and the conversion tests: they need a ready ``GPTModel`` at some TP/PP
and full-vocabulary logits to compare with HF, without the trainer's optimizer or data setup.
At TP/PP > 1 call it in every rank of a ``torchrun`` job; at TP=PP=1 it sets up a one-process
group itself.
"""

from __future__ import annotations

from pathlib import Path

import torch

from megatron_cpt import platform
from megatron_cpt.convert import mcore_checkpoint
from megatron_cpt.convert.mapping import MC_EMBED
from megatron_cpt.errors import UserError
from megatron_cpt.model import (
    ModelBuildConfig,
    build_model,
    build_transformer_config,
    validate_parallelism,
)
from megatron_cpt.training.checkpointing import load_checkpoint, read_metadata


def load_megatron_model(
    ckpt_dir: str | Path, tp: int = 1, pp: int = 1, dtype: torch.dtype = torch.float32
):
    """Returns ``(model, arch)``: this rank's pipeline stage, in eval mode, weights loaded."""
    ckpt_dir = Path(ckpt_dir)
    meta = read_metadata(ckpt_dir)
    arch = meta["arch"]
    padded = mcore_checkpoint.GlobalTensorReader(Path(meta["path"])).global_shape(MC_EMBED)[0]
    if padded % tp:
        raise UserError(
            f"{ckpt_dir}: padded vocabulary {padded} is not divisible by TP={tp}; re-convert "
            f"with --tensor-model-parallel-size {tp}"
        )
    build = ModelBuildConfig(tensor_parallel=tp, pipeline_parallel=pp, bf16=dtype == torch.bfloat16)
    platform.init_distributed()
    validate_parallelism(arch, build, world_size=torch.distributed.get_world_size())
    platform.initialize_model_parallel(tp, pp)
    platform.set_seed(0)  # dropout is off; megatron-core still forks its RNG tracker
    config = build_transformer_config(
        arch, build, params_dtype=dtype, pipeline_dtype=dtype, perform_initialization=False
    )
    model = build_model(arch, config, build=build, vocab_size=padded)
    load_checkpoint(ckpt_dir, [model], weights_only=True)
    model.eval()
    return model, arch


@torch.no_grad()
def megatron_logits(model, input_ids: torch.Tensor, vocab_size: int | None = None):
    """Full-vocabulary logits ``[batch, seq, vocab]`` (padding columns cut when ``vocab_size``
    is given) on the last pipeline stage; ``None`` on other stages."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    input_ids = input_ids.to(platform.device())
    batch, seq = input_ids.shape
    position_ids = torch.arange(seq, device=input_ids.device).unsqueeze(0).expand(batch, -1)

    def gather(logits):
        logits = gather_from_tensor_model_parallel_region(logits)
        return logits[..., :vocab_size] if vocab_size is not None else logits

    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return gather(model(input_ids, position_ids, attention_mask=None)).float()

    def forward_step(data_iterator, chunk):
        output = chunk(input_ids, position_ids, attention_mask=None)

        def collect(output_tensor):
            return output_tensor.sum() * 0.0, {"logits": gather(output_tensor).float()}

        return output, collect

    outputs = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter([None]),
        model=[model],
        num_microbatches=1,
        seq_length=seq,
        micro_batch_size=batch,
        forward_only=True,
    )
    if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        return None
    return outputs[0]["logits"]
