"""The one module that calls ``torch.distributed``: everything else is rank-agnostic.

Without an initialised process group every helper behaves as a single process (rank 0 of 1), so the same
code runs in tests, on a laptop and under torchrun.
"""

from __future__ import annotations

import datetime
import gc
import os

import torch
import torch.distributed as dist
from torch import nn


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def init_distributed(timeout_minutes: float = 30.0) -> torch.device:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1) and return this process's device.

    NCCL with one GPU per process when CUDA is present, gloo on CPUs. Without torchrun (no
    ``WORLD_SIZE``) this is a single process on ``cuda:0`` or the CPU.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not is_distributed():
        dist.init_process_group(
            backend="nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=timeout_minutes)
        )
    return device


def shutdown_distributed() -> None:
    """Leave the process group cleanly: objects that hold it (DDP) are freed first and every rank meets
    at a barrier, so no rank tears its gloo/NCCL threads down while another still talks to it (an abort,
    "terminate called without an active exception", at the end of an otherwise finished run)."""
    if is_distributed():
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on at least one (a collective decision)."""
    if not is_distributed():
        return flag
    t = torch.tensor([int(flag)], device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _sum_hook(fp16: bool):
    """DDP communication hook that sums gradients over ranks (optionally all-reduced in fp16)."""

    # no annotations: DDP checks them as objects, and this module's are strings (postponed evaluation)
    def hook(state, bucket):  # type: ignore[no-untyped-def]
        buffer = bucket.buffer()
        sent = buffer.to(torch.float16) if fp16 else buffer
        future = dist.all_reduce(sent, async_op=True).get_future()

        def finish(fut: torch.futures.Future) -> torch.Tensor:
            reduced = fut.value()[0]
            return buffer.copy_(reduced) if fp16 else reduced

        return future.then(finish)

    return hook


def register_sum_hook(model: nn.Module, fp16: bool = False) -> None:
    """Make a DDP model *sum* gradients over ranks instead of averaging them.

    Each rank's loss here is already the loss of the global batch (Partial FC gathers every rank's
    samples), so the gradient of the global loss is the sum of the ranks' gradients. ``fp16`` halves the
    traffic as arcface_torch's compression hook does.
    """
    model.register_comm_hook(state=None, hook=_sum_hook(fp16))


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
