"""ONNX export: the file insightface's model zoo would route as a recognition model, equal to PyTorch."""

from __future__ import annotations

import onnx
import pytest
import torch

from backbones import build_backbone
from core.checkpoint import NORMALIZATION, save_checkpoint
from data.transforms import normalize_batch
from evaluation.embedders import OnnxEmbedder, load_embedder
from scripts import export_onnx
from tests.conftest import assert_close_scaled


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, shared_data):
    torch.manual_seed(0)
    model = build_backbone("r18", embedding_size=256)
    for m in model.modules():  # BN statistics of real faces, so that eval-mode features are well scaled
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = None
    with torch.no_grad():
        model(normalize_batch(export_onnx.real_faces(None, 64)))
    model.eval()
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    meta = {
        "arch": "r18",
        "embedding_size": 256,
        "input_size": 112,
        "color": "bgr",
        "normalization": NORMALIZATION,
    }
    save_checkpoint(path, {"backbone": model.state_dict(), "meta": meta})
    return path


def routes_as_recognition(path) -> bool:
    """insightface model_zoo's rule for ArcFaceONNX: one output, square input side >= 112, multiple of 16."""
    model = onnx.load(str(path))
    inputs = [i for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    dims = [d.dim_value or d.dim_param for d in inputs[0].type.tensor_type.shape.dim]
    return (
        len(model.graph.output) == 1 and len(inputs) == 1 and dims[2] == dims[3] >= 112 and dims[2] % 16 == 0
    )


@pytest.mark.parametrize("fold", [False, True])
def test_export_matches_pytorch_on_real_faces(checkpoint, tmp_path, shared_data, capsys, fold):
    out = tmp_path / "model.onnx"
    args = [str(checkpoint), str(out), *(["--fold-normalization"] if fold else [])]
    assert export_onnx.main(args) == 0
    assert "of unit features on 16 real faces" in capsys.readouterr().out
    model = onnx.load(str(out))
    assert [i.name for i in model.graph.input][:1] == ["data"] and routes_as_recognition(out)
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["color"] == ("rgb" if fold else "bgr")

    faces = export_onnx.real_faces(None, 32)
    expected = load_embedder(checkpoint)(faces)  # BGR-trained: the embedder swaps the channels
    # Two engines whose kernels sum in different orders: onnxruntime's embeddings were measured within 3.3e-6
    # of the largest |value| of PyTorch's (oneDNN on AVX-512 and AVX2 paths); the bound leaves 15x for
    # onnxruntime's own CPU-dependent kernels, far below what a wrong layout or scaling would move.
    rtol = 5e-5
    if fold:  # raw RGB pixels in, as insightface feeds models whose first nodes are Sub and Mul
        first = [n for n in model.graph.node[:8] if n.op_type in ("Sub", "Mul")]
        assert {n.name[:3] for n in first} == {"Sub", "Mul"}
        raw = OnnxEmbedder(out).session.run(None, {"data": faces.float().numpy()})[0]
        assert_close_scaled(raw, expected.numpy(), rtol=rtol)
    capsys.readouterr()
    got = OnnxEmbedder(out)(faces).numpy()  # the embedder reads the input scaling from the metadata
    said = "(x - 0) / 1 of RGB" if fold else "(x/255 - 0.5) / 0.5 of BGR"
    assert (
        f"model.onnx: input {said} pixels 0..255 (its metadata says normalization" in capsys.readouterr().err
    )
    assert got.shape == (32, 256)  # a batch size other than the one exported with
    assert_close_scaled(got, expected.numpy(), rtol=rtol)


def test_a_plain_state_dict_needs_its_architecture(tmp_path, capsys):
    torch.save(build_backbone("mbf").state_dict(), tmp_path / "sd.pt")
    assert export_onnx.main([str(tmp_path / "sd.pt"), str(tmp_path / "o.onnx")]) == 2
    assert "name its architecture" in capsys.readouterr().err
