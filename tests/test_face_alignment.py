"""Detection (YuNet) and 5-point similarity alignment against hand-computed transforms and real photos."""

from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from data.decode import decode_rgb
from data.verification import load_bin, read_pairs
from face_alignment import (
    ARCFACE_TEMPLATE,
    ModelNotFoundError,
    YuNetDetector,
    align_face,
    find_model,
    largest_face,
    similarity_transform,
)


def similarity(scale: float, angle_deg: float, tx: float, ty: float) -> np.ndarray:
    a = math.radians(angle_deg)
    return np.array(
        [[scale * math.cos(a), -scale * math.sin(a), tx], [scale * math.sin(a), scale * math.cos(a), ty]]
    )


def apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points @ matrix[:, :2].T + matrix[:, 2]


def test_an_exact_similarity_is_recovered():
    truth = similarity(1.7, 25.0, 10.0, -5.0)
    src = ARCFACE_TEMPLATE
    np.testing.assert_allclose(similarity_transform(src, apply(truth, src)), truth, atol=1e-10)
    np.testing.assert_allclose(similarity_transform(src, src), similarity(1, 0, 0, 0), atol=1e-12)


def test_noisy_points_give_the_least_squares_similarity():
    rng = np.random.default_rng(0)
    src = ARCFACE_TEMPLATE * 2.3 + rng.normal(0, 3, (5, 2)) + 40
    dst = apply(similarity(0.45, -12.0, 3.0, 7.0), src) + rng.normal(0, 1.5, (5, 2))
    # the same problem as a linear system in (a, b, tx, ty): x' = a x - b y + tx, y' = b x + a y + ty
    rows = [[x, -y, 1, 0] for x, y in src] + [[y, x, 0, 1] for x, y in src]
    (a, b, tx, ty), *_ = np.linalg.lstsq(np.array(rows), np.concatenate([dst[:, 0], dst[:, 1]]), rcond=None)
    np.testing.assert_allclose(similarity_transform(src, dst), [[a, -b, tx], [b, a, ty]], atol=1e-9)


def test_mirrored_points_never_give_a_reflection():
    mirrored = ARCFACE_TEMPLATE * [-1, 1] + [112, 0]
    m = similarity_transform(ARCFACE_TEMPLATE, mirrored)
    assert np.linalg.det(m[:, :2]) > 0


def test_alignment_undoes_a_known_warp():
    # a face-like canvas in template coordinates, warped into a larger "photo" by a known similarity
    canvas = np.zeros((112, 112, 3), np.uint8)
    cv2.rectangle(canvas, (20, 20), (92, 100), (90, 140, 200), -1)
    for (x, y), colour in zip(
        ARCFACE_TEMPLATE, [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255)], strict=False
    ):
        cv2.circle(canvas, (round(x), round(y)), 4, colour, -1)
    truth = similarity(1.6, 18.0, 60.0, 20.0)
    photo = cv2.warpAffine(canvas, truth, (260, 260), flags=cv2.INTER_LINEAR)
    aligned = align_face(photo, apply(truth, ARCFACE_TEMPLATE))
    inner = np.abs(aligned[24:96, 24:88].astype(int) - canvas[24:96, 24:88].astype(int))
    assert np.median(inner) == 0 and inner.mean() < 6
    with pytest.raises(ValueError, match="need 5 landmarks"):
        align_face(photo, np.zeros((4, 2)))


@pytest.fixture(scope="module")
def detector(shared_data):
    return YuNetDetector()


def test_real_photos_give_one_plausible_face(detector, shared_data):
    paths = sorted((shared_data / "lfw_color150").glob("*.jpg"))[:: 7701 // 25][:25]
    for path in paths:
        faces = detector.detect(decode_rgb(path.read_bytes(), str(path)))
        face = largest_face(faces)
        assert face is not None, path
        x0, _y0, x1, _y1 = face.box
        eyes, nose, mouth = face.landmarks[:2], face.landmarks[2], face.landmarks[3:]
        assert (face.landmarks[:, 0] > x0).all() and (face.landmarks[:, 0] < x1).all(), path
        assert eyes[0, 0] < eyes[1, 0] and mouth[0, 0] < mouth[1, 0]  # image-left first, as the template
        assert eyes[:, 1].max() < nose[1] < mouth[:, 1].min(), path
    assert detector.detect(np.full((150, 150, 3), 128, np.uint8)) == []


def test_our_crops_match_the_reference_lfw_bin(detector, shared_data):
    # lfw_yunet112.bin holds YuNet + ArcFace-template crops of the same photos, pair k = images 2k, 2k+1
    pairs = read_pairs(shared_data / "lfw_pairs.txt")
    reference = load_bin(shared_data / "lfw_yunet112.bin")
    differences = []
    for k in range(0, 6000, 300):
        name, number = pairs[k].name1, pairs[k].num1
        path = shared_data / "lfw_color150" / f"{name}_{number:04d}.jpg"
        image = decode_rgb(path.read_bytes(), str(path))
        crop = align_face(image, largest_face(detector.detect(image)).landmarks)
        differences.append(
            np.abs(crop.astype(int) - reference.images[2 * k].transpose(1, 2, 0).astype(int)).mean()
        )
    # grey levels per pixel: JPEG noise and landmark jitter; a shifted or scaled crop differs by 20 or more
    # (a photo with two faces may resolve to the other one: allow a few)
    assert np.median(differences) < 4 and sum(d < 10 for d in differences) >= 17, differences


def test_a_missing_model_says_where_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("FACEREC_MODELS", str(tmp_path))
    monkeypatch.setenv("FACEREC_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(ModelNotFoundError, match=r"github\.com/opencv/opencv_zoo"):
        find_model("face_detection_yunet_2026may.onnx", "https://github.com/opencv/opencv_zoo")
    with pytest.raises(ModelNotFoundError, match=r"missing\.onnx: detector model not found"):
        YuNetDetector(tmp_path / "missing.onnx")


FIXTURES = Path(__file__).resolve().parent / "fixtures" / "alignment"


def test_crops_equal_insightface_norm_crop(shared_data):
    # reference crops written by insightface 2.1's norm_crop at the same landmarks (make_insightface_crops.py)
    for name, points in json.loads((FIXTURES / "landmarks.json").read_text()).items():
        path = shared_data / "lfw_color150" / name
        ours = align_face(decode_rgb(path.read_bytes(), str(path)), np.array(points))
        reference = cv2.imread(str(FIXTURES / f"insightface_{Path(name).stem}.png"))[:, :, ::-1]
        assert np.abs(ours.astype(int) - reference.astype(int)).max() <= 1, name


SAMPLES = Path(__file__).resolve().parents[1] / "face_alignment" / "test_images"


def test_a_large_photo_is_detected_and_aligned_like_the_original(detector, shared_data):
    # the sample photos (150 px) upscaled to 2000 px: YuNet on the full photo finds no face in two of
    # them; on a downscaled copy it finds each, and the landmarks, in the photo's pixels, are those of
    # the original size within the detector's own scale jitter (a few % of the eye distance)
    from evaluation.embedders import load_embedder

    embed = load_embedder(shared_data / "models" / "onnx" / "mobilefacenet_paddle_128d.onnx", color="bgr")

    def unit(crop):
        x = torch.from_numpy(np.ascontiguousarray(crop.transpose(2, 0, 1))[None])
        return torch.nn.functional.normalize(embed(x), dim=1)[0]

    for path in sorted(SAMPLES.glob("*.jpg")):
        image = decode_rgb(path.read_bytes(), str(path))
        small = largest_face(detector.detect(image))
        scale = 2000 / image.shape[1]
        big = cv2.resize(image, (2000, round(image.shape[0] * scale)), interpolation=cv2.INTER_CUBIC)
        large = largest_face(detector.detect(big))
        assert large is not None, path
        eyes = np.linalg.norm(small.landmarks[0] - small.landmarks[1])
        back = (large.landmarks + 0.5) / scale - 0.5  # into the original's pixel grid
        assert np.linalg.norm(back - small.landmarks, axis=1).mean() < 0.1 * eyes, (
            path,
            back,
            small.landmarks,
        )
        # the crop, warped from the 2000-px photo, is the same face to a recognition model (another photo
        # of the same person scores about 0.7)
        assert float(unit(align_face(big, large.landmarks)) @ unit(align_face(image, small.landmarks))) > 0.9


class RecordingNet:
    """Stands in for cv2.FaceDetectorYN and records the input sizes it is given."""

    def __init__(self, net):
        self.net, self.sizes = net, []

    def setInputSize(self, size):  # OpenCV's name
        self.sizes.append(tuple(size))
        self.net.setInputSize(size)

    def detect(self, image):
        assert (image.shape[1], image.shape[0]) == self.sizes[-1]
        return self.net.detect(image)


def test_the_detector_sees_a_copy_of_bounded_size(shared_data):
    detector = YuNetDetector(max_side=640)
    detector._net = RecordingNet(detector._net)
    path = SAMPLES / "George_W_Bush_0007.jpg"
    image = decode_rgb(path.read_bytes(), str(path))
    big = cv2.resize(image, (3000, 3000), interpolation=cv2.INTER_LINEAR)
    face = largest_face(detector.detect(big))
    assert face is not None and face.box.max() > 1500  # in the photo's pixels
    assert max(max(size) for size in detector._net.sizes) <= 640
    detector._net.sizes.clear()
    detector.detect(image)  # small photos are still upscaled to min_side
    assert detector._net.sizes == [(300, 300)]


def test_a_face_much_larger_than_the_crop_is_averaged_not_aliased():
    # a 1-pixel checkerboard under a face 20 times the crop's size: bilinear sampling alone reads the
    # same phase of the pattern everywhere (a flat black or white crop); averaged, it is mid grey
    board = ((np.indices((3000, 3000)).sum(0) % 2) * 255).astype(np.uint8)
    crop = align_face(np.repeat(board[..., None], 3, axis=2), ARCFACE_TEMPLATE * 20 + 100)
    assert abs(crop.mean() - 127.5) < 127.5 * 0.05 and crop.std() < 0.1 * 127.5, (crop.mean(), crop.std())


def test_averaging_down_keeps_the_geometry():
    # the same canvas drawn 12 times larger: the crop equals the one from the canvas at crop scale
    canvas = np.zeros((112, 112, 3), np.uint8)
    cv2.rectangle(canvas, (20, 20), (92, 100), (90, 140, 200), -1)
    for (x, y), colour in zip(ARCFACE_TEMPLATE, [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0),
                                                (0, 255, 255)], strict=True):  # fmt: skip
        cv2.circle(canvas, (round(x), round(y)), 6, colour, -1)
    truth = similarity(12.0, -9.0, 300.0, 150.0)
    photo = cv2.warpAffine(canvas, truth, (1900, 1900), flags=cv2.INTER_LINEAR)
    aligned = align_face(photo, apply(truth, ARCFACE_TEMPLATE))
    inner = np.abs(aligned[24:96, 24:88].astype(int) - canvas[24:96, 24:88].astype(int))
    assert np.median(inner) == 0 and inner.mean() < 6, inner.mean()
