"""Training on megatron-core: loop, optimizer/schedules, data blending, checkpoints, logging."""
