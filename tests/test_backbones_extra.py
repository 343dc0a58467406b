"""InceptionResNetV1 (facenet-pytorch layout and outputs), SE-ResNeXt (timm layout), GeM pooling and
ResFace64 (ProbFace). The checks every registered backbone gets (forward/backward reaching every
parameter, eval determinism, bf16, gradient checkpointing, channels_last) are in tests/test_backbones.py."""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch
from torch import nn

import train
from backbones import build_backbone
from backbones.inception_resnet import InceptionResNetV1, from_facenet_pytorch
from backbones.pooling import GeM, GlobalAvgPool, global_pool
from backbones.resface import ResFace
from backbones.seresnext import SEResNeXt, from_timm
from core.config import load_config
from evaluation.embedders import TorchEmbedder
from scripts import export_onnx
from tests.conftest import assert_close_scaled
from tests.synthetic_faces import write_identity_folder
from tests.test_backbones import KERNEL_RTOL, REF

FIXTURES = Path(__file__).parent / "fixtures" / "backbones"
ROOT = Path(__file__).resolve().parent.parent
LAYOUTS: dict[str, list] = json.loads((FIXTURES / "extra_state_dict_shapes.json").read_text())["layouts"]
FACENET_OUT: dict[str, list] = json.loads((FIXTURES / "facenet_reference_outputs.json").read_text())[
    "embeddings"
]
HEAD_KEYS = ("embedding.", "features.")


def entries(model: nn.Module) -> list[list]:
    return [[k, list(v.shape)] for k, v in model.state_dict().items()]


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def reference_params(layout: list[list]) -> int:
    buffers = ("running_mean", "running_var", "num_batches_tracked")
    return sum(torch.Size(shape).numel() for key, shape in layout if not key.endswith(buffers))


@pytest.fixture(scope="module")
def inception() -> InceptionResNetV1:
    torch.manual_seed(0)
    return build_backbone("inception_resnet_v1")


@pytest.fixture(scope="module")
def seresnext101() -> SEResNeXt:
    torch.manual_seed(0)
    return build_backbone("seresnext101_32x4d")


@pytest.fixture(scope="module")
def seresnext50() -> SEResNeXt:
    torch.manual_seed(0)
    return SEResNeXt((3, 4, 6, 3))


# --- InceptionResNetV1 ----------------------------------------------------------------------------


def test_inception_layout_equals_facenet_pytorch(inception):
    assert entries(inception) == LAYOUTS["inception_resnet_v1"]
    assert n_params(inception) == reference_params(LAYOUTS["inception_resnet_v1"]) == 23_482_624


@functools.cache
def _vggface2_shaped_file() -> dict[str, torch.Tensor]:
    return REF.synthetic_state_dict(
        LAYOUTS["inception_resnet_v1"] + LAYOUTS["inception_resnet_v1_classifier"]
    )


def vggface2_shaped_file() -> dict[str, torch.Tensor]:
    """Synthetic weights laid out as facenet-pytorch's released VGGFace2 file (embedder + ``logits``)."""
    return dict(_vggface2_shaped_file())


def test_inception_embeddings_equal_facenet_pytorch_at_112_and_160():
    """Same weights, same input -> the unit embeddings facenet-pytorch computed (eval mode)."""
    model = InceptionResNetV1(normalize_output=True, input_size=160)
    model.load_state_dict(from_facenet_pytorch(vggface2_shaped_file(), model), strict=True)
    model.eval()
    for size, side in [("112", 2), ("160", 3)]:
        x = REF.synthetic_input(size=int(size))
        with torch.no_grad():
            model.normalize_output = True
            unit = model(x)
            model.normalize_output = False
            raw = model(x)
            assert model.forward_features(x).shape == (2, 1792, side, side)
        expected = torch.tensor(FACENET_OUT[size])
        assert expected.shape == unit.shape == (2, 512)
        # Recorded on another machine, whose kernels sum in another order: measured within 5.5e-7 of the
        # largest |value| (AVX-512, AVX2 and SSE kernels); bounds relative to that scale.
        assert_close_scaled(unit, expected, rtol=1e-5)
        # With synthetic weights the two images' embeddings share most of their direction (the biases'),
        # so the input-dependent part, their difference, is compared on its own scale too.
        diff, expected_diff = unit[0] - unit[1], expected[0] - expected[1]
        assert expected_diff.norm() > 0.02
        assert_close_scaled(diff, expected_diff, rtol=1e-3)  # measured within 2.3e-5 of its scale
        # The framework's default returns the same direction, un-normalised.
        assert not torch.allclose(raw.norm(dim=1), torch.ones(2), atol=0.1)
        assert_close_scaled(torch.nn.functional.normalize(raw, dim=1), expected, rtol=1e-5)


def test_inception_gem_variant_adds_only_the_exponent_and_loads_facenet_weights():
    model = build_backbone("inception_resnet_v1_gem")
    reference = LAYOUTS["inception_resnet_v1"]
    at = next(i for i, (key, _) in enumerate(reference) if key.startswith("last_linear."))
    assert entries(model) == [*reference[:at], ["global_pool.p", [1]], *reference[at:]]
    state = vggface2_shaped_file()
    model.load_state_dict(from_facenet_pytorch({f"module.{k}": v for k, v in state.items()}, model))
    assert model.global_pool.p.item() == 3.0
    assert torch.equal(model.last_linear.weight, state["last_linear.weight"])


def test_facenet_weights_that_do_not_fit_are_refused_naming_the_key(inception):
    state = vggface2_shaped_file()
    del state["repeat_2.3.branch1.1.bn.running_var"]
    with pytest.raises(
        ValueError, match=r"facenet-pytorch .*missing 1 keys \(first 'repeat_2\.3\.branch1\.1"
    ):
        from_facenet_pytorch(state, inception)
    state = {**vggface2_shaped_file(), "last_linear.weight": torch.zeros(128, 1792)}
    with pytest.raises(
        ValueError, match=r"last_linear\.weight has shape \[128, 1792\], expected \[512, 1792\]"
    ):
        from_facenet_pytorch(state, inception)
    state = {**vggface2_shaped_file(), "classifier.weight": torch.zeros(3)}
    with pytest.raises(ValueError, match=r"1 unexpected keys \(first 'classifier\.weight'\)"):
        from_facenet_pytorch(state, inception)


def test_inception_refuses_inputs_below_75():
    with pytest.raises(ValueError, match="input_size must be at least 75"):
        build_backbone("inception_resnet_v1", input_size=64)


def test_inception_block_scales_and_last_block_without_relu(inception):
    assert [b.scale for b in inception.repeat_1] == [0.17] * 5
    assert [b.scale for b in inception.repeat_2] == [0.10] * 10
    assert [b.scale for b in inception.repeat_3] == [0.20] * 5
    assert isinstance(inception.repeat_3[0].relu, nn.ReLU)
    assert isinstance(inception.block8.relu, nn.Identity) and inception.block8.scale == 1.0
    assert inception.last_bn.eps == 1e-3 and inception.last_bn.momentum == 0.1
    assert inception.last_linear.bias is None
    # the residual block really is relu(x + scale * conv2d(concat(branches)))
    block = inception.repeat_1[0].eval()
    x = torch.randn(1, 256, 5, 5, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        branches = torch.cat([block.branch0(x), block.branch1(x), block.branch2(x)], dim=1)
        torch.testing.assert_close(block(x), torch.relu(x + 0.17 * block.conv2d(branches)))


# --- SE-ResNeXt -----------------------------------------------------------------------------------


def split_head(model: nn.Module) -> tuple[list[list], list[list]]:
    ours = entries(model)
    return [e for e in ours if not e[0].startswith(HEAD_KEYS)], [
        e for e in ours if e[0].startswith(HEAD_KEYS)
    ]


def timm_body(name: str) -> list[list]:
    return [e for e in LAYOUTS[f"{name}_timm"] if not e[0].startswith("fc.")]


def test_seresnext101_body_layout_equals_timm_and_head_is_pool_fc_bn(seresnext101):
    body, head = split_head(seresnext101)
    assert body == timm_body("seresnext101_32x4d")
    assert head == [
        ["embedding.weight", [512, 2048]], ["embedding.bias", [512]], ["features.weight", [512]],
        ["features.bias", [512]], ["features.running_mean", [512]], ["features.running_var", [512]],
        ["features.num_batches_tracked", []],
    ]  # fmt: skip
    assert seresnext101.features.eps == 1e-3
    # timm publishes 48.96 M parameters with its 1000-class fc; ours swaps that fc for 2048 -> 512 + BN1d.
    timm_total = reference_params(LAYOUTS["seresnext101_32x4d_timm"])
    assert round(timm_total / 1e6, 2) == 48.96
    assert n_params(seresnext101) == timm_total - (2048 * 1000 + 1000) + (2048 * 512 + 512) + 2 * 512


def test_seresnext101_gem_variant_adds_only_the_exponent(seresnext101):
    ours, base = entries(build_backbone("seresnext101_32x4d_gem")), entries(seresnext101)
    at = next(i for i, (key, _) in enumerate(base) if key.startswith("embedding."))
    assert ours == [*base[:at], ["global_pool.p", [1]], *base[at:]]


def test_seresnext50_body_layout_equals_timm(seresnext50):
    body, _ = split_head(seresnext50)
    assert body == timm_body("seresnext50_32x4d")
    assert round(reference_params(LAYOUTS["seresnext50_32x4d_timm"]) / 1e6, 2) == 27.56


def test_seresnext101_block_structure(seresnext101):
    block = seresnext101.layer3[0]
    assert block.conv2.groups == 32 and block.conv2.stride == (2, 2) and block.conv2.in_channels == 512
    assert block.se.fc1.out_channels == 1024 // 16
    assert [len(s) for s in seresnext101.stages] == [3, 4, 23, 3]
    assert all((b.bn3.weight == 0.2).all() for b in seresnext101.blocks())
    block = seresnext101.layer1[1].eval()
    x = torch.randn(1, 256, 6, 6, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = block.bn3(
            block.conv3(block.act2(block.bn2(block.conv2(block.act1(block.bn1(block.conv1(x)))))))
        )
        gate = torch.sigmoid(block.se.fc2(torch.relu(block.se.fc1(out.mean((2, 3), keepdim=True)))))
        torch.testing.assert_close(block(x), torch.relu(out * gate + x))


def test_seresnext101_one_112_forward(seresnext101):
    model = seresnext101.eval()
    x = torch.randn(1, 3, 112, 112, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        fmap = model.forward_features(x)
        out = model(x)
    assert fmap.shape == (1, 2048, 4, 4)
    # eval-mode head re-implemented: mean pool -> Linear -> BN1d with running statistics
    bn = model.features
    expected = (model.embedding(fmap.mean((2, 3))) - bn.running_mean) / torch.sqrt(bn.running_var + 1e-3)
    torch.testing.assert_close(out, expected * bn.weight + bn.bias)


def test_timm_weights_load_without_the_classifier(seresnext50):
    model = seresnext50
    timm_state = REF.synthetic_state_dict(LAYOUTS["seresnext50_32x4d_timm"], seed=5)
    head_before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(HEAD_KEYS)}
    model.load_state_dict(from_timm({f"module.{k}": v for k, v in timm_state.items()}, model), strict=True)
    loaded = model.state_dict()
    for key, value in timm_state.items():
        if not key.startswith("fc."):
            assert torch.equal(loaded[key], value), key
    for key, value in head_before.items():
        assert torch.equal(loaded[key], value), key
    # a deeper network's file (one more layer3 block) does not fit: refused, naming the first extra key
    deeper = {**timm_state, "layer3.6.conv1.weight": torch.zeros(512, 1024, 1, 1)}
    with pytest.raises(ValueError, match=r"timm SE-ResNeXt weights .*1 unexpected keys \(first 'layer3\.6\."):
        from_timm(deeper, model)
    del timm_state["layer2.0.se.fc2.bias"]
    with pytest.raises(ValueError, match=r"missing 1 keys \(first 'layer2\.0\.se\.fc2\.bias'\)"):
        from_timm(timm_state, model)


# --- GeM ------------------------------------------------------------------------------------------


def positive_map(seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.rand(2, 3, 4, 5, generator=torch.Generator().manual_seed(seed), dtype=dtype) + 0.05


def test_gem_equals_closed_form():
    x = positive_map()
    gem = GeM()
    assert gem.p.item() == 3.0 and gem.eps == 1e-6
    expected = np.cbrt((x.double().numpy() ** 3).mean(axis=(2, 3)))
    torch.testing.assert_close(gem(x), torch.from_numpy(expected).float())
    with torch.no_grad():
        gem.p.fill_(1.0)
    torch.testing.assert_close(gem(x), x.mean((2, 3)))
    torch.testing.assert_close(GlobalAvgPool()(x), x.mean((2, 3)))


def test_gem_approaches_max_for_large_p():
    x = positive_map(dtype=torch.float64)
    peak = x.amax((2, 3))
    errors = []
    for p in (10.0, 100.0, 1000.0):
        out = GeM(p=p).double()(x)
        # (mean x^p)^(1/p) lies in [max * (1/HW)^(1/p), max]
        assert (out <= peak + 1e-12).all() and (out >= peak * 20 ** (-1 / p) - 1e-12).all()
        errors.append((peak - out).abs().max().item())
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.004


def test_gem_clamps_zeros_and_negatives_to_eps():
    x = torch.zeros(1, 2, 3, 3)
    x[0, 1] = -5.0
    x[0, 1, 1, 1] = 2.0
    x.requires_grad_(True)
    gem = GeM()
    out = gem(x)
    torch.testing.assert_close(out[0, 0], torch.tensor(1e-6))
    torch.testing.assert_close(out[0, 1], torch.tensor(((2.0**3 + 8 * 1e-18) / 9) ** (1 / 3)))
    out.sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(gem.p.grad).all()


def test_gem_gradients_by_gradcheck():
    gem = GeM(p=2.5).double()
    x = positive_map(seed=1, dtype=torch.float64).requires_grad_(True)
    p = gem.p

    def fn(x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        return x.clamp(min=gem.eps).pow(p).mean((2, 3)).pow(1.0 / p)

    assert torch.equal(fn(x, p), gem(x))
    assert torch.autograd.gradcheck(lambda x: gem(x), (x,))
    assert torch.autograd.gradcheck(lambda q: fn(x.detach(), q), (p.detach().clone().requires_grad_(True),))
    # the module's own parameter gets the analytic d/dp of its output
    gem(x.detach()).sum().backward()
    q = p.detach().clone().requires_grad_(True)
    fn(x.detach(), q).sum().backward()
    torch.testing.assert_close(p.grad, q.grad)


def test_gem_options_and_errors():
    fixed = GeM(learnable=False)
    assert not list(fixed.parameters()) and "p" in dict(fixed.named_buffers())
    with pytest.raises(ValueError, match="GeM exponent p must be positive, got 0"):
        GeM(p=0)
    with pytest.raises(ValueError, match="pooling must be one of avg, gem, got 'max'"):
        global_pool("max")
    with pytest.raises(ValueError, match="pooling must be one of avg, gem, got 'max'"):
        SEResNeXt((1, 1, 1, 1), pooling="max")


def test_gem_variant_trains_p_in_fp32_with_bf16_body_and_checkpointing():
    """The pooling path of the ``*_gem`` backbones (excluded from test_backbones.py's per-backbone loop), on
    a one-block-per-stage SE-ResNeXt at 64x64 (a 2x2 final map: over one value GeM ignores p)."""
    torch.manual_seed(0)
    plain = SEResNeXt((1, 1, 1, 1), pooling="gem").train()
    ckpt = SEResNeXt((1, 1, 1, 1), pooling="gem", grad_checkpoint=True).train()
    ckpt.load_state_dict(plain.state_dict())
    for model in (plain, ckpt):  # an affine BN1d: in train mode it would cancel p's batch-wide effect
        model.features.eval()
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    out_plain, out_ckpt = plain(x), ckpt(x)
    torch.testing.assert_close(out_ckpt, out_plain)
    (out_plain * torch.linspace(-1, 1, 512)).sum().backward()
    (out_ckpt * torch.linspace(-1, 1, 512)).sum().backward()
    for (name, p1), (_, p2) in zip(plain.named_parameters(), ckpt.named_parameters(), strict=True):
        assert p1.grad.abs().sum() > 0, name
        assert_close_scaled(p2.grad, p1.grad, rtol=KERNEL_RTOL, msg=name)  # measured bit-identical
    assert plain.global_pool.p.grad.abs() > 1e-3
    # a bf16 body hands the pool an fp32 map (GeM's cube would overflow fp16)
    low = SEResNeXt((1, 1, 1, 1), pooling="gem", precision="bf16").eval()
    low.load_state_dict(plain.state_dict())
    seen = []
    low.global_pool.register_forward_hook(lambda m, i, o: seen.append((i[0].dtype, o.dtype)))
    with torch.no_grad():
        out = low(x)
    assert seen == [(torch.float32, torch.float32)] and out.dtype == torch.float32
    # and an enclosing autocast (the trainer's) leaves the pool, FC and BN1d in fp32 too
    plain.eval().embedding.register_forward_hook(lambda m, i, o: seen.append((i[0].dtype, o.dtype)))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert plain.forward_features(x).dtype == torch.bfloat16
        out = plain(x)
    assert seen[-1] == (torch.float32, torch.float32) and out.dtype == torch.float32


# --- ResFace64 ------------------------------------------------------------------------------------


def config(*overrides: str):
    return load_config(ROOT / "configs" / "base.yaml", list(overrides))


def resface64_params(size: int, d: int) -> int:
    """Closed form: 64 convs 3x3 without bias, each with a BN; fc without bias; BN1d."""
    widths, units = (64, 128, 256, 512), (3, 8, 16, 3)
    opening = sum(9 * cin * c + 2 * c for cin, c in zip((3, *widths[:-1]), widths, strict=True))
    residual = sum(2 * n * (9 * c * c + 2 * c) for n, c in zip(units, widths, strict=True))
    return opening + residual + 512 * (size // 16) ** 2 * d + 2 * d


def test_resface64_from_the_config_at_96():
    """``model.input_size: 96`` reaches the network (the embedders resize the stored crops to it)."""
    cfg = config("model.backbone=resface64", "model.input_size=96", "model.embedding_size=256")
    torch.manual_seed(0)
    model = train.build_model(cfg)
    assert isinstance(model, ResFace) and model.precision == "fp16"  # base.yaml
    assert model.input_size == 96 and model.embedding_size == 256 and model.conv_final_dim == 512 * 6 * 6
    assert model.fc.in_features == 512 * 6 * 6
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 64
    assert [m.stride for m in convs if m.stride != (1, 1)] == [(2, 2)] * 4
    assert all(m.eps == 1e-3 for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
    assert n_params(model) == resface64_params(96, 256) == 41_909_056
    residual = torch.cat([m.conv1.conv.weight.flatten() for m in model.layer3[1:]])
    assert (
        residual.abs().max() <= 0.02 and abs(residual.std().item() - 0.0088) < 0.0005
    )  # N(0, .01) cut at 2σ
    model.precision = "fp32"
    with torch.no_grad():
        x = torch.randn(1, 3, 96, 96, generator=torch.Generator().manual_seed(1))
        embedding, conv_final = model.eval()(x, return_features=True)
    assert embedding.shape == (1, 256) and conv_final.shape == (1, 512 * 6 * 6)
    assert build_backbone("resface64").input_size == 96  # ProbFace's crops by default
    with pytest.raises(ValueError, match="multiple of 16"):
        build_backbone("resface64", input_size=100)


def test_resface64_conv_final_interface():
    torch.manual_seed(0)
    model = build_backbone("resface64", input_size=16).eval()  # 1x1 final map: a cheap network
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        embedding, conv_final = model(x, return_features=True)
        fmap = model.forward_features(x)
        alone = model(x)
    assert fmap.shape == (3, 512, 1, 1) and conv_final.shape == (3, model.conv_final_dim) == (3, 512)
    torch.testing.assert_close(conv_final, fmap.flatten(1))
    torch.testing.assert_close(embedding, model.features(model.fc(conv_final)))
    assert embedding.shape == (3, 256) and torch.equal(alone, embedding)
    # under a reduced-precision body conv_final still comes back in fp32
    model.precision = "bf16"
    with torch.no_grad():
        emb16, final16 = model(x, return_features=True)
    assert final16.dtype == emb16.dtype == torch.float32
    # gradients reach the body through conv_final (an uncertainty module trained jointly)
    model.precision = "fp32"
    model.train()
    _, conv_final = model(x, return_features=True)
    conv_final.square().mean().backward()
    assert model.layer1[0].conv.weight.grad.abs().sum() > 0 and model.fc.weight.grad is None


# --- the framework around them --------------------------------------------------------------------


def test_train_builds_the_gem_variant_from_the_config():
    cfg = config("model.backbone=inception_resnet_v1_gem", "model.dropout=0.4", "model.grad_checkpoint=true")
    model = train.build_model(cfg)
    assert isinstance(model, InceptionResNetV1) and isinstance(model.global_pool, GeM)
    assert model.dropout.p == 0.4 and model.grad_checkpoint and model.precision == "fp16"
    assert not model.normalize_output and model.embedding_size == 512 and model.input_size == 112


def test_dry_run_through_train_py_with_resface64(tmp_path, capsys):
    """Faces stored at 32x32 (data.image_size) reach ResFace64 resized to model.input_size 16."""
    data = write_identity_folder(tmp_path / "faces", identities=4, per_identity=4, size=32)
    status = train.main(
        [
            "--config", str(ROOT / "configs" / "cpu_tiny.yaml"), "--set", f"data.root={data}",
            "data.image_size=32", "model.input_size=16", "data.batch_size=8", "data.num_workers=0",
            "model.backbone=resface64", "model.embedding_size=256", f"output_dir={tmp_path / 'run'}",
            "--dry-run",
        ]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert status == 0
    lines = dict(line.split(": ", 1) for line in out.splitlines() if ": " in line)
    assert lines["backbone"] == "resface64"
    assert lines["embedding"] == "[8, 256]"
    assert float(lines["parameters_M"]) == round(resface64_params(16, 256) / 1e6, 3)
    assert lines["steps"] == "2" and all(math.isfinite(float(v)) for v in lines["losses"][1:-1].split(","))


def test_onnx_export_of_inception_gem_matches_pytorch(tmp_path):
    torch.manual_seed(0)
    model = build_backbone("inception_resnet_v1_gem").eval()
    with torch.no_grad():
        model.global_pool.p.fill_(2.5)
    out = tmp_path / "model.onnx"
    export_onnx.export(TorchEmbedder(model), out, fold=False)
    # onnxruntime against PyTorch on the same normalised input, a batch size other than the export's
    x = torch.rand(3, 3, 112, 112, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        expected = model(x)
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(["embedding"], {"data": x.numpy()})[0])
    scale = float(expected.abs().max())
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * scale)
    # the graph pools with the model's p = 2.5: the same network pooling with p = 3 is ten times the
    # tolerance away, so the comparison above sees the exponent
    with torch.no_grad():
        model.global_pool.p.fill_(3.0)
        assert float((model(x) - got).abs().max()) > 10 * 1e-4 * scale
