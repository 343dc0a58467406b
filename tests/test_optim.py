from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from backbones import build_backbone
from core.config import OptimConfig, ScheduleConfig
from core.optim import build_optimizer, build_scheduler, lr_factor, parameter_groups


def lrs(cfg: ScheduleConfig, steps_per_epoch: int, total: int, base: float = 0.1) -> list[float]:
    model = nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=base)
    sched = build_scheduler(opt, cfg, steps_per_epoch, total)
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_polynomial_with_warmup_closed_form():
    cfg = ScheduleConfig(name="polynomial", warmup_epochs=1.0, power=2.0)
    got = lrs(cfg, steps_per_epoch=4, total=20)
    expected = [0.1 * (s + 1) / 4 for s in range(4)] + [0.1 * (1 - (s - 4) / 16) ** 2 for s in range(4, 20)]
    assert got == pytest.approx(expected)


def test_multistep_milestones_in_epochs():
    cfg = ScheduleConfig(name="multistep", milestones=[2, 3.5], gamma=0.1)
    got = lrs(cfg, steps_per_epoch=4, total=20)
    expected = [0.1] * 8 + [0.01] * 6 + [0.001] * 6
    assert got == pytest.approx(expected)


def test_cosine_to_min_lr():
    cfg = ScheduleConfig(name="cosine", min_lr=0.01)
    got = lrs(cfg, steps_per_epoch=5, total=11)
    expected = [0.01 + 0.09 * 0.5 * (1 + math.cos(math.pi * s / 11)) for s in range(11)]
    assert got == pytest.approx(expected)
    assert lr_factor(11, cfg, 5, 11, 0.1) == pytest.approx(0.1)  # min_lr / base at the end


def test_bad_step_counts():
    with pytest.raises(ValueError, match="positive step counts"):
        lr_factor(0, ScheduleConfig(), 0, 10, 0.1)


def test_parameter_groups_skip_frozen_and_split_decay():
    model = build_backbone("mbf")
    groups = parameter_groups([model], weight_decay=5e-4, no_decay_bn_bias=True)
    decay, no_decay = groups
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim <= 1 for p in no_decay["params"])
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 5e-4
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(decay["params"]) + len(no_decay["params"]) == len(trainable)
    r18 = build_backbone("r18")
    (only,) = parameter_groups([r18], 5e-4, no_decay_bn_bias=False)
    assert all(p is not r18.features.weight for p in only["params"])  # frozen BN1d scale left out


def test_build_optimizer_kinds():
    model = nn.Linear(3, 2)
    sgd = build_optimizer(OptimConfig(name="sgd", lr=0.2, momentum=0.8, nesterov=True), [model])
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["nesterov"] and sgd.defaults["momentum"] == 0.8
    adamw = build_optimizer(OptimConfig(name="adamw", lr=1e-3, betas=[0.8, 0.9]), [model])
    assert isinstance(adamw, torch.optim.AdamW) and adamw.defaults["betas"] == (0.8, 0.9)
