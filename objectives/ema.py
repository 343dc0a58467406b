"""An exponential moving average of the backbone's weights (``train.ema``), kept beside the trained one.

After every ``every``-th optimizer step that counts (a skipped step changes nothing), with ``n`` the number
of updates so far, this one included::

    d = decay_at(n)
    ema <- d * ema + (1 - d) * weights

for every floating-point tensor of the state dict: parameters and BN running statistics are averaged alike,
integer buffers (BN's ``num_batches_tracked``) are copied, as timm's ``ModelEmaV3`` does. The first update
copies the weights (d = 0, as ``ModelEmaV3``), and ``warmup`` lets the average forget its start quickly:

* ``none``: d = decay;
* ``power``: d = min(decay, 1 - n^-warmup_power), ``ModelEmaV3`` with ``use_warmup`` (``warmup_gamma`` 1);
* ``tf``: d = min(decay, (1 + n) / (10 + n)), TensorFlow's ``ExponentialMovingAverage`` with
  ``num_updates``.

With ``every`` 1 and no skipped step, n is the optimizer step and the decays are ``ModelEmaV3``'s. The
average lives on the training device or on the CPU (``device``), in the backbone's dtypes. It needs torch
only: the loop (``train.py``) builds it (:func:`build_ema`), updates it, saves and restores it
(:func:`resume_ema`), and validates it.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

WARMUPS = ("none", "power", "tf")


class ModelEma:
    """The average of ``model``'s weights: ``module`` (an eval-mode copy without gradients) and ``updates``.

    ``device`` is where the copy lives (default: the model's)."""

    def __init__(
        self,
        model: nn.Module,
        decay: float,
        warmup: str = "power",
        warmup_power: float = 2 / 3,
        every: int = 1,
        device: str | torch.device | None = None,
    ) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        if warmup not in WARMUPS:
            raise ValueError(f"EMA warmup must be one of {', '.join(WARMUPS)}, got {warmup!r}")
        if not 0.0 < warmup_power <= 1.0:
            raise ValueError(f"EMA warmup_power must be in (0, 1], got {warmup_power}")
        if every < 1:
            raise ValueError(f"EMA every must be >= 1, got {every}")
        self.decay, self.warmup, self.warmup_power, self.every = decay, warmup, warmup_power, every
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        if device is not None:
            self.module.to(device)
        self.device = next(iter(self.module.state_dict().values())).device
        self.updates = 0

    def decay_at(self, n: int) -> float:
        """The decay of update ``n`` (1 for the first)."""
        if n <= 1:
            return 0.0
        if self.warmup == "power":
            return min(self.decay, 1.0 - n ** (-self.warmup_power))
        if self.warmup == "tf":
            return min(self.decay, (1.0 + n) / (10.0 + n))
        return self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> float:
        """Fold ``model``'s weights into the average; returns the decay used."""
        self.updates += 1
        decay = self.decay_at(self.updates)
        weights = model.state_dict()
        averaged, fresh = [], []
        for key, ema in self.module.state_dict().items():
            value = weights[key].detach().to(self.device)
            if ema.is_floating_point():
                averaged.append(ema)
                fresh.append(value.to(ema.dtype))
            else:
                ema.copy_(value)
        if averaged:
            torch._foreach_lerp_(averaged, fresh, 1.0 - decay)  # ema + (1 - d) (w - ema) = d ema + (1 - d) w
        return decay

    def after_step(self, model: nn.Module, step: int) -> bool:
        """Update after optimizer step ``step`` (1 for the first) if it is one of every ``every``-th;
        returns whether it did."""
        if step % self.every:
            return False
        self.update(model)
        return True

    @torch.no_grad()
    def restart(self, model: nn.Module) -> None:
        """Start afresh from ``model``'s weights (no update counted)."""
        self.module.load_state_dict(model.state_dict())
        self.updates = 0

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint's ``ema`` entry (without its validation results, which the loop adds)."""
        return {"backbone": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["backbone"])
        self.updates = int(state["updates"])


def build_ema(settings: Any, backbone: nn.Module, device: torch.device) -> ModelEma | None:
    """The average of ``backbone``'s weights that the ``train.ema`` section ``settings`` asks for (None when
    off), on the training ``device`` or the CPU, starting from the backbone's current weights."""
    if not settings.enabled:
        return None
    where = torch.device("cpu") if settings.device == "cpu" else device
    return ModelEma(
        backbone, settings.decay, settings.warmup, settings.warmup_power, settings.every, device=where
    )


def describe_ema(ema: ModelEma, settings: Any, frozen: bool) -> str:
    """The log line of the average's ``train.ema`` settings (and what averaging a ``frozen`` backbone
    means)."""
    warmup = f"power {settings.warmup_power:.4g}" if settings.warmup == "power" else settings.warmup
    line = (
        f"train.ema: an average of the backbone's weights, decay {settings.decay:g}, warmup {warmup}, "
        f"updated every {settings.every} optimizer step{'s' if settings.every > 1 else ''}, on "
        f"{ema.device}, {ema.updates} updates so far; best.pt by the {settings.select_best} weights"
    )
    if frozen:
        line += " (model.freeze_backbone: the backbone does not change, so its average equals it)"
    return line


def resume_ema(
    ema: ModelEma | None, saved: dict[str, Any] | None, backbone: nn.Module
) -> tuple[str, dict[str, Any]]:
    """A checkpoint's ``ema`` entry ``saved`` into ``ema``; without one (the run had train.ema off) the
    average starts from the resumed ``backbone``. Returns (what the resume line says of it, '' when nothing
    changes; the average's latest validation results)."""
    if ema is None:
        dropped = saved is not None
        return ("; train.ema is off: the checkpoint's average is not carried on" if dropped else ""), {}
    if saved is None:
        ema.restart(backbone)
        return "; the checkpoint holds no train.ema average: it starts from the resumed weights", {}
    ema.load_state_dict(saved)
    return "", saved.get("validation", {})
