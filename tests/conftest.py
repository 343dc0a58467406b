from __future__ import annotations

import itertools
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from core.paths import DATA_ENV, shared_data_dir

REQUIRE_ENV = "FACEREC_REQUIRE_DATA"

# Under pytest-xdist (``make test`` runs a worker per core) every worker, and every process a test starts,
# computes on one thread: the workers are the parallelism, and two thread pools per core only wait on each
# other. A thread count set by the user's environment is kept.
if os.environ.get("PYTEST_XDIST_WORKER") and not os.environ.get("OMP_NUM_THREADS"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _restore_thread_count():
    """A test that runs an entry point (which chooses its own thread count, ``core.threads``) does not
    change the thread count of the tests after it."""
    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real face data folder; skips without it, fails instead when $FACEREC_REQUIRE_DATA=1 (CI)."""
    root = shared_data_dir()
    if not root.is_dir():
        reason = f"real face data not found at {root} (set ${DATA_ENV})"
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    return root


def _float64(x) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().double()
    return torch.from_numpy(np.asarray(x, dtype=np.float64))


def assert_close_scaled(actual, expected, rtol: float, *, scale: str = "max", msg: str = "") -> None:
    """Assert ``|actual - expected| <= rtol * S`` everywhere, where ``S`` is the magnitude of ``expected``:
    its largest absolute value (``scale="max"``) or its root mean square (``scale="rms"``).

    For the outputs and gradients of deep networks and for long sums. Their rounding error comes from
    summing many terms whose size is the tensor's scale, so an element near zero carries as large an
    absolute error as its neighbours: a per-element ``rtol`` does not cover it, and a fixed ``atol`` is
    too loose for small tensors and too tight for large ones. Each caller states the bound it chose and
    the spread it measured. Tensors or arrays of equal shape; torch tensors must also agree in dtype.
    An all-zero ``expected`` demands exact equality.
    """
    if scale not in ("max", "rms"):
        raise ValueError(f"assert_close_scaled: scale must be 'max' or 'rms', got {scale!r}")
    if not rtol > 0:
        raise ValueError(f"assert_close_scaled: rtol must be positive, got {rtol}")
    prefix = f"{msg}: " if msg else ""
    if isinstance(actual, torch.Tensor) and isinstance(expected, torch.Tensor):
        assert actual.dtype == expected.dtype, f"{prefix}dtype {actual.dtype} != expected {expected.dtype}"
    a, e = _float64(actual), _float64(expected)
    assert a.shape == e.shape, f"{prefix}shape {tuple(a.shape)} != expected {tuple(e.shape)}"
    assert torch.isfinite(e).all(), f"{prefix}the expected values are not all finite"
    assert torch.isfinite(a).all(), f"{prefix}{int((~torch.isfinite(a)).sum())} non-finite values"
    if e.numel() == 0:
        return
    size = e.abs().max().item() if scale == "max" else e.square().mean().sqrt().item()
    diff = (a - e).abs()
    worst = int(diff.argmax())
    greatest, bound = diff.flatten()[worst].item(), rtol * size
    if greatest > bound:
        where = tuple(int(i) for i in np.unravel_index(worst, tuple(e.shape)))
        got, want = a.flatten()[worst].item(), e.flatten()[worst].item()
        raise AssertionError(
            f"{prefix}greatest |difference| {greatest:.3g} at {where} "
            f"(actual {got:.6g}, expected {want:.6g}) exceeds "
            f"rtol {rtol:g} x {scale} |expected| {size:.3g} = {bound:.3g} "
            f"({int((diff > bound).sum())} of {e.numel()} elements over)"
        )


class ShapesOnly:
    """Backbone ``name`` built on the meta device and run on fake tensors: every operator computes only the
    shape and dtype of its result, so a 600 M-parameter network is built and run forward and backward in
    about a second, with no weights in memory. For the contract (attributes, ``(N, D)`` output, the
    feature map, which parameters a loss reaches), never for values: numeric properties are checked on a
    real network. The fake tensors report the CPU as their device, so the backbones' autocast contexts
    (which refuse the meta device) run as they do on a CPU.

    Backbones whose construction reads values (resface64's truncated-normal init redraws by
    ``torch.nonzero``) cannot be built this way and raise here.
    """

    def __init__(self, name: str, **kwargs) -> None:
        from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

        from backbones import build_backbone

        with torch.device("meta"):
            self.model = build_backbone(name, **kwargs)
        self.mode = FakeTensorMode()
        cpu = torch.device("cpu")
        self.parameters = {
            key: FakeTensor(self.mode, p.detach(), cpu).requires_grad_(p.requires_grad)
            for key, p in self.model.named_parameters()
        }
        self.buffers = {key: FakeTensor(self.mode, b, cpu) for key, b in self.model.named_buffers()}

    def input(self, n: int, side: int) -> torch.Tensor:
        with self.mode:
            return torch.empty(n, 3, side, side)

    def __call__(self, x: torch.Tensor, **kwargs):
        with self.mode:
            return torch.func.functional_call(self.model, {**self.parameters, **self.buffers}, (x,), kwargs)

    def unreached_parameters(self, output: torch.Tensor) -> list[str]:
        """Trainable parameters that a loss on every coordinate of ``output`` gets no gradient for."""
        trainable = {key: p for key, p in self.parameters.items() if p.requires_grad}
        with self.mode:
            loss = (output * torch.linspace(-1, 1, output.shape[1])).sum()
            grads = torch.autograd.grad(loss, list(trainable.values()), allow_unused=True)
        return [key for key, grad in zip(trainable, grads, strict=True) if grad is None]


# --------------------------------------------------------------------- where the test process groups meet


def rendezvous(folder: Path | str) -> str:
    """The ``init_method`` of a test's gloo process group: a file store in the test's own folder. Tests that
    run at once (pytest-xdist) never meet there, as they could at a TCP port chosen before the ranks start."""
    return f"file://{Path(folder) / 'rendezvous'}"


_PORT_CALLS = itertools.count()


def free_tcp_port() -> int:
    """A TCP port for ``MASTER_PORT`` (ranks started as torchrun starts them): free now and below the
    kernel's ephemeral range, so no ``bind(("", 0))`` nor outgoing connection takes it while the ranks
    start; each test process scans from its own place in the range."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    first, span = 10000, max(1000, low - 10000)
    start = (os.getpid() * 7919 + next(_PORT_CALLS) * 101) % span
    for k in range(span):
        port = first + (start + k) % span
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free TCP port in [{first}, {first + span})")
