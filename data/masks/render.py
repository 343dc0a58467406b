"""Synthetic face masks drawn on aligned faces from the five landmarks (masked-face training data).

Geometry. The five points (eyes, nose tip, mouth corners: the ArcFace template of the crop unless the
caller passes detected ones) define a face frame: origin at the eye midpoint, ``u`` along the eye line in
units of the eye distance, ``v`` across it, towards the mouth, in units of the eye-to-mouth distance. On
the template the nose tip sits at ``v ~ 0.5``, the mouth corners at ``(+-0.41, 1.0)``, the cheek outline at
``|u| ~ 1.1`` and the chin near ``v ~ 1.45``. A mask is a region of that frame (:class:`MaskShape`): a top
edge that peaks over the nose bridge and drops towards the cheeks, sides on the cheeks bulging outwards,
and a jaw-shaped bottom edge under the chin. Nothing is ever drawn above ``v = UNDER_EYE_V`` (a line just
under the eyes). Ear loops and straps run from the mask corners towards the ears, inside
:meth:`MaskShape.footprint`.

Appearance. Each type paints a texture in mask coordinates (``s`` across the mask, wrapped like a
cylinder; ``t`` from the top edge to the bottom edge, so pleats and stripes follow the face's curve),
shaded by a cylindrical fall-off, a vertical and a horizontal gradient and the photo's own low-frequency
lighting, and composited with an antialiased, slightly feathered coverage:

* ``surgical``: light colours, three pleats, bound edges with stitching, a nose wire, ear loops;
* ``n95``: a rounded cup, a moulded rim, a central seam, an optional exhalation valve, head straps;
* ``cloth``: plain, stripes, dots, noise (heather or camouflage) or check fabric, an optional seam;
* ``overlay``: a photographed mask (insightface's ``mask_{black,blue,green,white}.jpg``, flat pictures of
  the fabric) warped onto the surgical region through the same mask coordinates.

Every random choice (type, colour, pattern, geometry jitter of a few percent and a small rotation) comes
from the ``numpy.random.Generator`` passed in: the same seed draws the same mask.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from core.registry import ConfigError
from face_alignment.align import ARCFACE_TEMPLATE

MASK_TYPES = ("surgical", "n95", "cloth", "overlay")
SYNTHETIC_TYPES = ("surgical", "n95", "cloth")  # need no pictures
UNDER_EYE_V = 0.15  # the line under the eyes, in face-frame units: no mask pixel lies above it
OVERLAY_SUFFIXES = (".jpg", ".jpeg", ".png")
OVERLAY_MARGIN = 0.025  # fraction cropped off each side of an overlay picture (its paper background)

RGB = tuple[float, float, float]
SURGICAL_COLORS: tuple[RGB, ...] = (
    (158, 196, 226), (120, 180, 220), (150, 205, 185), (95, 165, 150), (236, 238, 240),
    (238, 185, 200), (200, 190, 230), (205, 208, 212), (40, 42, 46),
)  # fmt: skip
N95_COLORS: tuple[RGB, ...] = (
    (242, 242, 238), (230, 226, 212), (200, 202, 204), (170, 185, 200), (48, 48, 52),
)  # fmt: skip
VALVE_COLORS: tuple[RGB, ...] = (
    (235, 235, 235), (150, 150, 155), (60, 60, 64), (70, 110, 170), (215, 120, 50),
)  # fmt: skip
CLOTH_COLORS: tuple[RGB, ...] = (
    (30, 30, 32), (35, 45, 85), (70, 95, 140), (70, 72, 78), (115, 30, 45), (175, 40, 45), (95, 100, 55),
    (180, 165, 125), (225, 140, 170), (100, 60, 130), (30, 120, 125), (205, 160, 50), (230, 230, 228),
)  # fmt: skip
CLOTH_PATTERNS = ("plain", "stripes", "dots", "noise", "check")


# ---------------------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class FaceFrame:
    """Face coordinates ``(u, v)`` <-> image coordinates ``(x, y)``: ``xy = origin + u d ex + v D ey``."""

    origin: np.ndarray
    ex: np.ndarray
    ey: np.ndarray
    eye_distance: float  # d: pixels per unit of u
    mouth_depth: float  # D: pixels per unit of v

    @classmethod
    def from_landmarks(cls, landmarks: np.ndarray, rotation: float = 0.0) -> FaceFrame:
        """The frame of five points (left eye, right eye, nose, left and right mouth corner), turned by
        ``rotation`` radians about the eye midpoint."""
        pts = np.asarray(landmarks, dtype=np.float64)
        if pts.shape != (5, 2) or not np.all(np.isfinite(pts)):
            raise ValueError(f"masks: need 5 finite landmarks (x, y), got an array of shape {pts.shape}")
        eyes = pts[1] - pts[0]
        d = float(np.hypot(*eyes))
        if d < 1e-6:
            raise ValueError("masks: the two eye landmarks coincide")
        angle = math.atan2(eyes[1], eyes[0]) + rotation
        ex = np.array([math.cos(angle), math.sin(angle)])
        ey = np.array([-ex[1], ex[0]])
        origin = (pts[0] + pts[1]) / 2
        depth = float((pts[3] + pts[4]) / 2 @ ey - origin @ ey)
        if abs(depth) < 0.2 * d:
            raise ValueError(
                f"masks: the mouth landmarks lie {abs(depth):.1f} px from the eye line ({d:.1f} px between "
                "the eyes); not a face's five points"
            )
        if depth < 0:  # mirrored point order: keep v pointing from the eyes to the mouth
            ey, depth = -ey, -depth
        return cls(origin, ex, ey, d, depth)

    def to_image(self, uv: np.ndarray) -> np.ndarray:
        uv = np.asarray(uv, dtype=np.float64)
        return (
            self.origin
            + (uv[..., :1] * self.eye_distance) * self.ex
            + (uv[..., 1:] * self.mouth_depth) * self.ey
        )

    def to_face(self, xy: np.ndarray) -> np.ndarray:
        rel = np.asarray(xy, dtype=np.float64) - self.origin
        return np.stack([rel @ self.ex / self.eye_distance, rel @ self.ey / self.mouth_depth], axis=-1)


def landmarks_for(height: int, width: int) -> np.ndarray:
    """The ArcFace template points of an aligned ``width`` x ``height`` crop."""
    return ARCFACE_TEMPLATE * np.array([width / 112.0, height / 112.0])


@dataclass(frozen=True)
class MaskShape:
    """A mask region in face-frame units (see the module docstring)."""

    top: float  # v of the top edge over the nose bridge
    rise: float  # how far the top edge drops from the nose bridge to the cheeks
    apex: float  # roundness of the top edge's peak (small: pointed)
    half_width: float  # |u| of the top corners
    bottom_half_width: float  # |u| of the lower corners
    corner: float  # v of the lower corners
    chin: float  # v of the lowest point, under the chin
    bottom_power: float  # exponent of the jaw curve (2: parabola; smaller: rounder, fuller)
    bulge: float  # outward bulge of the sides over the cheeks
    ear: tuple[float, float] | None = None  # (|u|, v) where loops or straps turn behind the ear

    def top_v(self, u: np.ndarray) -> np.ndarray:
        x = np.minimum(np.abs(u) / self.half_width, 1.0)
        k = self.apex
        return self.top + self.rise * (np.sqrt(x * x + k * k) - k) / (math.sqrt(1 + k * k) - k)

    def bottom_v(self, u: np.ndarray) -> np.ndarray:
        x = np.minimum(np.abs(u) / self.bottom_half_width, 1.0)
        return self.chin - (self.chin - self.corner) * x**self.bottom_power

    def _side(self, n: int) -> np.ndarray:
        """Right side from the top corner down to the lower corner (a quadratic Bezier)."""
        p0 = np.array([self.half_width, self.top + self.rise])
        p2 = np.array([self.bottom_half_width, self.corner])
        c = np.array([max(self.half_width, self.bottom_half_width) + self.bulge, (p0[1] + p2[1]) / 2])
        t = np.linspace(0, 1, n)[:, None]
        return (1 - t) ** 2 * p0 + 2 * t * (1 - t) * c + t**2 * p2

    def outline(self, n: int = 32) -> np.ndarray:
        """The mask's edge as a closed polygon in face units (top left->right, right side, bottom, left)."""
        u_top = np.linspace(-self.half_width, self.half_width, n)
        top = np.stack([u_top, self.top_v(u_top)], axis=1)
        right = self._side(n // 2)[1:-1]
        u_bot = np.linspace(self.bottom_half_width, -self.bottom_half_width, n)
        bottom = np.stack([u_bot, self.bottom_v(u_bot)], axis=1)
        left = right[::-1] * np.array([-1.0, 1.0])
        return np.concatenate([top, right, bottom, left])

    def loops(self) -> list[np.ndarray]:
        """Ear loops or straps: from each top corner to the ear and back to the lower corner, rounded. They
        start and end a little inside the mask, which hides their ends."""
        if self.ear is None:
            return []
        paths = []
        for side in (1.0, -1.0):
            corner_top = np.array([side * (self.half_width - 0.08), self.top + self.rise + 0.04])
            corner_low = np.array([side * (self.bottom_half_width - 0.08), self.corner - 0.04])
            ear = np.array([side * self.ear[0], self.ear[1]])
            paths.append(_chaikin(np.stack([corner_top, ear, corner_low]), rounds=3))
        return paths

    def footprint(self, n: int = 32) -> np.ndarray:
        """A polygon (face units) holding everything a mask of this shape draws: the body and its loops.
        Each loop lies in the triangle of its ends and the ear, so the convex hull of the ear and the
        side's (convex) curve, joined to the top and bottom edges, holds body and loop."""
        if self.ear is None:
            return self.outline(n)
        u_top = np.linspace(-self.half_width, self.half_width, n)
        top = np.stack([u_top, self.top_v(u_top)], axis=1)
        u_bot = np.linspace(self.bottom_half_width, -self.bottom_half_width, n)
        bottom = np.stack([u_bot, self.bottom_v(u_bot)], axis=1)
        side = self._side(n // 2)
        points = np.concatenate([side, [self.ear]])
        hull = cv2.convexHull(points.astype(np.float32), returnPoints=False)[:, 0].tolist()
        first, last, ear = hull.index(0), hull.index(len(side) - 1), hull.index(len(side))
        # walk the hull from the top corner to the lower corner the way that passes the ear
        step = 1 if (ear - first) % len(hull) < (last - first) % len(hull) else -1
        chain, k = [], first
        while True:
            chain.append(points[hull[k]])
            if k == last:
                break
            k = (k + step) % len(hull)
        right = np.array(chain[1:-1]).reshape(-1, 2)
        left = right[::-1] * np.array([-1.0, 1.0])
        return np.concatenate([top, right, bottom, left])


def _chaikin(points: np.ndarray, rounds: int) -> np.ndarray:
    """Corner cutting: a smooth curve inside the polygon's convex hull, through its end points."""
    for _ in range(rounds):
        q = 0.75 * points[:-1] + 0.25 * points[1:]
        r = 0.25 * points[:-1] + 0.75 * points[1:]
        inner = np.stack([q, r], axis=1).reshape(-1, 2)[1:-1]
        points = np.concatenate([points[:1], inner, points[-1:]])
    return points


# ------------------------------------------------------------------------------------------- styles


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


def _jitter_color(rng: np.random.Generator, palette: Sequence[RGB], spread: float = 8.0) -> RGB:
    base = np.asarray(palette[int(rng.integers(len(palette)))], dtype=np.float64)
    return tuple(np.clip(base + rng.uniform(-spread, spread, 3), 0, 255).tolist())  # type: ignore[return-value]


# Each type's shape (MaskShape's fields from top to bulge, face-frame units) and the half-range of the uniform
# jitter of each; the photographed overlays take the surgical shape.
SHAPES: dict[str, tuple[float, ...]] = {
    "surgical": (0.27, 0.12, 0.18, 1.12, 0.95, 1.04, 1.46, 2.2, 0.05),
    "n95": (0.265, 0.24, 0.08, 1.02, 0.72, 1.10, 1.50, 1.6, 0.10),
    "cloth": (0.28, 0.13, 0.25, 1.08, 0.88, 1.05, 1.50, 2.0, 0.06),
}
SHAPE_JITTER = np.array([0.02, 0.03, 0.0, 0.05, 0.05, 0.04, 0.04, 0.0, 0.0])


def _shape(kind: str, rng: np.random.Generator) -> MaskShape:
    j = rng.uniform(-1.0, 1.0, size=8)
    jitter = SHAPE_JITTER * np.array([j[0], j[1], 0, j[2], j[3], j[4], j[5], 0, 0])
    values = np.asarray(SHAPES["surgical" if kind == "overlay" else kind]) + jitter
    ear = (float(1.42 + 0.06 * j[6]), float(0.38 + 0.05 * j[7]))
    return MaskShape(*(float(x) for x in values), ear=ear)


def draw_style(
    rng: np.random.Generator,
    kind: str | None = None,
    types: Sequence[str] = SYNTHETIC_TYPES,
    overlay_names: Sequence[str] = (),
) -> MaskStyle:
    """A random mask of ``kind`` (or of a type drawn uniformly from ``types``); ``overlay`` needs the
    names of the available pictures (:func:`load_overlays`)."""
    if kind is None:
        check_types(types)
        kind = types[int(rng.integers(len(types)))]
    check_types([kind])
    shape = _shape(kind, rng)
    common: dict[str, Any] = dict(
        rotation=float(rng.uniform(-0.05, 0.05)),
        side_shade=float(rng.uniform(0.15, 0.35)),
        vertical_shade=float(rng.uniform(-0.15, 0.15)),
        horizontal_shade=float(rng.uniform(-0.12, 0.12)),
        lighting=float(rng.uniform(0.3, 0.7)),
        feather=float(rng.uniform(0.4, 0.8)),
        noise_seed=int(rng.integers(2**31)),
    )
    white_loops = ((240, 240, 240), (225, 225, 230))
    if kind == "surgical":
        params = {
            "pleat0": rng.uniform(0.27, 0.34),
            "pleat_gap": rng.uniform(0.16, 0.21),
            "pleat_depth": rng.uniform(0.12, 0.25),
        }
        color = _jitter_color(rng, SURGICAL_COLORS)
        loops = {"loop_color": _jitter_color(rng, white_loops), "loop_width": rng.uniform(0.025, 0.04)}
        return MaskStyle(kind, shape, color, params=params, grain=rng.uniform(1.5, 4), **loops, **common)
    if kind == "n95":
        params = {
            "valve": float(rng.random() < 0.5),
            "valve_u": float(rng.choice([-1.0, 1.0])) * rng.uniform(0.35, 0.5),
            "valve_t": rng.uniform(0.5, 0.65),
            "valve_r": rng.uniform(0.17, 0.22),
        }
        color, valve = _jitter_color(rng, N95_COLORS, 5), _jitter_color(rng, VALVE_COLORS)
        strap = ((240, 240, 240), (70, 110, 170), (230, 200, 80), (160, 160, 160))
        straps = {"loop_color": _jitter_color(rng, strap), "loop_width": rng.uniform(0.04, 0.06)}
        return MaskStyle(
            kind, shape, color, color2=valve, params=params, grain=rng.uniform(2, 4), **straps, **common
        )
    if kind == "cloth":
        pattern = CLOTH_PATTERNS[int(rng.integers(len(CLOTH_PATTERNS)))]
        params = {
            "angle": float(
                rng.choice([0.0, math.pi / 2, math.pi / 4, -math.pi / 4, rng.uniform(0, math.pi)])
            ),
            "period": rng.uniform(4.0, 9.0),
            "duty": rng.uniform(0.3, 0.6),
            "phase": rng.uniform(0, 1),
            "dot_radius": rng.uniform(0.22, 0.35),
            "camouflage": float(rng.random() < 0.5),
            "seam": float(rng.random() < 0.5),
        }
        color = _jitter_color(rng, CLOTH_COLORS, 10)
        color2 = _jitter_color(rng, CLOTH_COLORS, 10)
        if np.abs(np.subtract(color, color2)).sum() < 90:  # a pattern must show: take the complement
            color2 = (255.0 - color[0], 255.0 - color[1], 255.0 - color[2])
        loop = color if rng.random() < 0.6 else _jitter_color(rng, ((30, 30, 32), (235, 235, 235)))
        loops = {"loop_color": loop, "loop_width": rng.uniform(0.03, 0.05)}
        return MaskStyle(
            kind, shape, color, color2=color2, pattern=pattern, params=params, grain=rng.uniform(3, 6),
            **loops, **common,
        )  # fmt: skip
    names = sorted(overlay_names)
    if not names:
        raise ValueError(
            "masks: the 'overlay' type needs mask pictures (give their folder: --overlays DIR, "
            "data.augment.mask_overlays)"
        )
    name = names[int(rng.integers(len(names)))]
    common["side_shade"] *= 0.6  # the photographs carry their own shading
    loops = {"loop_color": _jitter_color(rng, white_loops), "loop_width": rng.uniform(0.025, 0.04)}
    return MaskStyle(kind, shape, (0.0, 0.0, 0.0), pattern=name, grain=1.0, **loops, **common)


def check_types(types: Sequence[str], where: str = "mask types") -> None:
    if not types:
        raise ValueError(f"{where}: empty; choose from {', '.join(MASK_TYPES)}")
    unknown = [t for t in types if t not in MASK_TYPES]
    if unknown:
        raise ValueError(f"{where}: unknown mask type {unknown[0]!r}; choose from {', '.join(MASK_TYPES)}")


def check_augment(probability: float, types: Sequence[str], overlay_dir: str) -> None:
    """Refuse mask options of ``data.augment`` that could only fail later, inside a loader worker."""
    if not 0.0 <= probability <= 1.0:
        raise ConfigError(f"data.augment.mask must be a probability in [0, 1], got {probability}")
    try:
        check_types(types, "data.augment.mask_types")
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if "overlay" in types:
        if not overlay_dir:
            raise ConfigError("data.augment.mask_types has 'overlay': set data.augment.mask_overlays to the "
                              "folder of mask_<colour>.jpg pictures")  # fmt: skip
        try:
            cached_overlays(overlay_dir)
        except (OSError, ValueError) as err:
            raise ConfigError(f"data.augment.mask_overlays: {err}") from None


# ----------------------------------------------------------------------------------------- overlays


def load_overlays(folder: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """The mask pictures ``mask_<name>.{jpg,png}`` of ``folder`` as RGB uint8 arrays, margins cropped."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder of mask pictures (mask_<name>.jpg)")
    overlays = {}
    for path in sorted(folder.iterdir()):
        if not (path.stem.startswith("mask_") and path.suffix.lower() in OVERLAY_SUFFIXES):
            continue
        bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if bgr is None or min(bgr.shape[:2]) < 16:
            raise ValueError(f"{path}: not a readable mask picture")
        h, w = bgr.shape[:2]
        my, mx = round(h * OVERLAY_MARGIN), round(w * OVERLAY_MARGIN)
        overlays[path.stem[len("mask_") :]] = cv2.cvtColor(bgr[my : h - my, mx : w - mx], cv2.COLOR_BGR2RGB)
    if not overlays:
        raise ValueError(f"{folder}: holds no mask pictures (mask_<name>.jpg or .png)")
    return overlays


@functools.lru_cache(maxsize=4)
def cached_overlays(folder: str) -> Mapping[str, np.ndarray]:
    """:func:`load_overlays`, read once per process (each DataLoader worker reads the small folder once)."""
    return load_overlays(folder)


# ---------------------------------------------------------------------------------------- rendering


@dataclass
class _Canvas:
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


def _box(poly: np.ndarray, height: int, width: int) -> tuple[int, int, int, int] | None:
    x0, y0 = np.floor(poly.min(0)).astype(int) - 3
    x1, y1 = np.ceil(poly.max(0)).astype(int) + 4
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)
    return (x0, y0, x1, y1) if x1 > x0 and y1 > y0 else None


def _coverage(poly: np.ndarray, shape: tuple[int, int], feather: float, factor: int = 4) -> np.ndarray:
    """The fraction of each pixel inside an image-space polygon (filled on a ``factor`` times finer grid,
    then averaged; OpenCV's own antialiased fill bleeds half a pixel outwards), softened by ``feather``."""
    fine = np.zeros((shape[0] * factor, shape[1] * factor), dtype=np.uint8)
    points = ((poly + 0.5) * factor - 0.5) * 16  # pixel centres of the fine grid, 4 fractional bits
    cv2.fillPoly(fine, [np.round(points).astype(np.int32)], 255, lineType=cv2.LINE_8, shift=4)
    alpha = cv2.resize(fine, (shape[1], shape[0]), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0
    return cv2.GaussianBlur(alpha, (3, 3), feather) if feather > 0 else alpha


def _smooth_box(distance_px: np.ndarray) -> np.ndarray:
    """Antialiased step: 1 inside (positive distance to an edge in pixels), 0 outside."""
    return np.clip(distance_px + 0.5, 0.0, 1.0)


def _surgical(c: _Canvas, style: MaskStyle) -> tuple[np.ndarray, np.ndarray]:
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


def _n95(c: _Canvas, style: MaskStyle, shape: MaskShape) -> tuple[np.ndarray, np.ndarray]:
    p = style.params
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
        shadow = _smooth_box(radius * 1.15 - dist) * (1 - _smooth_box(radius - dist))
        light -= 0.15 * shadow
        cover = _smooth_box(radius - dist)
        ring = (dist > 0.78 * radius) & (dist < radius)
        slats = (dist < 0.65 * radius) & (
            np.sin((c.v - vc) * c.depth * 2 * math.pi / max(radius * 0.35, 1.2)) > 0.3
        )
        valve_light = -0.2 * ring - 0.22 * slats + 0.12 * (1 - dist / max(radius, 1e-6)).clip(0, 1)
        color = color * (1 - cover[..., None]) + np.asarray(style.color2, np.float32) * cover[..., None]
        light = light * (1 - cover) + valve_light * cover
    return color, light


def _stripes(
    x: np.ndarray, y: np.ndarray, angle: float, period: float, duty: float, phase: float
) -> np.ndarray:
    along = (x * math.cos(angle) + y * math.sin(angle)) / period + phase
    frac = along - np.floor(along)
    return _smooth_box((duty / 2 - np.abs(frac - 0.5)) * period)


def _cloth(c: _Canvas, style: MaskStyle) -> tuple[np.ndarray, np.ndarray]:
    p = style.params
    x, y = c.x, c.y
    if style.pattern == "stripes":
        weight = _stripes(x, y, p["angle"], p["period"], p["duty"], p["phase"])
    elif style.pattern == "check":
        a = _stripes(x, y, 0.0, p["period"] * 1.5, p["duty"], p["phase"])
        b = _stripes(x, y, math.pi / 2, p["period"] * 1.5, p["duty"], p["phase"])
        weight = 0.5 * (a + b)
    elif style.pattern == "dots":
        spacing = p["period"] + 1.0
        row = np.floor(y / spacing)
        xs = x + (row % 2) * spacing / 2
        dx = np.mod(xs, spacing) - spacing / 2
        dy = np.mod(y, spacing) - spacing / 2
        weight = _smooth_box(p["dot_radius"] * spacing - np.hypot(dx, dy))
    elif style.pattern == "noise":
        coarse = c.rng.random((5, 7)).astype(np.float32)
        field_ = cv2.resize(coarse, (64, 48), interpolation=cv2.INTER_CUBIC)
        mx = (c.s * 63).astype(np.float32)
        my = (c.t * 47).astype(np.float32)
        sampled = cv2.remap(field_, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        sampled = (sampled - sampled.min()) / max(float(np.ptp(sampled)), 1e-6)
        weight = np.clip((sampled - 0.5) * 6 + 0.5, 0, 1) if p["camouflage"] else sampled
    else:
        weight = np.zeros_like(x)
    c1, c2 = np.asarray(style.color, np.float32), np.asarray(style.color2, np.float32)
    color = c1 * (1 - weight[..., None]) + c2 * weight[..., None]
    light = np.zeros_like(x)
    if p["seam"]:
        light -= 0.25 * np.exp(-(((c.u * c.d) / 0.8) ** 2))
    light -= 0.06 * (c.inside < 1.8)  # hem
    return color, light


def _overlay(c: _Canvas, style: MaskStyle, picture: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    tw = max(int(c.width_px * 2), 8)
    th = max(int(c.height_px * 2), 8)
    tex = cv2.resize(picture, (tw, th), interpolation=cv2.INTER_AREA).astype(np.float32)
    mx = (c.s * (tw - 1)).astype(np.float32)
    my = (c.t * (th - 1)).astype(np.float32)
    color = cv2.remap(tex, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    return color, np.zeros_like(c.s)


def mask_frame(style: MaskStyle, landmarks: np.ndarray) -> FaceFrame:
    return FaceFrame.from_landmarks(landmarks, style.rotation)


def mask_polygons(style: MaskStyle, landmarks: np.ndarray) -> dict[str, np.ndarray]:
    """Image-space polygons of a mask: ``body`` (the mask itself) and ``footprint`` (body and loops)."""
    frame = mask_frame(style, landmarks)
    return {
        "body": frame.to_image(style.shape.outline()),
        "footprint": frame.to_image(style.shape.footprint()),
    }


def render_mask(
    img: np.ndarray,
    style: MaskStyle,
    landmarks: np.ndarray | None = None,
    overlays: Mapping[str, np.ndarray] | None = None,
) -> np.ndarray:
    """``img`` (H x W x 3 uint8 RGB, an aligned face) wearing the mask ``style``; pixels outside the
    mask's footprint are returned unchanged. ``landmarks``: the face's five points in pixels (default:
    the ArcFace template of the crop)."""
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"masks: need an H x W x 3 uint8 RGB image, got {img.dtype} {img.shape}")
    height, width = img.shape[:2]
    points = landmarks_for(height, width) if landmarks is None else landmarks
    frame = mask_frame(style, points)
    shape = style.shape
    body = frame.to_image(shape.outline())
    loops = [frame.to_image(path) for path in shape.loops()]
    box = _box(np.concatenate([body, *loops]), height, width)
    out = img.copy()
    if box is None:  # the mask lies outside the picture
        return out
    x0, y0, x1, y1 = box
    offset = np.array([x0, y0], dtype=np.float64)
    region = out[y0:y1, x0:x1].astype(np.float32)

    # loops first: the mask's body covers their ends
    if loops:
        layer = np.zeros(region.shape[:2], dtype=np.uint8)
        thickness = max(1, round(style.loop_width * frame.eye_distance))
        for path in loops:
            pts = np.round((path - offset) * 16).astype(np.int32)
            cv2.polylines(layer, [pts], False, 255, thickness, lineType=cv2.LINE_AA, shift=4)
        a = (layer.astype(np.float32) / 255.0)[..., None]
        region = region * (1 - a) + np.asarray(style.loop_color, np.float32) * 0.9 * a

    alpha = _coverage(body - offset, region.shape[:2], style.feather)
    ys, xs = np.mgrid[y0:y1, x0:x1]
    uv = frame.to_face(np.stack([xs, ys], axis=-1)).astype(np.float32)  # float32: half the work
    u, v = uv[..., 0], uv[..., 1]
    reach = max(shape.half_width, shape.bottom_half_width) + shape.bulge / 2
    s = 0.5 + np.arcsin(np.clip(u / reach, -1, 1)) / math.pi
    top, bottom = shape.top_v(u), shape.bottom_v(u)
    t = np.clip((v - top) / np.maximum(bottom - top, 1e-6), 0, 1)
    inside = cv2.distanceTransform((alpha > 0.5).astype(np.uint8), cv2.DIST_L2, 3)
    rng = np.random.default_rng(style.noise_seed)
    canvas = _Canvas(u, v, s, t, inside, width_px=2 * reach * frame.eye_distance * math.pi / 2,
                     height_px=(shape.chin - shape.top) * frame.mouth_depth, d=frame.eye_distance,
                     depth=frame.mouth_depth, rng=rng)  # fmt: skip
    if style.kind == "surgical":
        color, light = _surgical(canvas, style)
    elif style.kind == "n95":
        color, light = _n95(canvas, style, shape)
    elif style.kind == "cloth":
        color, light = _cloth(canvas, style)
    else:
        if not overlays or style.pattern not in overlays:
            have = ", ".join(sorted(overlays)) if overlays else "none"
            raise ValueError(f"masks: overlay picture {style.pattern!r} not loaded (loaded: {have})")
        color, light = _overlay(canvas, style, overlays[style.pattern])

    shade = 1.0 + light
    shade *= 1.0 - style.side_shade * np.clip(u / reach, -1, 1) ** 2
    shade *= 1.0 + style.vertical_shade * (2 * t - 1)
    shade *= 1.0 + style.horizontal_shade * np.clip(u / reach, -1, 1)
    # the photo's own light: its blurred luminance relative to the mean under the mask
    lum = cv2.GaussianBlur(cv2.cvtColor(img[y0:y1, x0:x1], cv2.COLOR_RGB2GRAY).astype(np.float32), (0, 0),
                           max(0.3 * frame.eye_distance, 1.0))  # fmt: skip
    weight = alpha.sum()
    if weight > 0:
        ref = float((lum * alpha).sum() / weight)
        shade *= np.clip(lum / max(ref, 1.0), 0.6, 1.4) ** style.lighting
    grain = rng.normal(0.0, style.grain, size=alpha.shape).astype(np.float32)
    paint = np.clip(color * shade[..., None] + grain[..., None], 0, 255)
    region = region * (1 - alpha[..., None]) + paint * alpha[..., None]
    changed = alpha > 0
    if loops:
        changed |= layer > 0
    patch = out[y0:y1, x0:x1]
    patch[changed] = np.clip(np.rint(region[changed]), 0, 255).astype(np.uint8)
    return out


def add_mask(
    img: np.ndarray,
    rng: np.random.Generator,
    types: Sequence[str] = SYNTHETIC_TYPES,
    landmarks: np.ndarray | None = None,
    overlays: Mapping[str, np.ndarray] | None = None,
    kind: str | None = None,
) -> np.ndarray:
    """``img`` wearing a random mask of one of ``types`` (or of ``kind``), drawn from ``rng``."""
    style = draw_style(rng, kind, types, tuple(overlays) if overlays else ())
    return render_mask(img, style, landmarks, overlays)
