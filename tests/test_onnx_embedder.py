"""The ONNX embedder feeds each model the input scaling it was built for: read from its metadata, from a
normalisation folded into the head of its graph (insightface's model-zoo rule), or given by the user.

The models are the real pretrained MobileFaceNet of the data folder and copies of it with a Sub/Mul (or
Sub/Div) head built with the onnx helper API, which take raw pixels 0..255.
"""

from __future__ import annotations

import argparse

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from evaluation.embedders import OnnxEmbedder, embedder_key, load_embedder
from evaluation.options import add_embedder_arguments, embedder_from_args, run_settings
from scripts.export_onnx import real_faces

FOLDED_NOTE = "none: RGB pixels 0..255 (folded into the graph)"  # what scripts/export_onnx.py writes
HEADS = {  # node names and operators of a folded (x - 127.5) * (1 / 127.5)
    "mxnet": (("_minusscalar0", "Sub"), ("_mulscalar0", "Mul")),  # insightface's converted models
    "pytorch": (("/Sub", "Sub"), ("/Mul", "Mul")),  # torch.onnx names; insightface's rule misses them
    "unnamed": (("", "Sub"), ("", "Mul")),  # the onnx helper API's default
    "div": (("prep_sub", "Sub"), ("prep_div", "Div")),  # no Mul: found by no graph rule
}


@pytest.fixture(scope="module")
def mobilefacenet(shared_data):
    return shared_data / "models" / "onnx" / "mobilefacenet_paddle_128d.onnx"


@pytest.fixture(scope="module")
def faces(shared_data):
    return real_faces(None, 8)


@pytest.fixture(scope="module")
def reference(mobilefacenet, faces):
    return OnnxEmbedder(mobilefacenet, verbose=False)(faces).numpy()


def with_head(src, dst, head: str | None, metadata: dict[str, str] | None = None):
    """A copy of ``src`` whose input ``data`` takes raw pixels through the ``head`` nodes (None: no head)."""
    model = onnx.load(str(src))
    graph = model.graph
    if head is not None:
        (sub_name, sub_op), (scale_name, scale_op) = HEADS[head]
        old = graph.input[0]
        data = helper.make_tensor_value_info("data", TensorProto.FLOAT, ["batch", 3, 112, 112])
        scale = 127.5 if scale_op == "Div" else 1 / 127.5
        constants = {"pixel_mean": 127.5, "pixel_scale": scale}
        graph.initializer.extend(
            numpy_helper.from_array(np.array(v, np.float32), k) for k, v in constants.items()
        )
        nodes = [
            helper.make_node(sub_op, ["data", "pixel_mean"], ["centred"], name=sub_name),
            helper.make_node(scale_op, ["centred", "pixel_scale"], [old.name], name=scale_name),
            *graph.node,
        ]
        inputs = [data, *graph.input[1:]]
        del graph.node[:], graph.input[:]
        graph.node.extend(nodes)
        graph.input.extend(inputs)
    for key, value in (metadata or {}).items():
        model.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(model)
    onnx.save(model, str(dst))
    return dst


def assert_same_features(got, expected):
    scale = np.abs(expected).max()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * scale)


def mean_cosine(a, b):
    a, b = (x / np.linalg.norm(x, axis=1, keepdims=True) for x in (a, b))
    return float(np.mean(np.sum(a * b, axis=1)))


@pytest.mark.parametrize("head", ["mxnet", "pytorch", "unnamed"])
def test_a_folded_head_is_found_in_the_graph(mobilefacenet, faces, reference, tmp_path, capsys, head):
    folded = with_head(mobilefacenet, tmp_path / "folded.onnx", head)
    embed = OnnxEmbedder(folded)
    line = capsys.readouterr().err.strip()
    assert line.startswith("folded.onnx: input (x - 0) / 1 of RGB pixels 0..255 (its graph opens with")
    assert "\n" not in line and embed.normalization == "(x - 0) / 1"
    if head == "mxnet":
        assert "_minusscalar0 and _mulscalar0" in line
    assert_same_features(embed(faces).numpy(), reference)
    # the premise: fed (x - 127.5) / 127.5 as before, the same model gives unrelated features
    wrong = OnnxEmbedder(folded, input_mean=127.5, input_std=127.5, verbose=False)(faces).numpy()
    assert mean_cosine(wrong, reference) < 0.5


def test_metadata_decides_before_the_graph(mobilefacenet, faces, reference, tmp_path, capsys):
    # a Sub/Div head is found by no graph rule: the metadata alone says the model takes raw pixels
    hidden = with_head(mobilefacenet, tmp_path / "div.onnx", "div")
    assert "no normalization metadata and no Sub/Mul" in (OnnxEmbedder(hidden), capsys.readouterr().err)[1]
    noted = with_head(mobilefacenet, tmp_path / "noted.onnx", "div", {"normalization": FOLDED_NOTE})
    embed = OnnxEmbedder(noted)
    assert "its metadata says normalization = 'none: RGB" in capsys.readouterr().err
    assert_same_features(embed(faces).numpy(), reference)
    # the framework's own unfolded metadata wins over a Sub/Mul head (here a wrong claim, to tell them apart)
    claimed = with_head(
        mobilefacenet, tmp_path / "claimed.onnx", "mxnet", {"normalization": "(x/255 - 0.5) / 0.5"}
    )
    assert OnnxEmbedder(claimed, verbose=False).normalization == "(x/255 - 0.5) / 0.5"
    plain = with_head(mobilefacenet, tmp_path / "plain.onnx", None, {"normalization": "(x/255 - 0.5) / 0.5"})
    assert_same_features(OnnxEmbedder(plain, verbose=False)(faces).numpy(), reference)


def test_the_user_overrides_the_scaling_from_the_command_line(
    mobilefacenet, faces, reference, tmp_path, capsys
):
    hidden = with_head(mobilefacenet, tmp_path / "div.onnx", "div")
    parser = argparse.ArgumentParser()
    add_embedder_arguments(parser)
    args = parser.parse_args(
        ["--model", str(hidden), "--device", "cpu", "--input-mean", "0", "--input-std", "1"]
    )
    embed = embedder_from_args(args)
    assert "given with --input-mean/--input-std" in capsys.readouterr().err
    assert_same_features(embed(faces).numpy(), reference)
    default = load_embedder(hidden)
    assert embedder_key(hidden, embed) != embedder_key(hidden, default)  # cached features are kept apart
    args.fusion, args.batch_size, args.workers = "sum", 8, 0
    assert run_settings(args, embed)["normalization"] == "(x - 0) / 1"
    # any other scaling, e.g. pixels in [0, 1]: the same as feeding x / 255 by hand
    unit = OnnxEmbedder(mobilefacenet, input_mean=0, input_std=255, verbose=False)
    by_hand = unit.session.run(None, {unit.input: faces.float().numpy() / 255})[0]
    assert_same_features(unit(faces).numpy(), by_hand)


def test_bad_scaling_is_a_clear_error(mobilefacenet, tmp_path):
    with pytest.raises(ValueError, match="give both the input mean and std"):
        load_embedder(mobilefacenet, input_mean=0.0)
    with pytest.raises(ValueError, match="the std positive"):
        load_embedder(mobilefacenet, input_mean=0.0, input_std=0.0)
    odd = with_head(mobilefacenet, tmp_path / "odd.onnx", None, {"normalization": "imagenet"})
    with pytest.raises(ValueError, match=r"odd.onnx: metadata normalization = 'imagenet' is neither"):
        load_embedder(odd)
    assert load_embedder(odd, input_mean=127.5, input_std=127.5).normalization == "(x/255 - 0.5) / 0.5"
    state = tmp_path / "sd.pt"
    torch.save({"w": torch.zeros(1)}, state)
    with pytest.raises(ValueError, match="are for ONNX models"):
        load_embedder(state, backbone="mbf", input_mean=0.0, input_std=1.0)
