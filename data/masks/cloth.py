"""The ``cloth`` mask: plain, stripes, dots, noise (heather or camouflage) or check fabric, an optional seam.

The fabric patterns are a table (:data:`PATTERNS`): each gives the weight of the second colour at every
pixel of the canvas; a style draws one of them uniformly, in the table's order.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import cv2
import numpy as np

from data.masks.canvas import Canvas, smooth_box, stripes
from data.masks.geometry import MaskShape
from data.masks.style import RGB, MaskStyle, jitter_color

SHAPE = (0.28, 0.13, 0.25, 1.08, 0.88, 1.05, 1.50, 2.0, 0.06)  # MaskShape's fields from top to bulge
COLORS: tuple[RGB, ...] = (
    (30, 30, 32), (35, 45, 85), (70, 95, 140), (70, 72, 78), (115, 30, 45), (175, 40, 45), (95, 100, 55),
    (180, 165, 125), (225, 140, 170), (100, 60, 130), (30, 120, 125), (205, 160, 50), (230, 230, 228),
)  # fmt: skip


def _plain(c: Canvas, p: dict[str, float]) -> np.ndarray:
    return np.zeros_like(c.x)


def _stripes(c: Canvas, p: dict[str, float]) -> np.ndarray:
    return stripes(c.x, c.y, p["angle"], p["period"], p["duty"], p["phase"])


def _dots(c: Canvas, p: dict[str, float]) -> np.ndarray:
    x, y = c.x, c.y
    spacing = p["period"] + 1.0
    row = np.floor(y / spacing)
    xs = x + (row % 2) * spacing / 2
    dx = np.mod(xs, spacing) - spacing / 2
    dy = np.mod(y, spacing) - spacing / 2
    return smooth_box(p["dot_radius"] * spacing - np.hypot(dx, dy))


def _noise(c: Canvas, p: dict[str, float]) -> np.ndarray:
    coarse = c.rng.random((5, 7)).astype(np.float32)
    field_ = cv2.resize(coarse, (64, 48), interpolation=cv2.INTER_CUBIC)
    mx = (c.s * 63).astype(np.float32)
    my = (c.t * 47).astype(np.float32)
    sampled = cv2.remap(field_, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    sampled = (sampled - sampled.min()) / max(float(np.ptp(sampled)), 1e-6)
    return np.clip((sampled - 0.5) * 6 + 0.5, 0, 1) if p["camouflage"] else sampled


def _check(c: Canvas, p: dict[str, float]) -> np.ndarray:
    a = stripes(c.x, c.y, 0.0, p["period"] * 1.5, p["duty"], p["phase"])
    b = stripes(c.x, c.y, math.pi / 2, p["period"] * 1.5, p["duty"], p["phase"])
    return 0.5 * (a + b)


# pattern name -> weight of the second colour per pixel; the order is the order a style draws from
PATTERNS: dict[str, Callable[[Canvas, dict[str, float]], np.ndarray]] = {
    "plain": _plain,
    "stripes": _stripes,
    "dots": _dots,
    "noise": _noise,
    "check": _check,
}
CLOTH_PATTERNS = tuple(PATTERNS)


def draw(
    rng: np.random.Generator,
    kind: str,
    shape: MaskShape,
    common: dict[str, Any],
    overlay_names: Sequence[str],
) -> MaskStyle:
    pattern = CLOTH_PATTERNS[int(rng.integers(len(CLOTH_PATTERNS)))]
    params = {
        "angle": float(rng.choice([0.0, math.pi / 2, math.pi / 4, -math.pi / 4, rng.uniform(0, math.pi)])),
        "period": rng.uniform(4.0, 9.0),
        "duty": rng.uniform(0.3, 0.6),
        "phase": rng.uniform(0, 1),
        "dot_radius": rng.uniform(0.22, 0.35),
        "camouflage": float(rng.random() < 0.5),
        "seam": float(rng.random() < 0.5),
    }
    color = jitter_color(rng, COLORS, 10)
    color2 = jitter_color(rng, COLORS, 10)
    if np.abs(np.subtract(color, color2)).sum() < 90:  # a pattern must show: take the complement
        color2 = (255.0 - color[0], 255.0 - color[1], 255.0 - color[2])
    loop = color if rng.random() < 0.6 else jitter_color(rng, ((30, 30, 32), (235, 235, 235)))
    loops = {"loop_color": loop, "loop_width": rng.uniform(0.03, 0.05)}
    return MaskStyle(
        kind, shape, color, color2=color2, pattern=pattern, params=params, grain=rng.uniform(3, 6),
        **loops, **common,
    )  # fmt: skip


def paint(
    c: Canvas, style: MaskStyle, overlays: Mapping[str, np.ndarray] | None
) -> tuple[np.ndarray, np.ndarray]:
    p = style.params
    weight = PATTERNS.get(style.pattern, _plain)(c, p)
    c1, c2 = np.asarray(style.color, np.float32), np.asarray(style.color2, np.float32)
    color = c1 * (1 - weight[..., None]) + c2 * weight[..., None]
    light = np.zeros_like(c.x)
    if p["seam"]:
        light -= 0.25 * np.exp(-(((c.u * c.d) / 0.8) ** 2))
    light -= 0.06 * (c.inside < 1.8)  # hem
    return color, light
