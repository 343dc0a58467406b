"""The face frame of five landmarks and the mask region in it (see :mod:`data.masks`).

The five points (eyes, nose tip, mouth corners) define a frame: origin at the eye midpoint, ``u`` along the
eye line in units of the eye distance, ``v`` across it, towards the mouth, in units of the eye-to-mouth
distance. A mask is a region of that frame (:class:`MaskShape`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from face_alignment.align import ARCFACE_TEMPLATE

UNDER_EYE_V = 0.15  # the line under the eyes, in face-frame units: no mask pixel lies above it


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
