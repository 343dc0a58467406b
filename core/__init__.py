"""Shared plumbing that is not a model: config, registries, checkpoints, optimizers and schedules,
distributed helpers (the one module that calls torch.distributed), atomic writes, data paths."""
