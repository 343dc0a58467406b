"""The table of mask kinds: each name maps to how a style of that kind is drawn and painted.

A kind is a module with a mean ``SHAPE`` (:class:`~data.masks.geometry.MaskShape`'s fields), a ``draw``
(the kind's own random choices, made after the shared ones of :mod:`data.masks.style`) and a ``paint``
(colour and light of every pixel of the :class:`~data.masks.canvas.Canvas`). A new kind is one more
module and one more row here; ``data.augment.mask_types`` and ``--types`` accept every name of the table.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from core.registry import ConfigError
from data.masks import cloth, n95, overlay, surgical
from data.masks.canvas import Canvas
from data.masks.geometry import MaskShape
from data.masks.style import MaskStyle

Draw = Callable[[np.random.Generator, str, MaskShape, dict[str, Any], Sequence[str]], MaskStyle]
Paint = Callable[[Canvas, MaskStyle, Mapping[str, np.ndarray] | None], tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class MaskKind:
    """One row of :data:`KINDS`."""

    shape: tuple[float, ...]  # mean MaskShape fields, top to bulge (face-frame units)
    draw: Draw  # (rng, name, jittered shape, shared fields, overlay picture names) -> style
    paint: Paint  # (canvas, style, overlay pictures) -> (colour H x W x 3, light H x W)
    needs_pictures: bool = False  # drawn only when mask pictures are given (--overlays, mask_overlays)


KINDS: dict[str, MaskKind] = {
    "surgical": MaskKind(surgical.SHAPE, surgical.draw, surgical.paint),
    "n95": MaskKind(n95.SHAPE, n95.draw, n95.paint),
    "cloth": MaskKind(cloth.SHAPE, cloth.draw, cloth.paint),
    "overlay": MaskKind(overlay.SHAPE, overlay.draw, overlay.paint, needs_pictures=True),
}
MASK_TYPES = tuple(KINDS)
SYNTHETIC_TYPES = tuple(name for name, kind in KINDS.items() if not kind.needs_pictures)  # need no pictures


def check_types(types: Sequence[str], where: str = "mask types") -> None:
    """Refuse an empty list or a name that is not in :data:`KINDS`; ``where`` names the option."""
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
    pictured = [name for name in types if KINDS[name].needs_pictures]
    if pictured:
        if not overlay_dir:
            raise ConfigError(
                f"data.augment.mask_types has {pictured[0]!r}: set data.augment.mask_overlays to the folder "
                "of mask_<colour>.jpg pictures"
            )
        try:
            overlay.cached_overlays(overlay_dir)
        except (OSError, ValueError) as err:
            raise ConfigError(f"data.augment.mask_overlays: {err}") from None
