"""What decides one mask's look (:class:`MaskStyle`) and the random draws every mask kind shares.

Each kind's own draws (colours, pattern, type-specific numbers) live in its module;
:func:`data.masks.draw_style` makes the shared draws below first, in this order, so the same generator
state draws the same mask.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from data.masks.geometry import MaskShape

RGB = tuple[float, float, float]
WHITE_LOOPS: tuple[RGB, ...] = ((240, 240, 240), (225, 225, 230))
# Half-range of the uniform jitter of each of MaskShape's fields from top to bulge (face-frame units).
SHAPE_JITTER = np.array([0.02, 0.03, 0.0, 0.05, 0.05, 0.04, 0.04, 0.0, 0.0])


@dataclass(frozen=True)
class MaskStyle:
    """Everything that decides one mask's look: :func:`draw_style` draws one, :func:`render_mask` paints
    it."""

    kind: str
    shape: MaskShape
    color: RGB
    rotation: float = 0.0  # radians, about the eye midpoint
    color2: RGB = (0.0, 0.0, 0.0)  # pattern colour, valve colour
    pattern: str = "plain"  # cloth pattern, or the overlay picture's name
    params: dict[str, float] = field(default_factory=dict)  # type-specific numbers (pleat positions, ...)
    loop_color: RGB = (235.0, 235.0, 235.0)
    loop_width: float = 0.03  # in eye distances
    side_shade: float = 0.25  # cylindrical darkening towards the sides
    vertical_shade: float = 0.0  # gradient from top (-) to bottom (+)
    horizontal_shade: float = 0.0  # gradient from left (-) to right (+)
    lighting: float = 0.5  # exponent on the photo's own lighting
    grain: float = 3.0  # fabric noise, grey levels
    feather: float = 0.6  # edge softness, pixels
    noise_seed: int = 0


def jitter_color(rng: np.random.Generator, palette: Sequence[RGB], spread: float = 8.0) -> RGB:
    """A colour of ``palette`` drawn uniformly, each channel moved by up to ``spread`` grey levels."""
    base = np.asarray(palette[int(rng.integers(len(palette)))], dtype=np.float64)
    return tuple(np.clip(base + rng.uniform(-spread, spread, 3), 0, 255).tolist())  # type: ignore[return-value]


def draw_shape(mean: Sequence[float], rng: np.random.Generator) -> MaskShape:
    """A kind's mean shape (MaskShape's fields from top to bulge) jittered, with the ears' place."""
    j = rng.uniform(-1.0, 1.0, size=8)
    jitter = SHAPE_JITTER * np.array([j[0], j[1], 0, j[2], j[3], j[4], j[5], 0, 0])
    values = np.asarray(mean) + jitter
    ear = (float(1.42 + 0.06 * j[6]), float(0.38 + 0.05 * j[7]))
    return MaskShape(*(float(x) for x in values), ear=ear)


def draw_common(rng: np.random.Generator) -> dict[str, Any]:
    """The :class:`MaskStyle` fields every kind draws alike: pose, shading, lighting, edge, noise seed."""
    return dict(
        rotation=float(rng.uniform(-0.05, 0.05)),
        side_shade=float(rng.uniform(0.15, 0.35)),
        vertical_shade=float(rng.uniform(-0.15, 0.15)),
        horizontal_shade=float(rng.uniform(-0.12, 0.12)),
        lighting=float(rng.uniform(0.3, 0.7)),
        feather=float(rng.uniform(0.4, 0.8)),
        noise_seed=int(rng.integers(2**31)),
    )
