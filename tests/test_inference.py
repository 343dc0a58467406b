from __future__ import annotations

import pytest
import torch

import inference
from backbones import build_backbone
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


def test_similarity_matrix_of_real_crops(weights, crops, capsys):
    path, model = weights
    assert inference.main(["--backbone", "mbf", "--weights", str(path), "--images", *map(str, crops)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 4 and all(c.name[:8] in printed[0] for c in crops)
    images = inference.read_aligned(crops)
    with torch.no_grad():
        emb = torch.nn.functional.normalize(model((images.float() / 127.5) - 1.0), dim=1)
    expected = emb @ emb.T
    got = torch.tensor([[float(v) for v in line.split()[1:]] for line in printed[1:]])
    torch.testing.assert_close(got, expected, atol=6e-4, rtol=0)
    assert torch.allclose(got.diag(), torch.ones(3), atol=1e-3)


def test_bgr_models_see_swapped_channels(weights, crops):
    _, model = weights
    images = inference.read_aligned(crops)
    rgb = inference.similarity_matrix(model, images, "rgb")
    bgr = inference.similarity_matrix(model, images.flip(1), "bgr")
    torch.testing.assert_close(rgb, bgr)


def test_unaligned_image_is_named(tmp_path, weights):
    big = tmp_path / "photo.jpg"
    big.write_bytes(encode_jpeg(torch.zeros(150, 150, 3, dtype=torch.uint8).numpy()))
    with pytest.raises(ValueError, match=r"photo\.jpg: 150x150 image; expected an aligned 112x112"):
        inference.read_aligned([big])


def test_weights_of_another_architecture_are_refused(weights):
    path, _ = weights
    with pytest.raises(ValueError, match=r"model\.pt: does not fit backbone 'r18'"):
        inference.load_backbone("r18", path, 512)
