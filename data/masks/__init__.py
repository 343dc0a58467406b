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

Where each part lives: :mod:`~data.masks.geometry` (face frame, mask shape), :mod:`~data.masks.style`
(:class:`MaskStyle` and the draws every kind shares), :mod:`~data.masks.canvas` (the painters' pixel
coordinates), one module per kind (:mod:`~data.masks.surgical`, :mod:`~data.masks.n95`,
:mod:`~data.masks.cloth`, :mod:`~data.masks.overlay`, which also loads the pictures), the table of kinds
:data:`~data.masks.kinds.KINDS` (a new kind is a module and a row there) and :mod:`~data.masks.render`
(:func:`draw_style`, :func:`render_mask`, :func:`add_mask`).
"""

from data.masks.canvas import Canvas
from data.masks.geometry import UNDER_EYE_V, FaceFrame, MaskShape, landmarks_for
from data.masks.kinds import KINDS, MASK_TYPES, SYNTHETIC_TYPES, MaskKind, check_augment, check_types
from data.masks.overlay import OVERLAY_MARGIN, OVERLAY_SUFFIXES, cached_overlays, load_overlays
from data.masks.render import add_mask, draw_style, mask_frame, mask_polygons, render_mask
from data.masks.style import RGB, MaskStyle

__all__ = [
    "KINDS",
    "MASK_TYPES",
    "OVERLAY_MARGIN",
    "OVERLAY_SUFFIXES",
    "RGB",
    "SYNTHETIC_TYPES",
    "UNDER_EYE_V",
    "Canvas",
    "FaceFrame",
    "MaskKind",
    "MaskShape",
    "MaskStyle",
    "add_mask",
    "cached_overlays",
    "check_augment",
    "check_types",
    "draw_style",
    "landmarks_for",
    "load_overlays",
    "mask_frame",
    "mask_polygons",
    "render_mask",
]
