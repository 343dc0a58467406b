"""The ``overlay`` mask: a photographed mask (insightface's ``mask_{black,blue,green,white}.jpg``, flat
pictures of the fabric) warped onto the surgical region through the mask coordinates, and the loading of
those pictures."""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from data.image_folder import IMAGE_SUFFIXES
from data.masks import surgical
from data.masks.canvas import Canvas
from data.masks.geometry import MaskShape
from data.masks.style import WHITE_LOOPS, MaskStyle, jitter_color

SHAPE = surgical.SHAPE
OVERLAY_SUFFIXES = IMAGE_SUFFIXES  # the pictures are read like any image of the framework
OVERLAY_MARGIN = 0.025  # fraction cropped off each side of an overlay picture (its paper background)


def draw(
    rng: np.random.Generator,
    kind: str,
    shape: MaskShape,
    common: dict[str, Any],
    overlay_names: Sequence[str],
) -> MaskStyle:
    names = sorted(overlay_names)
    if not names:
        raise ValueError(
            "masks: the 'overlay' type needs mask pictures (give their folder: --overlays DIR, "
            "data.augment.mask_overlays)"
        )
    name = names[int(rng.integers(len(names)))]
    common["side_shade"] *= 0.6  # the photographs carry their own shading
    loops = {"loop_color": jitter_color(rng, WHITE_LOOPS), "loop_width": rng.uniform(0.025, 0.04)}
    return MaskStyle(kind, shape, (0.0, 0.0, 0.0), pattern=name, grain=1.0, **loops, **common)


def paint(
    c: Canvas, style: MaskStyle, overlays: Mapping[str, np.ndarray] | None
) -> tuple[np.ndarray, np.ndarray]:
    if not overlays or style.pattern not in overlays:
        have = ", ".join(sorted(overlays)) if overlays else "none"
        raise ValueError(f"masks: overlay picture {style.pattern!r} not loaded (loaded: {have})")
    picture = overlays[style.pattern]
    tw = max(int(c.width_px * 2), 8)
    th = max(int(c.height_px * 2), 8)
    tex = cv2.resize(picture, (tw, th), interpolation=cv2.INTER_AREA).astype(np.float32)
    mx = (c.s * (tw - 1)).astype(np.float32)
    my = (c.t * (th - 1)).astype(np.float32)
    color = cv2.remap(tex, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    return color, np.zeros_like(c.s)


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
