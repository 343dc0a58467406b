"""Pieces shared by the backbones: the precision switch and memory-saving gradient checkpointing."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

PRECISIONS = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")


def body_autocast(x: torch.Tensor, precision: str) -> AbstractContextManager[object]:
    """Autocast for the convolutional body; ``fp32`` leaves an enclosing autocast as it is."""
    dtype = PRECISIONS[precision]
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=x.device.type, dtype=dtype)


def fp32_head(x: torch.Tensor) -> AbstractContextManager[object]:
    """The embedding layer (FC + BN) runs in fp32 even under an enclosing autocast: its output feeds the
    margin softmax, where fp16 rounding of the norm and of small logit differences costs accuracy."""
    return torch.autocast(device_type=x.device.type, enabled=False)


@contextmanager
def _bn_stats_frozen(module: nn.Module) -> Iterator[None]:
    """Keep BN running statistics unchanged while a checkpointed block is recomputed in backward.

    Without this, every checkpointed BN would fold the same batch into its running mean/var twice.
    """
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [
        (m.momentum, m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None)
        for m in norms
    ]
    for m in norms:
        m.momentum = 0.0  # running = (1 - 0) * running + 0 * batch
    try:
        yield
    finally:
        for m, (momentum, tracked) in zip(norms, saved, strict=True):
            m.momentum = momentum
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)


def run_block(block: nn.Module, x: torch.Tensor, use_checkpoint: bool) -> torch.Tensor:
    """``block(x)``, recomputed in backward instead of storing activations when ``use_checkpoint``."""
    if not (use_checkpoint and block.training and torch.is_grad_enabled()):
        return block(x)

    def contexts() -> tuple[AbstractContextManager[None], AbstractContextManager[None]]:
        return nullcontext(), _bn_stats_frozen(block)

    fn: Callable[[torch.Tensor], torch.Tensor] = block
    return checkpoint(fn, x, use_reentrant=False, context_fn=contexts)
