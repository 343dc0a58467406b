"""The one module that calls ``torch.distributed``: everything else is rank-agnostic.

Without an initialised process group every helper behaves as a single process (rank 0 of 1), so the same
code runs in tests, on a laptop and under torchrun.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce (``sum`` or ``max``) without autograd; returns the tensor."""
    if is_distributed():
        dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
    return tensor


def all_gather_padded(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's ``tensor`` (first dimensions may differ between ranks), without autograd."""
    if not is_distributed():
        return [tensor]
    sizes = torch.tensor([tensor.shape[0]], device=tensor.device)
    all_sizes = [torch.zeros_like(sizes) for _ in range(get_world_size())]
    dist.all_gather(all_sizes, sizes)
    longest = int(max(s.item() for s in all_sizes))
    padded = torch.zeros((longest, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    padded[: tensor.shape[0]] = tensor
    gathered = [torch.empty_like(padded) for _ in all_sizes]
    dist.all_gather(gathered, padded.contiguous())
    return [g[: int(s.item())] for g, s in zip(gathered, all_sizes, strict=True)]


class _AllGather(torch.autograd.Function):
    """Concatenate equal-sized tensors of all ranks; backward returns to each rank the sum over ranks of
    the gradients of its own slice (every rank's loss term depends on every rank's samples)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(tensor) for _ in range(get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        ctx.rows = tensor.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = get_rank() * ctx.rows
        return grad[start : start + ctx.rows]


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """All ranks' tensors concatenated along dim 0 (equal sizes), differentiable."""
    if not is_distributed():
        return tensor
    rows = torch.tensor([tensor.shape[0]], device=tensor.device)
    low, high = all_reduce(rows.clone(), "max"), -all_reduce(-rows.clone(), "max")
    if int(low) != int(high):
        raise ValueError(
            f"all ranks must hold the same number of samples, got between {int(high)} and {int(low)}"
        )
    return _AllGather.apply(tensor)
