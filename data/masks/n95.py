"""The ``n95`` mask: a rounded cup, a moulded rim, a central seam, an optional exhalation valve, head
straps."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from data.masks.canvas import Canvas, smooth_box
from data.masks.geometry import MaskShape
from data.masks.style import RGB, MaskStyle, jitter_color

SHAPE = (0.265, 0.24, 0.08, 1.02, 0.72, 1.10, 1.50, 1.6, 0.10)  # MaskShape's fields from top to bulge
COLORS: tuple[RGB, ...] = (
    (242, 242, 238), (230, 226, 212), (200, 202, 204), (170, 185, 200), (48, 48, 52),
)  # fmt: skip
VALVE_COLORS: tuple[RGB, ...] = (
    (235, 235, 235), (150, 150, 155), (60, 60, 64), (70, 110, 170), (215, 120, 50),
)  # fmt: skip
STRAP_COLORS: tuple[RGB, ...] = ((240, 240, 240), (70, 110, 170), (230, 200, 80), (160, 160, 160))


def draw(
    rng: np.random.Generator,
    kind: str,
    shape: MaskShape,
    common: dict[str, Any],
    overlay_names: Sequence[str],
) -> MaskStyle:
    params = {
        "valve": float(rng.random() < 0.5),
        "valve_u": float(rng.choice([-1.0, 1.0])) * rng.uniform(0.35, 0.5),
        "valve_t": rng.uniform(0.5, 0.65),
        "valve_r": rng.uniform(0.17, 0.22),
    }
    color, valve = jitter_color(rng, COLORS, 5), jitter_color(rng, VALVE_COLORS)
    straps = {"loop_color": jitter_color(rng, STRAP_COLORS), "loop_width": rng.uniform(0.04, 0.06)}
    return MaskStyle(
        kind, shape, color, color2=valve, params=params, grain=rng.uniform(2, 4), **straps, **common
    )


def paint(
    c: Canvas, style: MaskStyle, overlays: Mapping[str, np.ndarray] | None
) -> tuple[np.ndarray, np.ndarray]:
    p, shape = style.params, style.shape
    color = np.broadcast_to(np.asarray(style.color, np.float32), (*c.t.shape, 3)).copy()
    light = -0.18 * ((c.u / shape.half_width) ** 2 + (2 * c.t - 1) ** 2) + 0.06  # the cup's roundness
    light -= 0.1 * (c.inside < 2.2)  # moulded rim
    light += 0.05 * ((c.inside >= 2.2) & (c.inside < 3.2))
    seam_px = c.u * c.d
    light -= 0.2 * np.exp(-((seam_px / 0.7) ** 2))
    light += 0.06 * np.exp(-(((seam_px - 1.2) / 0.6) ** 2))
    if p["valve"]:
        uc = p["valve_u"]
        vc = float(
            shape.top_v(np.array(uc))
            + p["valve_t"] * (shape.bottom_v(np.array(uc)) - shape.top_v(np.array(uc)))
        )
        radius = p["valve_r"] * c.d
        dist = np.hypot((c.u - uc) * c.d, (c.v - vc) * c.depth)
        shadow = smooth_box(radius * 1.15 - dist) * (1 - smooth_box(radius - dist))
        light -= 0.15 * shadow
        cover = smooth_box(radius - dist)
        ring = (dist > 0.78 * radius) & (dist < radius)
        slats = (dist < 0.65 * radius) & (
            np.sin((c.v - vc) * c.depth * 2 * math.pi / max(radius * 0.35, 1.2)) > 0.3
        )
        valve_light = -0.2 * ring - 0.22 * slats + 0.12 * (1 - dist / max(radius, 1e-6)).clip(0, 1)
        color = color * (1 - cover[..., None]) + np.asarray(style.color2, np.float32) * cover[..., None]
        light = light * (1 - cover) + valve_light * cover
    return color, light
