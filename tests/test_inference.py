"""inference.py: real photos in, a similarity matrix out; models from checkpoints, state dicts and ONNX."""

from __future__ import annotations

import pytest
import torch

import inference
from backbones import build_backbone
from core.embedders import load_embedder
from data.decode import encode_jpeg


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


def test_default_run_matches_the_sample_photos(shared_data, capsys):
    # two photos of Colin Powell, one of George W. Bush, the pretrained MobileFaceNet (BGR)
    assert inference.main([]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "Colin_Powell_0049.jpg: 2 faces; using the largest" in out[0]
    sim = matrix(out[-3:])
    assert sim[0, 1] > 0.5 and sim[0, 2] < 0.2 and sim[1, 2] < 0.2
    torch.testing.assert_close(sim, sim.T)


def test_a_photo_without_a_face_is_named_and_left_out(shared_data, tmp_path, capsys):
    blank = tmp_path / "wall.jpg"
    blank.write_bytes(encode_jpeg(torch.full((150, 150, 3), 128, dtype=torch.uint8).numpy()))
    samples = sorted(inference.SAMPLES.glob("*.jpg"))[:2]
    assert inference.main(["--images", str(blank), *map(str, samples)]) == 1
    captured = capsys.readouterr()
    assert f"{blank}: no face found; left out" in captured.err
    assert "wall.jpg" not in captured.out and samples[0].name in captured.out


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
