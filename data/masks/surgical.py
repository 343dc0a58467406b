"""The ``surgical`` mask: light colours, three pleats, bound edges with stitching, a nose wire, ear loops."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from data.masks.canvas import Canvas
from data.masks.geometry import MaskShape
from data.masks.style import RGB, WHITE_LOOPS, MaskStyle, jitter_color

# MaskShape's fields from top to bulge (face-frame units); the photographed overlays take it too
SHAPE = (0.27, 0.12, 0.18, 1.12, 0.95, 1.04, 1.46, 2.2, 0.05)
COLORS: tuple[RGB, ...] = (
    (158, 196, 226), (120, 180, 220), (150, 205, 185), (95, 165, 150), (236, 238, 240),
    (238, 185, 200), (200, 190, 230), (205, 208, 212), (40, 42, 46),
)  # fmt: skip


def draw(
    rng: np.random.Generator,
    kind: str,
    shape: MaskShape,
    common: dict[str, Any],
    overlay_names: Sequence[str],
) -> MaskStyle:
    params = {
        "pleat0": rng.uniform(0.27, 0.34),
        "pleat_gap": rng.uniform(0.16, 0.21),
        "pleat_depth": rng.uniform(0.12, 0.25),
    }
    color = jitter_color(rng, COLORS)
    loops = {"loop_color": jitter_color(rng, WHITE_LOOPS), "loop_width": rng.uniform(0.025, 0.04)}
    return MaskStyle(kind, shape, color, params=params, grain=rng.uniform(1.5, 4), **loops, **common)


def paint(
    c: Canvas, style: MaskStyle, overlays: Mapping[str, np.ndarray] | None
) -> tuple[np.ndarray, np.ndarray]:
    p = style.params
    light = np.zeros_like(c.t)
    w = max(0.9 / c.height_px, 0.012)
    for k in range(3):
        tk = p["pleat0"] + k * p["pleat_gap"]
        light -= p["pleat_depth"] * np.exp(-(((c.t - tk) / w) ** 2))  # the fold's shadow line
        light += 0.45 * p["pleat_depth"] * np.exp(-(((c.t - tk - 3 * w) / (3 * w)) ** 2))  # its lit lip
    binding = c.inside < 2.6
    light -= 0.05 * binding
    stitch = (np.abs(c.inside - 2.6) < 0.5) & (np.sin(c.x * math.pi / 1.5) > 0)
    light -= 0.1 * stitch
    wire = (c.y < 4.0) & (np.abs(c.u) < 0.3)
    light += 0.05 * wire * np.cos(np.clip(c.u / 0.3, -1, 1) * math.pi / 2)
    return np.broadcast_to(np.asarray(style.color, np.float32), (*c.t.shape, 3)), light
