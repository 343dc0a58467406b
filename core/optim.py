"""Optimizers and per-step learning-rate schedules built from the config (docs/methods.md §4).

Schedules are per optimizer step: linear warmup from 0 over ``warmup_epochs``, then ``polynomial``
(arcface_torch's PolynomialLRWarmup: (1 - progress)^power, power 1 by default as there; its former
PolyScheduler used 2), ``multistep`` (milestones in epochs) or ``cosine`` decay to ``min_lr``. After the
warmup the polynomial factor equals PolynomialLRWarmup's step for step; during the warmup step k takes
(k + 1) / warmup of the rate, where PolynomialLRWarmup takes k / warmup after a first step at the full
rate (docs/fidelity.md).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from core.config import OptimConfig, ScheduleConfig


def parameter_groups(modules: Iterable[nn.Module], weight_decay: float, no_decay_bn_bias: bool) -> list[dict]:
    """Trainable parameters, with BN/PReLU-style 1-d parameters and biases in a group without weight decay
    when ``no_decay_bn_bias``; frozen parameters (requires_grad False) are left out."""
    decay, no_decay = [], []
    for module in modules:
        for p in module.parameters():
            if not p.requires_grad:
                continue
            (no_decay if no_decay_bn_bias and p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(cfg: OptimConfig, modules: Iterable[nn.Module]) -> torch.optim.Optimizer:
    groups = parameter_groups(modules, cfg.weight_decay, cfg.no_decay_bn_bias)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas))


def lr_factor(
    step: int, cfg: ScheduleConfig, steps_per_epoch: int, total_steps: int, base_lr: float
) -> float:
    """Multiplier of ``base_lr`` at optimizer step ``step`` (0-based)."""
    if total_steps <= 0 or steps_per_epoch <= 0:
        raise ValueError(
            f"schedule needs positive step counts, got {total_steps} total, {steps_per_epoch}/epoch"
        )
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    if step < warmup:
        return (step + 1) / warmup
    if cfg.name == "multistep":
        return cfg.gamma ** sum(step >= round(m * steps_per_epoch) for m in cfg.milestones)
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    if cfg.name == "polynomial":
        decay = (1.0 - progress) ** cfg.power
    else:  # cosine
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    floor = cfg.min_lr / base_lr if base_lr > 0 else 0.0
    return floor + (1.0 - floor) * decay


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, steps_per_epoch: int, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step LambdaLR over the schedule; call ``step()`` after every optimizer step."""
    base = optimizer.param_groups[0]["lr"]
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, cfg, steps_per_epoch, total_steps, base)
    )
