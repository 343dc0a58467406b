"""Face detection with the YuNet ONNX model (OpenCV model zoo): boxes, scores and five landmarks, on CPU.

The model file is not part of the project. :func:`find_model` looks in ``$FACEREC_MODELS``, then in the
``models/onnx`` folder of the real data (``$FACEREC_DATA`` or ``../shared/data``); get it from
https://github.com/opencv/opencv_zoo (models/face_detection_yunet) and pass its path, or put it there.
"""

from __future__ import annotations

import os
import re
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

    @property
    def width(self) -> float:
        return float(self.box[2] - self.box[0])

    def overlap(self, other: Face) -> float:
        """Intersection over union of the two boxes."""
        x0, y0 = np.maximum(self.box[:2], other.box[:2])
        x1, y1 = np.minimum(self.box[2:], other.box[2:])
        inter = max(0.0, float(x1 - x0)) * max(0.0, float(y1 - y0))
        return inter / (self.area + other.area - inter) if inter > 0 else 0.0


class YuNetDetector:
    """YuNet through ``cv2.FaceDetectorYN``, on a copy of the photo resized to a size YuNet handles; boxes and
    landmarks come back in the photo's own pixels, so alignment warps from the full-resolution photo.

    Args:
        model: path of the ONNX file (default: :func:`find_model`).
        score_threshold: minimum face score.
        nms_threshold: IoU above which overlapping boxes are merged.
        min_face: smallest face side in pixels (of the photo) that is reported.
        min_side: photos whose shorter side is below this are upscaled before detection. YuNet's
            landmarks on small, tightly cropped photos are off by several pixels (on the 150x150 LFW
            crops the aligned faces come out visibly smaller and lower); at 300 pixels they agree with
            the reference alignment of those photos within JPEG noise.
        max_side: photos whose longer side is above this are downscaled before detection. YuNet misses
            faces much larger than those it was trained on (a portrait face of 1500 pixels is not found)
            and its cost grows with the pixel count (an 8000 x 8000 photo took 5.7 GB and 20 s).
        max_face, face_size: a face wider than ``max_face`` pixels in the detector's input is detected
            again on a copy scaled so that it is ``face_size`` wide: YuNet's boxes stop growing with the
            face (a 520-pixel face gets a 460-pixel box) and its landmarks drift. ``face_size`` is the
            median width of the LFW faces at ``min_side``, where the landmarks match the reference
            alignment; none of them is wider than ``max_face``, so such photos are detected once, as ever.
    """

    def __init__(
        self,
        model: str | os.PathLike[str] | None = None,
        score_threshold: float = 0.6,
        nms_threshold: float = 0.3,
        min_face: int = 20,
        min_side: int = 300,
        max_side: int = 640,
        max_face: int = 320,
        face_size: int = 192,
    ) -> None:
        path = Path(model) if model is not None else find_model(YUNET_FILE, YUNET_URL)
        if not path.is_file():
            raise ModelNotFoundError(f"{path}: detector model not found; download it from {YUNET_URL}")
        if not 0 < min_side <= max_side or not 0 < face_size <= max_face:
            raise ValueError(f"need 0 < min_side <= max_side and 0 < face_size <= max_face, got "
                             f"{min_side}, {max_side}, {face_size}, {max_face}")  # fmt: skip
        self.path, self.min_face, self.min_side, self.max_side = path, min_face, min_side, max_side
        self.max_face, self.face_size = max_face, face_size
        # errors only: OpenCV's DNN warns about backend targets on every load
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
        try:
            self._net = cv2.FaceDetectorYN.create(
                str(path), "", (320, 320), score_threshold, nms_threshold, 5000
            )
        except cv2.error as err:
            raise ValueError(f"{path}: not a readable YuNet detector model ({_cv2_reason(err)})") from None
        self._detect_at(np.zeros((64, 64, 3), np.uint8), 1.0)  # another ONNX model loads, and fails here

    def detect(self, image_rgb: np.ndarray) -> list[Face]:
        """Faces in an H x W x 3 uint8 RGB image (boxes and landmarks in its pixels), highest score first."""
        if image_rgb.ndim != 3 or image_rgb.shape[2] != 3 or image_rgb.dtype != np.uint8:
            raise ValueError(
                f"detect expects an H x W x 3 uint8 image, got {image_rgb.dtype} {image_rgb.shape}"
            )
        height, width = image_rgb.shape[:2]
        scale = max(self.min_side / min(height, width), 1.0)
        scale = min(scale, self.max_side / max(height, width))
        faces = self._detect_at(image_rgb, scale)
        large = [f for f in faces if f.width * scale > self.max_face]
        if large:
            again = self._detect_at(image_rgb, self.face_size / max(f.width for f in large))
            faces = [self._same_face(face, again) if face.width * scale > self.max_face else face
                     for face in faces]  # fmt: skip
        return sorted(faces, key=lambda f: -f.score)

    @staticmethod
    def _same_face(face: Face, candidates: list[Face]) -> Face:
        """The candidate that is ``face`` seen again (box IoU above 0.5), else ``face``."""
        best = max(candidates, key=face.overlap, default=None)
        return best if best is not None and face.overlap(best) > 0.5 else face

    def _detect_at(self, rgb: np.ndarray, scale: float) -> list[Face]:
        """Detections in ``rgb`` resized by ``scale``, mapped back to its pixels."""
        height, width = rgb.shape[:2]
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        resized, sx, sy = rgb, 1.0, 1.0
        if size != (width, height):
            shrink = size[0] < width
            resized = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
            sx, sy = size[0] / width, size[1] / height
        self._net.setInputSize(size)
        try:
            _, rows = self._net.detect(np.ascontiguousarray(resized[:, :, ::-1]))  # the model reads BGR
        except cv2.error as err:  # an ONNX model that is not YuNet loads, and fails here
            raise ValueError(f"{self.path}: not a YuNet face detector ({_cv2_reason(err)})") from None
        faces = []
        for row in rows if rows is not None else []:
            x, y, w, h = row[0] / sx, row[1] / sy, row[2] / sx, row[3] / sy  # back to the photo's pixels
            if min(w, h) < self.min_face:
                continue
            box = np.array([x, y, x + w, y + h], dtype=np.float32)
            landmarks = (row[4:14].reshape(5, 2) / [sx, sy]).astype(np.float32)
            faces.append(Face(box=box, score=float(row[14]), landmarks=landmarks))
        return faces


def _cv2_reason(err: Exception) -> str:
    """The message of an OpenCV error without its source location."""
    text = str(err).strip()
    detail = [line[2:].strip() for line in text.splitlines() if line.startswith("> ")]
    if detail:
        return detail[-1]
    match = re.search(r"error: \([^)]*\) (.*?)(?: in function .*)?$", text.splitlines()[0] if text else "")
    return match.group(1) if match else (text.splitlines()[0] if text else type(err).__name__)
