"""The IJB face images as a dataset of aligned crops for ``evaluation.extract.extract_dataset``."""

from __future__ import annotations

import os
from collections.abc import Sequence

import cv2
import numpy as np

from evaluation.extract import ImageFiles
from face_alignment import align_face


class AlignedFaces(ImageFiles):
    """Item ``i``: the photo ``paths[i]`` aligned by its five ``landmarks[i]`` (pixels of the photo, in
    the ArcFace template's order) to the ``size`` x ``size`` ArcFace template, as uint8 RGB (3, size, size).

    The photo is read as :class:`evaluation.extract.ImageFiles` reads it (a missing, corrupt or truncated
    file is an error naming it; grey photos get three equal channels) and warped by
    :func:`face_alignment.align_face` (least-squares similarity, bilinear, black outside the photo), as
    insightface's IJB evaluation does. Decoding and alignment run in the loader's worker processes.
    """

    def __init__(
        self,
        paths: Sequence[str | os.PathLike[str]],
        landmarks: np.ndarray,
        size: int = 112,
        border: int = cv2.BORDER_CONSTANT,
    ) -> None:
        super().__init__(paths, size)
        self.landmarks = np.asarray(landmarks, np.float64).reshape(len(self.paths), 5, 2)
        self.border = border

    def __getitem__(self, i: int) -> np.ndarray:
        crop = align_face(self.read(i), self.landmarks[i], self.size, self.border)
        return np.ascontiguousarray(crop.transpose(2, 0, 1))
