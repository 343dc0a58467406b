"""Face detection with the YuNet ONNX model (OpenCV model zoo): boxes, scores and five landmarks, on CPU.

The model file is not part of the project. :func:`find_model` looks in ``$FACEREC_MODELS``, then in the
``models/onnx`` folder of the real data (``$FACEREC_DATA`` or ``../shared/data``); get it from
https://github.com/opencv/opencv_zoo (models/face_detection_yunet) and pass its path, or put it there.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from core.paths import shared_data_dir

MODELS_ENV = "FACEREC_MODELS"
YUNET_FILE = "face_detection_yunet_2026may.onnx"
YUNET_URL = "https://github.com/opencv/opencv_zoo/tree/main/models/face_detection_yunet"


class ModelNotFoundError(FileNotFoundError):
    """A model file is missing; the message says where it was looked for and where to get it."""


def find_model(name: str, url: str) -> Path:
    """``$FACEREC_MODELS/name`` (or any file of that name below it), else ``<data>/models/onnx/name``."""
    places = []
    env = os.environ.get(MODELS_ENV)
    if env:
        places += [Path(env) / name, Path(env) / "onnx" / name]
    places.append(shared_data_dir() / "models" / "onnx" / name)
    for place in places:
        if place.is_file():
            return place
    looked = ", ".join(str(p) for p in places)
    raise ModelNotFoundError(
        f"model {name} not found (looked in {looked}); download it from {url} and set ${MODELS_ENV} to its "
        "folder or pass its path"
    )


@dataclass
class Face:
    """One detection in image pixels: box (x0, y0, x1, y1), score, landmarks (5 x 2, image-left eye first)."""

    box: np.ndarray
    score: float
    landmarks: np.ndarray

    @property
    def area(self) -> float:
        return float((self.box[2] - self.box[0]) * (self.box[3] - self.box[1]))


class YuNetDetector:
    """YuNet through ``cv2.FaceDetectorYN``.

    Args:
        model: path of the ONNX file (default: :func:`find_model`).
        score_threshold: minimum face score.
        nms_threshold: IoU above which overlapping boxes are merged.
        min_face: smallest face side in pixels that is reported.
        min_side: photos whose shorter side is below this are upscaled before detection. YuNet's
            landmarks on small, tightly cropped photos are off by several pixels (on the 150x150 LFW
            crops the aligned faces come out visibly smaller and lower); at 300 pixels they agree with
            the reference alignment of those photos within JPEG noise.
    """

    def __init__(
        self,
        model: str | os.PathLike[str] | None = None,
        score_threshold: float = 0.6,
        nms_threshold: float = 0.3,
        min_face: int = 20,
        min_side: int = 300,
    ) -> None:
        path = Path(model) if model is not None else find_model(YUNET_FILE, YUNET_URL)
        if not path.is_file():
            raise ModelNotFoundError(f"{path}: detector model not found; download it from {YUNET_URL}")
        self.path, self.min_face, self.min_side = path, min_face, min_side
        # errors only: OpenCV's DNN warns about backend targets on every load
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
        self._net = cv2.FaceDetectorYN.create(str(path), "", (320, 320), score_threshold, nms_threshold, 5000)

    def detect(self, image_rgb: np.ndarray) -> list[Face]:
        """Faces in an H x W x 3 uint8 RGB image, highest score first."""
        if image_rgb.ndim != 3 or image_rgb.shape[2] != 3 or image_rgb.dtype != np.uint8:
            raise ValueError(
                f"detect expects an H x W x 3 uint8 image, got {image_rgb.dtype} {image_rgb.shape}"
            )
        height, width = image_rgb.shape[:2]
        scale = max(1.0, self.min_side / min(height, width))
        bgr = np.ascontiguousarray(image_rgb[:, :, ::-1])  # the model reads BGR
        if scale > 1.0:
            bgr = cv2.resize(
                bgr, (round(width * scale), round(height * scale)), interpolation=cv2.INTER_LINEAR
            )
        self._net.setInputSize((bgr.shape[1], bgr.shape[0]))
        _, rows = self._net.detect(bgr)
        faces = []
        for row in rows if rows is not None else []:
            x, y, w, h = row[:4] / scale  # back to the photo's pixels
            if min(w, h) < self.min_face:
                continue
            box = np.array([x, y, x + w, y + h], dtype=np.float32)
            landmarks = (row[4:14] / scale).reshape(5, 2).astype(np.float32)
            faces.append(Face(box=box, score=float(row[14]), landmarks=landmarks))
        return sorted(faces, key=lambda f: -f.score)
