from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from core.paths import DATA_ENV, shared_data_dir

REQUIRE_ENV = "FACEREC_REQUIRE_DATA"


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
