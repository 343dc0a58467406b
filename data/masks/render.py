"""Drawing a random mask style (:func:`draw_style`) and painting it on a face (:func:`render_mask`).

A style is drawn in a fixed order from the generator: the type (when not given), the shape, the fields
every kind shares (:func:`data.masks.style.draw_common`), then the kind's own choices
(:data:`data.masks.kinds.KINDS`). Painting composites the kind's colour and light, shaded by a cylindrical
fall-off, a vertical and a horizontal gradient and the photo's own low-frequency lighting, with an
antialiased, slightly feathered coverage; loops or straps are drawn first, under the mask's body.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import cv2
import numpy as np

from data.masks.canvas import Canvas
from data.masks.geometry import FaceFrame, landmarks_for
from data.masks.kinds import KINDS, SYNTHETIC_TYPES, check_types
from data.masks.style import MaskStyle, draw_common, draw_shape


def draw_style(
    rng: np.random.Generator,
    kind: str | None = None,
    types: Sequence[str] = SYNTHETIC_TYPES,
    overlay_names: Sequence[str] = (),
) -> MaskStyle:
    """A random mask of ``kind`` (or of a type drawn uniformly from ``types``); ``overlay`` needs the
    names of the available pictures (:func:`~data.masks.overlay.load_overlays`)."""
    if kind is None:
        check_types(types)
        kind = types[int(rng.integers(len(types)))]
    check_types([kind])
    row = KINDS[kind]
    shape = draw_shape(row.shape, rng)
    return row.draw(rng, kind, shape, draw_common(rng), overlay_names)


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
    check_types([style.kind], "masks: the style's kind")
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
    canvas = Canvas(u, v, s, t, inside, width_px=2 * reach * frame.eye_distance * math.pi / 2,
                     height_px=(shape.chin - shape.top) * frame.mouth_depth, d=frame.eye_distance,
                     depth=frame.mouth_depth, rng=rng)  # fmt: skip
    color, light = KINDS[style.kind].paint(canvas, style, overlays)

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
