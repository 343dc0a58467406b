"""The one module that calls ``torch.distributed``: everything else is rank-agnostic.

Without an initialised process group every helper behaves as a single process (rank 0 of 1), so the same
code runs in tests, on a laptop and under torchrun.

A collective that cannot complete (another rank stopped, as a hung NFS mount stops it, or died) raises
:class:`CollectiveError`, one line naming this rank, the operation and where it was called, and the ranks it
waited for. Every collective of the framework runs through this module, so its operation is known; those
inside DDP (the buffer broadcast of the forward pass, the gradient all-reduce of the backward pass) are named
by :func:`collective_error` from the traceback. How long a rank waits is ``train.collective_timeout_s``
(:data:`TIMEOUT_ENV` overrides it).
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import math
import os
import re
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

import torch
import torch.distributed as dist
from torch import nn

from core.registry import ConfigError
from core.spill import host_empty

# Overrides train.collective_timeout_s for every run of the environment (a cluster-wide setting).
TIMEOUT_ENV = "FACEREC_COLLECTIVE_TIMEOUT_S"
# Exit status of a process that stopped because of another rank or its launcher (2: refused input).
FAULT_EXIT_STATUS = 3
# How long a rank whose collective failed waits for the other ranks to report the same (world size > 2).
_CENSUS_S = 5.0
_CENSUS_KEY = "facerec/collective_failed"

_HERE = Path(__file__).resolve()
_ROOT = _HERE.parent.parent
_TORCH = Path(torch.__file__).resolve().parent
_STDLIB = Path(os.__file__).resolve().parent  # contextlib's frames between a collective and its caller
# The limit in force and where it was set, for the message of a timed-out collective.
_limit: dict[str, object] = {}
_watcher: list[threading.Thread] = []


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def collective_timeout(configured_s: float) -> tuple[float, str]:
    """The collective timeout in seconds and where it was set: :data:`TIMEOUT_ENV` when set, else
    ``configured_s`` (``train.collective_timeout_s``)."""
    raw = os.environ.get(TIMEOUT_ENV)
    if raw is None or not raw.strip():
        return configured_s, "train.collective_timeout_s"
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"${TIMEOUT_ENV} must be a number of seconds > 0, got {raw!r}")
    return value, f"${TIMEOUT_ENV}"


def init_distributed(timeout_s: float = 1800.0, launcher_watch_s: float = 0.0) -> torch.device:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1) and return this process's device.

    NCCL with one GPU per process when CUDA is present, gloo on CPUs. Without torchrun (no
    ``WORLD_SIZE``) this is a single process on ``cuda:0`` or the CPU. A collective waits at most
    ``timeout_s`` for the other ranks (:func:`collective_timeout`: :data:`TIMEOUT_ENV` overrides it). Under
    torchrun, ``launcher_watch_s`` > 0 ends the process when its launcher is gone (:func:`watch_launcher`).
    """
    timeout_s, source = collective_timeout(timeout_s)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not is_distributed():
        dist.init_process_group(
            backend="nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s)
        )
        _limit.update(seconds=timeout_s, source=source)
    if launcher_watch_s > 0 and "TORCHELASTIC_RUN_ID" in os.environ and not _watcher:
        _watcher.append(watch_launcher(launcher_watch_s, int(os.environ.get("RANK", "0"))))
    return device


def shutdown_distributed(after_fault: bool = False) -> None:
    """Leave the process group cleanly: objects that hold it (DDP) are freed first and every rank meets
    at a barrier, so no rank tears its gloo/NCCL threads down while another still talks to it (an abort,
    "terminate called without an active exception", at the end of an otherwise finished run).
    ``after_fault``: a collective failed, so the other ranks are not met (they would not come)."""
    if is_distributed():
        gc.collect()
        if not after_fault:
            barrier()
        dist.destroy_process_group()


def watch_launcher(interval_s: float, rank: int) -> threading.Thread:
    """End this process, with one line on stderr, once its parent (torchrun's agent) is gone.

    The agent stops every rank when one fails; killed itself (``kill -9``, an out-of-memory kill), it leaves
    its ranks training unsupervised, and a scheduler that restarts the job would then run two copies into
    one ``output_dir``. The parent is checked every ``interval_s`` seconds in a daemon thread (a new parent
    means the old one exited); an atomic checkpoint write that the exit interrupts leaves only a temporary
    file, which the next run removes."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval_s)
        print(
            f"rank {rank}: its launcher (pid {parent}) is gone; stopping so that no rank trains "
            "unsupervised (train.launcher_watch_s)",
            file=sys.stderr,
            flush=True,
        )
        os._exit(FAULT_EXIT_STATUS)

    thread = threading.Thread(target=watch, name="launcher-watch", daemon=True)
    thread.start()
    return thread


# -------------------------------------------------------------------------------- failed collectives

_TIMED_OUT = re.compile(r"timed out|timeout", re.IGNORECASE)
_PEER_GONE = re.compile(
    r"connection (closed|reset) by peer|broken pipe|remote (process|worker|peer) (exited|crash)",
    re.IGNORECASE,
)
_BACKEND = re.compile(r"gloo|nccl|c10d|ProcessGroup|collective", re.IGNORECASE)
# DDP's own collectives, recognised by the functions of a traceback (innermost match wins)
_DDP_OPS = {
    "_sync_buffers": "broadcast of the module buffers (DDP forward)",
    "_pre_forward": "collective of DDP's forward pass",
    "_post_forward": "collective of DDP's forward pass",
    "_sync_params_and_buffers": "broadcast of the initial parameters (DDP start)",
    "_verify_param_shape_across_processes": "check of the parameter shapes (DDP start)",
    "_engine_run_backward": "all_reduce of the gradients (DDP backward)",
}


class CollectiveError(RuntimeError):
    """A collective that could not complete: it timed out waiting for other ranks, or a rank's connection
    closed. ``str()`` is one line: this rank, the operation and where it was called, what went wrong, the
    ranks it waited for, and the training step when the caller sets ``step``."""

    def __init__(self, rank: int, op: str, timed_out: bool, waiting_for: list[int] | None, seconds=None):
        super().__init__(rank, op, timed_out, waiting_for, seconds)
        self.rank, self.op, self.timed_out, self.waiting_for, self.seconds = (
            rank, op, timed_out, waiting_for, seconds,
        )  # fmt: skip
        self.step: int | None = None  # optimizer steps done when it failed, if the caller knows

    def __str__(self) -> str:
        who = _ranks(self.waiting_for)
        if self.timed_out:
            after = f" after {self.seconds:g} s" if self.seconds is not None else ""
            what = f"timed out{after} waiting for {who or 'another rank'}"
        elif self.waiting_for and len(self.waiting_for) == 1:
            what = f"failed: the connection to {who} closed (it ended or crashed: see its output)"
        else:
            what = "failed: a rank closed its connection (it ended or crashed: see its output)"
            what += f"; not answering: {who}" if who else ""
        notes = [f"after step {self.step}"] if self.step is not None else []
        notes += [f"limit: {_limit['source']}"] if self.timed_out and _limit else []
        return f"rank {self.rank}: {self.op} {what}" + (f" ({'; '.join(notes)})" if notes else "")


def _ranks(ranks: list[int] | None) -> str:
    if not ranks:
        return ""
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(map(str, ranks))


def _is_collective_failure(err: BaseException, raised_by_collective: bool = True) -> bool | None:
    """True for a timeout, False for a lost peer, None for anything else. ``raised_by_collective`` False:
    ``err`` may come from anywhere, so its text must also name a communication backend."""
    if not isinstance(err, RuntimeError) or isinstance(err, CollectiveError):
        return None
    text = str(err)
    if not raised_by_collective and not _BACKEND.search(text):
        return None
    if _PEER_GONE.search(text):
        return False
    return True if _TIMED_OUT.search(text) else None


def _seconds(err: BaseException) -> float | None:
    waited = re.search(r"(\d+)\s*ms\b", str(err))  # gloo: "Timed out waiting 3000ms for recv ..."
    if waited:
        return int(waited.group(1)) / 1000
    return _limit.get("seconds")  # type: ignore[return-value]


def _site(frames: list[tuple[str, int, str]]) -> str:
    """``function (file:line)`` of the innermost frame outside this module and torch (innermost first)."""
    for filename, line, name in frames:
        path = Path(filename).resolve()
        if path == _HERE or _TORCH in path.parents or _STDLIB in path.parents or filename.startswith("<"):
            continue
        shown = path.relative_to(_ROOT) if _ROOT in path.parents else path.name
        return f"{name} ({shown}:{line})"
    return ""


def _live_frames(frame: FrameType | None) -> list[tuple[str, int, str]]:
    frames = []
    while frame is not None:
        frames.append((frame.f_code.co_filename, frame.f_lineno, frame.f_code.co_name))
        frame = frame.f_back
    return frames


def _unanswered(rank: int, world: int, grace_s: float) -> list[int] | None:
    """The ranks that did not also report a failed collective within ``grace_s`` (through the process
    group's store): those this rank waited for. With 2 ranks, the other one; None when the store does not
    answer in time (it may live in the stopped process)."""
    if world == 2:
        return [1 - rank]
    found: list[list[int]] = []

    def census() -> None:
        store = dist.distributed_c10d._get_default_store()
        store.set(f"{_CENSUS_KEY}/{rank}", "1")
        others = [r for r in range(world) if r != rank]
        deadline = time.monotonic() + grace_s
        while True:
            silent = [r for r in others if not store.check([f"{_CENSUS_KEY}/{r}"])]
            if not silent or time.monotonic() >= deadline:
                found.append(silent)
                return
            time.sleep(0.1)

    def guarded() -> None:
        with contextlib.suppress(Exception):  # the store is gone or stopped: name no rank, do not hang
            census()

    thread = threading.Thread(target=guarded, name="collective-census", daemon=True)
    thread.start()
    thread.join(grace_s + 2.0)
    return found[0] if found else None


def _failure(err: BaseException, op: str, site: str, raised_by_collective: bool) -> CollectiveError | None:
    timed_out = _is_collective_failure(err, raised_by_collective)
    if timed_out is None:
        return None
    rank, world = get_rank(), get_world_size()
    grace = min(_CENSUS_S, float(_limit.get("seconds", _CENSUS_S)))  # type: ignore[arg-type]
    named = f"{op} in {site}" if site else op
    return CollectiveError(rank, named, timed_out, _unanswered(rank, world, grace), _seconds(err))


@contextlib.contextmanager
def _collective(op: str) -> Iterator[None]:
    """Run a collective; a timeout or lost peer becomes a :class:`CollectiveError` naming ``op`` and the
    caller outside this module."""
    try:
        yield
    except RuntimeError as err:
        failure = _failure(err, op, _site(_live_frames(sys._getframe(1))), raised_by_collective=True)
        if failure is None:
            raise
        raise failure from err


def collective_error(err: BaseException, step: int | None = None) -> CollectiveError | None:
    """``err`` as a :class:`CollectiveError` if it is one or is the failure of a collective that ran outside
    this module (DDP's, named from the traceback), else None. ``step``: training steps done, for the
    message."""
    failure = err if isinstance(err, CollectiveError) else None
    if failure is None and _is_collective_failure(err, raised_by_collective=False) is not None:
        frames = [
            (f.filename, f.lineno or 0, f.name) for f in reversed(traceback.extract_tb(err.__traceback__))
        ]
        names = [name for _, _, name in frames]
        op = next((_DDP_OPS[n] for n in names if n in _DDP_OPS), None)
        if op is None:
            op = next(
                (n for f, _, n in frames if _TORCH / "distributed" in Path(f).resolve().parents),
                "a collective",
            )
        failure = _failure(err, op, _site(frames), raised_by_collective=False)
    if failure is not None and step is not None and failure.step is None:
        failure.step = step
    return failure


# -------------------------------------------------------------------------------------- collectives


def barrier() -> None:
    if is_distributed():
        with _collective("barrier"):
            dist.barrier()


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on at least one (a collective decision)."""
    if not is_distributed():
        return flag
    t = torch.tensor([int(flag)], device=_collective_device())
    with _collective("all_reduce (any_rank)"):
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
        future = dist.all_reduce(sent, async_op=True).get_future()  # a failure: see collective_error

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
        with _collective("all_reduce"):
            dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
    return tensor


def all_gather_padded(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's ``tensor`` (first dimensions may differ between ranks), without autograd."""
    if not is_distributed():
        return [tensor]
    sizes = torch.tensor([tensor.shape[0]], device=tensor.device)
    all_sizes = [torch.zeros_like(sizes) for _ in range(get_world_size())]
    with _collective("all_gather of the sizes (all_gather_padded)"):
        dist.all_gather(all_sizes, sizes)
    longest = int(max(s.item() for s in all_sizes))
    padded = torch.zeros((longest, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    padded[: tensor.shape[0]] = tensor
    gathered = [torch.empty_like(padded) for _ in all_sizes]
    with _collective("all_gather (all_gather_padded)"):
        dist.all_gather(gathered, padded.contiguous())
    return [g[: int(s.item())] for g, s in zip(gathered, all_sizes, strict=True)]


def gather_rows_to_rank0(tensor: torch.Tensor) -> torch.Tensor | None:
    """Every rank's ``tensor`` concatenated along dim 0 in rank order (first dimensions may differ), on
    rank 0 alone and in host memory; None on the other ranks. Without autograd.

    Memory is bounded: rank 0 allocates the result once and receives each rank's rows straight into it
    (under NCCL through one device buffer of the largest shard); the other ranks send their tensor and
    allocate nothing but the row count. :func:`all_gather_padded` would give every rank ``world`` shards.
    A large result is backed by a file when :func:`core.spill.use_directory` has set a folder, so that
    its pages can leave memory (:func:`core.spill.host_empty`)."""
    if not is_distributed():
        out = host_empty(tuple(tensor.shape), tensor.dtype)
        return out.copy_(tensor.detach())
    tensor = tensor.detach().contiguous()
    rows = torch.tensor([tensor.shape[0]], device=tensor.device)
    counts = [torch.zeros_like(rows) for _ in range(get_world_size())]
    with _collective("all_gather of the row counts (gather_rows_to_rank0)"):
        dist.all_gather(counts, rows)
    sizes = [int(c.item()) for c in counts]
    if get_rank() != 0:
        if sizes[get_rank()]:
            with _collective("send to rank 0 (gather_rows_to_rank0)"):
                dist.send(tensor, dst=0)
        return None
    out = host_empty((sum(sizes), *tensor.shape[1:]), tensor.dtype)
    out[: sizes[0]].copy_(tensor)
    staged = tensor.device.type != "cpu" or dist.get_backend() == "nccl"
    buffer = (
        torch.empty((max(sizes), *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
        if staged
        else None
    )
    start = sizes[0]
    for src, n in enumerate(sizes[1:], start=1):
        if n:
            target = buffer[:n] if buffer is not None else out[start : start + n]
            with _collective(f"receive from rank {src} (gather_rows_to_rank0)"):
                dist.recv(target, src=src)
            if buffer is not None:
                out[start : start + n].copy_(target)
        start += n
    return out


class _AllGather(torch.autograd.Function):
    """Concatenate equal-sized tensors of all ranks; backward returns to each rank the sum over ranks of
    the gradients of its own slice (every rank's loss term depends on every rank's samples)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(tensor) for _ in range(get_world_size())]
        with _collective("all_gather (all_gather_with_grad)"):
            dist.all_gather(parts, tensor.contiguous())
        ctx.rows = tensor.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        with _collective("all_reduce of the gradients (backward of all_gather_with_grad)"):
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
