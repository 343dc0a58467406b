"""inference.py: real photos in, a similarity matrix out; models from checkpoints, state dicts and ONNX."""

from __future__ import annotations

import cv2
import numpy as np
import onnxruntime
import pytest
import torch

import inference
from backbones import build_backbone
from data.decode import encode_jpeg
from evaluation.embedders import load_embedder
from face_alignment import YuNetDetector, align_face


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.manual_seed(0)
    model = build_backbone("mbf").eval()
    path = tmp_path_factory.mktemp("w") / "model.pt"
    torch.save(model.state_dict(), path)
    return path, model


@pytest.fixture(scope="module")
def crops(shared_data):
    root = shared_data / "celeba_aligned112"
    people = sorted(p for p in root.iterdir() if p.is_dir())[:2]
    return [*sorted(people[0].glob("*.jpg"))[:2], sorted(people[1].glob("*.jpg"))[0]]


def matrix(printed: list[str]) -> torch.Tensor:
    return torch.tensor([[float(v) for v in line.split()[1:]] for line in printed])


def pretrained_cosines(shared_data, photos) -> torch.Tensor:
    """Cosines of the largest face of each photo by the pretrained MobileFaceNet ONNX, run here directly:
    YuNet landmarks, ArcFace-template crop, BGR channels, (x - 127.5) / 127.5."""
    detector, crops = YuNetDetector(), []
    for photo in photos:
        rgb = cv2.cvtColor(cv2.imread(str(photo)), cv2.COLOR_BGR2RGB)
        face = max(detector.detect(rgb), key=lambda f: (f.box[2] - f.box[0]) * (f.box[3] - f.box[1]))
        crops.append(align_face(rgb, face.landmarks))
    x = (np.stack(crops)[..., ::-1].transpose(0, 3, 1, 2).astype(np.float32) - 127.5) / 127.5
    model = shared_data / "models" / "onnx" / "mobilefacenet_paddle_128d.onnx"
    session = onnxruntime.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    emb = torch.nn.functional.normalize(torch.from_numpy(session.run(None, {"x": x})[0]), dim=1)
    return emb @ emb.T


def test_default_run_matches_the_sample_photos(shared_data, capsys):
    # two photos of Colin Powell, one of George W. Bush, the pretrained MobileFaceNet (BGR)
    assert inference.main([]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "Colin_Powell_0049.jpg: 2 faces; using the largest" in out[0]
    sim = matrix(out[-3:])
    assert sim[0, 1] > 0.5 and sim[0, 2] < 0.2 and sim[1, 2] < 0.2
    expected = pretrained_cosines(shared_data, sorted(inference.SAMPLES.glob("*.jpg")))
    torch.testing.assert_close(sim, expected, rtol=0, atol=1e-3)  # printed to 3 decimals, cosines <= 1


def test_photos_of_one_person_score_above_photos_of_two(shared_data, capsys):
    # 8 people x 3 grey photos: every same-person cosine above every different-person cosine
    people = sorted(p for p in (shared_data / "tv_8ids").iterdir() if p.is_dir())
    photos = [photo for person in people for photo in sorted(person.glob("*.png"))[:3]]
    assert inference.main(["--images", *map(str, photos)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in printed[-len(photos) :]] == [p.name for p in photos]
    sim = matrix(printed[-len(photos) :])
    who = torch.arange(len(people)).repeat_interleave(3)
    same = (who[:, None] == who[None, :]) & ~torch.eye(len(photos), dtype=torch.bool)
    different = who[:, None] != who[None, :]
    assert sim[same].min() > sim[different].max(), (sim[same].min(), sim[different].max())
    assert sim[same].mean() > sim[different].mean() + 0.5


def test_a_photo_without_a_face_is_named_and_left_out(shared_data, tmp_path, capsys):
    blank = tmp_path / "wall.jpg"
    blank.write_bytes(encode_jpeg(torch.full((150, 150, 3), 128, dtype=torch.uint8).numpy()))
    samples = sorted(inference.SAMPLES.glob("*.jpg"))[:2]
    assert inference.main(["--images", str(blank), *map(str, samples)]) == 0  # two photos still compared
    captured = capsys.readouterr()
    assert f"{blank}: no face found; left out" in captured.err
    assert "wall.jpg" not in captured.out and samples[0].name in captured.out
    assert captured.err.splitlines()[-1] == "inference.py: 1 of 3 photos left out (named above)"


def test_unreadable_photos_are_named_and_the_others_scored(shared_data, tmp_path, capsys):
    samples = sorted(inference.SAMPLES.glob("*.jpg"))
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(samples[0].read_bytes()[:600])  # a JPEG cut off after its first rows
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    missing, folder = tmp_path / "missing.jpg", tmp_path / "folder.jpg"
    folder.mkdir()
    bad = [cut, text, missing, folder]
    assert inference.main(["--images", *map(str, bad), *map(str, samples)]) == 0
    captured = capsys.readouterr()
    errors = captured.err.splitlines()
    for path in bad:
        assert sum(line.startswith(f"{path}: ") and line.endswith("; left out") for line in errors) == 1, path
    assert "cannot read (No such file or directory)" in captured.err
    names = captured.out.splitlines()[-len(samples) - 1].split()
    assert names == [p.name for p in samples]  # every good photo in the matrix, no bad one
    # the scores of the good photos are those of a run without the bad ones
    assert inference.main(["--images", *map(str, samples)]) == 0
    alone = capsys.readouterr().out.splitlines()
    torch.testing.assert_close(matrix(captured.out.splitlines()[-3:]), matrix(alone[-3:]))


def test_fewer_than_two_faces_is_an_error(shared_data, tmp_path, capsys):
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    sample = sorted(inference.SAMPLES.glob("*.jpg"))[0]
    assert inference.main(["--images", str(text), str(sample)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[-1] == "inference.py: 1 of 2 photos gave a face; a similarity matrix needs 2"


def test_similarity_matrix_of_aligned_crops(weights, crops, capsys):
    path, model = weights
    args = ["--aligned", "--backbone", "mbf", "--model", str(path), "--images", *map(str, crops)]
    assert inference.main(args) == 0
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 5 and all(c.name[:8] in printed[1] for c in crops)
    images = inference.read_aligned(crops)
    with torch.no_grad():
        emb = torch.nn.functional.normalize(model((images.float() / 127.5) - 1.0), dim=1)
    torch.testing.assert_close(matrix(printed[2:]), emb @ emb.T, atol=6e-4, rtol=0)


def test_bgr_models_see_swapped_channels(weights, crops):
    path, _ = weights
    images = inference.read_aligned(crops)
    rgb = inference.similarity_matrix(load_embedder(path, backbone="mbf", color="rgb"), images)
    bgr = inference.similarity_matrix(load_embedder(path, backbone="mbf", color="bgr"), images.flip(1))
    torch.testing.assert_close(rgb, bgr)


def test_unaligned_image_is_named(tmp_path):
    big = tmp_path / "photo.jpg"
    big.write_bytes(encode_jpeg(torch.zeros(150, 150, 3, dtype=torch.uint8).numpy()))
    with pytest.raises(ValueError, match=r"photo\.jpg: 150x150 image; expected an aligned 112x112"):
        inference.read_aligned([big])


def test_weights_of_another_architecture_are_refused(weights, capsys):
    path, _ = weights
    args = ["--aligned", "--model", str(path), "--backbone", "r18", "--images", str(path)]
    assert inference.main(args) == 2
    assert "model.pt: does not fit backbone 'r18'" in capsys.readouterr().err
    assert inference.main(["--aligned", "--model", str(path), "--images", str(path)]) == 2
    assert "a plain state dict; name its architecture" in capsys.readouterr().err
