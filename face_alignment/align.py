"""5-point similarity alignment to the ArcFace 112x112 template (docs/methods.md §6).

The transform is the non-reflective similarity (scale, rotation, translation) that maps the five detected
points onto the template in the least-squares sense (Umeyama's closed form, what MATLAB's ``cp2tform``
'similarity' and insightface's ``norm_crop`` compute), then ``cv2.warpAffine`` to the crop. A face more
than twice the crop's size is first averaged down to it (``cv2.INTER_AREA``), so that a large photo gives
the crop a small one would rather than bilinear aliasing; up to that size the warp is insightface's.
"""

from __future__ import annotations

import cv2
import numpy as np

# left eye, right eye, nose tip, left and right mouth corner (image left/right), 112x112 crop
ARCFACE_TEMPLATE = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=np.float64,
)


def template_for(size: int) -> np.ndarray:
    """The ArcFace template for a square crop of side ``size`` (scaled from 112)."""
    return ARCFACE_TEMPLATE * (size / 112.0)


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """2x3 matrix M of the least-squares similarity with M @ [x, y, 1] ~ dst for each src point.

    Umeyama (1991) without reflection: for centred points, the rotation comes from the SVD of the
    covariance, the scale from the singular values over the source variance.
    """
    src, dst = np.asarray(src, dtype=np.float64), np.asarray(dst, dtype=np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 2 or len(src) < 2:
        raise ValueError(f"need matching N x 2 point sets (N >= 2), got {src.shape} and {dst.shape}")
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s, d = src - mu_s, dst - mu_d
    var_s = (s**2).sum() / len(src)
    if var_s <= 0:
        raise ValueError("source points coincide: no similarity transform")
    cov = d.T @ s / len(src)
    u, sigma, vt = np.linalg.svd(cov)
    sign = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:  # a reflection: flip the weakest axis
        sign[1] = -1
    rotation = u @ np.diag(sign) @ vt
    scale = (sigma * sign).sum() / var_s
    matrix = np.zeros((2, 3))
    matrix[:, :2] = scale * rotation
    matrix[:, 2] = mu_d - scale * rotation @ mu_s
    return matrix


def align_face(
    image: np.ndarray, landmarks: np.ndarray, size: int = 112, border: int = cv2.BORDER_CONSTANT
) -> np.ndarray:
    """The ``size`` x ``size`` crop of ``image`` (H x W x C uint8) whose five ``landmarks`` (5 x 2, in the
    template's order) land on the ArcFace template. Pixels from outside the photo are black
    (``border=cv2.BORDER_CONSTANT``, as insightface) or replicated (``cv2.BORDER_REPLICATE``)."""
    landmarks = np.asarray(landmarks, dtype=np.float64).reshape(-1, 2)
    if landmarks.shape != (5, 2):
        raise ValueError(f"need 5 landmarks (x, y), got shape {landmarks.shape}")
    matrix = similarity_transform(landmarks, template_for(size))
    if np.sqrt(abs(np.linalg.det(matrix[:, :2]))) < 0.5:
        image, matrix = _shrunk_to_crop_scale(image, matrix, size)
    return cv2.warpAffine(
        image, matrix, (size, size), flags=cv2.INTER_LINEAR, borderMode=border, borderValue=0
    )


def _shrunk_to_crop_scale(image: np.ndarray, matrix: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The part of ``image`` that the crop covers, averaged down (``cv2.INTER_AREA``) to the crop's scale,
    and the transform from it to the crop. Bilinear sampling of a face more than twice the crop's size
    reads a few pixels of each block and aliases (a large photo's skin texture turns to noise); averaging
    first gives the crop that a photo of the crop's resolution would have given."""
    scale = float(np.sqrt(abs(np.linalg.det(matrix[:, :2]))))
    inverse = cv2.invertAffineTransform(matrix)
    corners = np.array([[0, 0, 1], [size, 0, 1], [0, size, 1], [size, size, 1]], dtype=np.float64) @ inverse.T
    height, width = image.shape[:2]
    x0, y0 = np.clip(np.floor(corners.min(0)).astype(int) - 2, 0, [width, height])
    x1, y1 = np.clip(np.ceil(corners.max(0)).astype(int) + 2, 0, [width, height])
    if x1 - x0 < 2 or y1 - y0 < 2:  # the crop lies outside the photo: nothing to average
        return image, matrix
    out_w, out_h = max(1, round((x1 - x0) * scale)), max(1, round((y1 - y0) * scale))
    region = cv2.resize(image[y0:y1, x0:x1], (out_w, out_h), interpolation=cv2.INTER_AREA)
    fx, fy = out_w / (x1 - x0), out_h / (y1 - y0)
    # a pixel q of the shrunk region is pixel (q + 0.5) / f - 0.5 + (x0, y0) of the photo
    linear = matrix[:, :2] @ np.diag([1 / fx, 1 / fy])
    offset = matrix[:, :2] @ np.array([0.5 / fx - 0.5 + x0, 0.5 / fy - 0.5 + y0]) + matrix[:, 2]
    return region, np.column_stack([linear, offset])
