"""Face detection and 5-point similarity alignment to the 112x112 ArcFace template.

from face_alignment import YuNetDetector, align_face, largest_face
faces = YuNetDetector().detect(rgb)            # boxes, scores, 5 landmarks
crop = align_face(rgb, largest_face(faces).landmarks)
"""

from __future__ import annotations

from face_alignment.align import ARCFACE_TEMPLATE, align_face, similarity_transform, template_for
from face_alignment.detector import Face, ModelNotFoundError, YuNetDetector, find_model


def largest_face(faces: list[Face]) -> Face | None:
    """The face with the largest box (the subject of a portrait), or None."""
    return max(faces, key=lambda f: f.area) if faces else None


__all__ = [
    "ARCFACE_TEMPLATE", "Face", "ModelNotFoundError", "YuNetDetector", "align_face", "find_model",
    "largest_face", "similarity_transform", "template_for",
]  # fmt: skip
