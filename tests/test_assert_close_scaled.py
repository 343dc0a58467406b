"""The suite's comparison of deep-network outputs: a bound relative to the magnitude of the whole tensor."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tests.conftest import assert_close_scaled


def test_an_element_near_zero_gets_the_tensor_scale_not_its_own():
    expected = torch.tensor([[10.0, -4.0], [1e-3, 2.0]], dtype=torch.float64)
    off = torch.zeros_like(expected)
    off[1, 0] = 9e-4  # 90% of the element itself, 9e-5 of the tensor's largest value
    assert_close_scaled(expected + off, expected, rtol=1e-4)
    with pytest.raises(AssertionError):  # a per-element tolerance fails where the kernels' noise is
        torch.testing.assert_close(expected + off, expected, rtol=1e-4, atol=1e-5)
    off[1, 0] = 1.1e-3
    with pytest.raises(AssertionError) as failure:
        assert_close_scaled(expected + off, expected, rtol=1e-4, msg="layer1.weight")
    text = str(failure.value)
    assert text.startswith("layer1.weight: greatest |difference| 0.0011 at (1, 0)")
    assert "rtol 0.0001 x max |expected| 10 = 0.001" in text and "(1 of 4 elements over)" in text


def test_rms_scale():
    expected = np.array([3.0, 4.0, 0.0, 0.0])  # max 4, rms 2.5
    bound, at = 1e-3 * 2.5, np.array([0.0, 0.0, 1.0, 0.0])
    assert_close_scaled(expected + 0.99 * bound * at, expected, rtol=1e-3, scale="rms")
    with pytest.raises(AssertionError, match=r"rms \|expected\| 2\.5 = 0\.0025"):
        assert_close_scaled(expected + 1.01 * bound * at, expected, rtol=1e-3, scale="rms")
    assert_close_scaled(expected + 1.01 * bound * at, expected, rtol=1e-3)  # max: 0.004


def test_shape_dtype_non_finite_and_zero_scale_fail():
    x = torch.ones(3)
    with pytest.raises(AssertionError, match=r"shape \(3,\) != expected \(1, 3\)"):
        assert_close_scaled(x, x[None], rtol=1e-4)
    with pytest.raises(AssertionError, match=r"dtype torch\.float32 != expected torch\.float64"):
        assert_close_scaled(x, x.double(), rtol=1e-4)
    with pytest.raises(AssertionError, match="1 non-finite values"):
        assert_close_scaled(torch.tensor([1.0, math.nan, 1.0]), x, rtol=1e-4)
    with pytest.raises(AssertionError, match="expected values are not all finite"):
        assert_close_scaled(x, torch.tensor([1.0, math.inf, 1.0]), rtol=1e-4)
    zeros = torch.zeros(2)
    assert_close_scaled(zeros.clone(), zeros, rtol=1e-4)
    with pytest.raises(AssertionError, match="greatest"):  # nothing to scale by: exact equality
        assert_close_scaled(zeros + 1e-30, zeros, rtol=1e-4)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="scale must be 'max' or 'rms', got 'mean'"):
        assert_close_scaled(torch.ones(1), torch.ones(1), rtol=1e-4, scale="mean")
    with pytest.raises(ValueError, match="rtol must be positive, got 0"):
        assert_close_scaled(torch.ones(1), torch.ones(1), rtol=0)
