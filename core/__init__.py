"""Shared plumbing that is not a model: config, registries, preprocessing, (later) checkpoints and
distributed helpers."""
