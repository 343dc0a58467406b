"""The per-pixel coordinates a painter works in, and the antialiased steps the painters share."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass
class Canvas:
    """Per-pixel coordinates of the box being painted."""

    u: np.ndarray
    v: np.ndarray
    s: np.ndarray  # across the mask, 0..1, cylindrical
    t: np.ndarray  # top edge -> bottom edge, 0..1
    inside: np.ndarray  # distance to the mask's edge, pixels (0 outside)
    width_px: float
    height_px: float
    d: float  # pixels per unit of u
    depth: float  # pixels per unit of v
    rng: np.random.Generator

    @property
    def x(self) -> np.ndarray:  # along the mask surface, pixels
        return self.s * self.width_px

    @property
    def y(self) -> np.ndarray:
        return self.t * self.height_px


def smooth_box(distance_px: np.ndarray) -> np.ndarray:
    """Antialiased step: 1 inside (positive distance to an edge in pixels), 0 outside."""
    return np.clip(distance_px + 0.5, 0.0, 1.0)


def stripes(
    x: np.ndarray, y: np.ndarray, angle: float, period: float, duty: float, phase: float
) -> np.ndarray:
    """Antialiased stripes at ``angle``: ``period`` pixels apart, ``duty`` of each period covered."""
    along = (x * math.cos(angle) + y * math.sin(angle)) / period + phase
    frac = along - np.floor(along)
    return smooth_box((duty / 2 - np.abs(frac - 0.5)) * period)
