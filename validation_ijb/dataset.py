"""The IJB face images as a dataset of aligned crops for ``core.extract.extract_dataset``."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch

from data.decode import decode_rgb
from face_alignment import align_face


class AlignedFaces(torch.utils.data.Dataset):
    """Item ``i``: the photo ``paths[i]`` aligned by its five ``landmarks[i]`` (pixels of the photo, in
    the ArcFace template's order) to the ``size`` x ``size`` ArcFace template, as uint8 RGB (3, size, size).

    The photo is decoded by :func:`data.decode.decode_rgb` (a missing, corrupt or truncated file is an
    error naming it; grey photos get three equal channels) and warped by :func:`face_alignment.align_face`
    (least-squares similarity, bilinear, black outside the photo), as insightface's IJB evaluation does.
    Decoding and alignment run in the loader's worker processes.

    Constructing the dataset switches OpenCV's own thread pool off in this process
    (``cv2.setNumThreads(0)``): the loader parallelises over processes, and a worker forked while a pool
    thread of the parent holds the pool's lock inherits the lock held and hangs at its first warp (seen
    here as a worker blocked on a mutex inside cv2 after the parent had aligned faces itself).
    """

    def __init__(
        self,
        paths: Sequence[str | os.PathLike[str]],
        landmarks: np.ndarray,
        size: int = 112,
        border: int = cv2.BORDER_CONSTANT,
    ) -> None:
        self.paths = [Path(p) for p in paths]
        self.landmarks = np.asarray(landmarks, np.float64).reshape(len(self.paths), 5, 2)
        self.size, self.border = size, border
        cv2.setNumThreads(0)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> np.ndarray:
        path = self.paths[i]
        try:
            data = path.read_bytes()
        except OSError as err:
            raise OSError(f"{path}: cannot read image: {err.strerror or err}") from None
        crop = align_face(decode_rgb(data, str(path)), self.landmarks[i], self.size, self.border)
        return np.ascontiguousarray(crop.transpose(2, 0, 1))
