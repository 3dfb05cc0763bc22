"""megatron-cpt: domain-adaptive continual pre-training of Llama-family models on megatron-core."""

__version__ = "0.1.0"
