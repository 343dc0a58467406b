"""Optimizers and per-step learning-rate schedules built from the config (docs/methods.md §4).

Schedules are per optimizer step: linear warmup from 0 over ``warmup_epochs``, then ``polynomial``
(arcface_torch's PolynomialLRWarmup: (1 - progress)^power, power 1 by default as there; its former
PolyScheduler used 2), ``multistep`` (milestones in epochs) or ``cosine`` decay to ``min_lr``. After the
warmup the polynomial factor equals PolynomialLRWarmup's step for step; during the warmup step k takes
(k + 1) / warmup of the rate, where PolynomialLRWarmup takes k / warmup after a first step at the full
rate (docs/fidelity.md).

Layer-wise learning-rate decay (``optim.layer_decay`` < 1, BEiT's and MAE's fine-tuning rule): a module that
numbers its parameters' layers (``lr_depth`` L and ``lr_layer(name)`` in 0..L, as the ViT backbones do)
trains layer i at ``lr * layer_decay^(L - i)``; every other module, and every parameter at 1, at ``lr``.
The schedule multiplies every group alike, so the ratios hold at every step.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from core.config import OptimConfig, ScheduleConfig
from core.registry import ConfigError


def parameter_groups(
    modules: Iterable[nn.Module], weight_decay: float, no_decay_bn_bias: bool, layer_decay: float = 1.0
) -> list[dict]:
    """Trainable parameters, with BN/PReLU-style 1-d parameters and biases in a group without weight decay
    when ``no_decay_bn_bias``; frozen parameters (requires_grad False) are left out. With ``layer_decay`` < 1
    the parameters of a module that numbers its layers are grouped by layer too, each group carrying its
    ``lr_scale`` (groups of scale 1 first, so ``param_groups[0]`` holds the full rate)."""
    grouped: dict[tuple[float, bool], list[nn.Parameter]] = {}
    for module in modules:
        depth = getattr(module, "lr_depth", None) if layer_decay != 1.0 else None
        for name, p in module.named_parameters():
            if not p.requires_grad:
                continue
            scale = 1.0 if depth is None else layer_decay ** (depth - module.lr_layer(name))
            grouped.setdefault((scale, no_decay_bn_bias and p.ndim <= 1), []).append(p)
    if layer_decay == 1.0:  # the two groups the optimizer always had: with decay (even if empty), without
        grouped.setdefault((1.0, False), [])
    groups = []
    for (scale, no_decay), params in sorted(grouped.items(), key=lambda item: (-item[0][0], item[0][1])):
        group = {"params": params, "weight_decay": 0.0 if no_decay else weight_decay}
        if layer_decay != 1.0:
            group["lr_scale"] = scale
        groups.append(group)
    return groups


def build_optimizer(cfg: OptimConfig, modules: Iterable[nn.Module]) -> torch.optim.Optimizer:
    modules = list(modules)
    if cfg.layer_decay != 1.0 and not any(hasattr(m, "lr_depth") for m in modules):
        names = ", ".join(type(m).__name__ for m in modules)
        raise ConfigError(
            f"optim.layer_decay {cfg.layer_decay:g} needs a backbone that numbers its layers (the vit_* "
            f"backbones); none of {names} does: set optim.layer_decay: 1.0",
            key="optim.layer_decay",
        )
    groups = parameter_groups(modules, cfg.weight_decay, cfg.no_decay_bn_bias, cfg.layer_decay)
    for group in groups:
        group["lr"] = cfg.lr * group.get("lr_scale", 1.0)
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
