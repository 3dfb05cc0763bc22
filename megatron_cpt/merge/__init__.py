"""Model merging (the mergekit methods: TIES, DARE, DELLA, SLERP, Model Stock, ...) from
mergekit-style YAML recipes.

The Llama-3-SEC recipe merges the continually pre-trained model back with the instruct model so
the domain gain stays and the lost chat/general ability returns. ``config`` parses the recipe,
``methods`` holds the per-tensor algorithms, ``megatron_cpt.safetensors_io`` streams HF
checkpoints in and out, and ``engine`` ties them together one tensor at a time.
"""

from megatron_cpt.merge.config import MergeConfig, load_config, parse_config
from megatron_cpt.merge.engine import MergeOptions, MergeResult, merge_checkpoints

__all__ = [
    "MergeConfig",
    "MergeOptions",
    "MergeResult",
    "load_config",
    "merge_checkpoints",
    "parse_config",
]
