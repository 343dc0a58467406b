"""Backbones: insightface compatibility (layout, weights, embeddings), the numeric checks (gradients, eval
determinism, bf16, batch of two, gradient checkpointing, channels_last) on one member of each family, and
the shapes and gradient reach of the deeper IResNets on fake tensors."""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from backbones import build_backbone, list_backbones
from backbones.iresnet import IResNet
from core.registry import UnknownNameError
from tests.conftest import ShapesOnly, assert_close_scaled

FIXTURES = Path(__file__).parent / "fixtures" / "backbones"


def _load_reference_tools():
    """The fixture script, for the synthetic weights/input the recorded reference embeddings used."""
    spec = importlib.util.spec_from_file_location(
        "make_reference_shapes", FIXTURES / "make_reference_shapes.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


REF = _load_reference_tools()
LAYOUTS: dict[str, list] = json.loads((FIXTURES / REF.SHAPES_FILE).read_text())["layouts"]
EMBEDDINGS: dict[str, list] = json.loads((FIXTURES / REF.OUTPUTS_FILE).read_text())["embeddings"]

# mbf_large, ResFace64 and SE-ResNeXt run the numeric checks on 32x32 inputs (2x2 or 1x1 final maps) to keep
# this file fast, InceptionResNetV1 on 80x80 (it needs 75); r18 and mbf at the standard 112x112.
SMALL_INPUT = {"mbf_large": 32, "resface64": 32, "seresnext101_32x4d": 32, "inception_resnet_v1": 80}
# Pooling variants (``*_gem``) are their base network with GeM in place of the average pool: the checks below
# run on the base network, tests/test_backbones_extra.py checks the variants' pooling. The ViTs (``vit_*``)
# have their own file, tests/test_vit.py: the large sizes are too slow here, and their patch masking and
# stochastic depth draw random numbers in train mode, which the checks below do not reseed.
ALL = [name for name in list_backbones() if not name.endswith("_gem") and not name.startswith("vit_")]
# Embeddings computed two ways that differ only in the order of float32 sums (channels_last vs contiguous
# kernels, a batch of 1 vs 3, 1 to 4 threads, the AVX-512, AVX2 and SSE code paths of oneDNN, ATen and MKL)
# were measured to differ by up to 2.1e-5 of their largest |value| (resface64; inception_resnet_v1 1.6e-5,
# the IResNets 6.2e-6 at most). Near-zero elements carry that absolute error too, so the bound is relative
# to the largest |value|, at ~5x the measured spread; a layout or batching bug is orders of magnitude larger.
KERNEL_RTOL = 1e-4

# The numeric checks below (every parameter gets a finite, non-zero gradient; batch of two in train and eval
# mode; eval determinism; bf16 close to fp32; gradient checkpointing; channels_last) run on one member of each
# family, and on a second where the family's code takes another path:
# * IResNet: r18. r34, r50, r100 and r200 are the same IResNet class with more IBasicBlocks per stage
#   (DEPTHS): one forward loop over blocks(), no branch on the depth; r18 already holds both kinds of block
#   (the strided, widening first block of a stage with its downsample, and the plain one). That the deeper
#   ones are those blocks stacked in insightface's order is proved by
#   test_state_dict_layout_equals_insightface; that they build, map (N, 3, 112, 112) to (N, 512), give the
#   feature map and reach every parameter with the gradient, by test_deeper_iresnets_on_fake_tensors. What
#   could make depth matter numerically (the init scale, through the growth of activations) is the one
#   _init_weights of every depth, pinned by test_iresnet_init_follows_arcface_torch.
# * MobileFaceNet: mbf, and mbf_large, whose first stage is built by the other branch of
#   MobileFaceNet.__init__ (a Residual stack at width 256 instead of one grouped ConvBN).
# * SE-ResNeXt, InceptionResNetV1, ResFace: their one registered configuration each. seresnext101's depth is
#   what its bf16 check is about (backbones/seresnext.py, residual_bn_init).
NUMERIC = ["r18", "mbf", "mbf_large", "seresnext101_32x4d", "inception_resnet_v1", "resface64"]
DEEPER_IRESNETS = ["r34", "r50", "r100", "r200"]


def input_size(name: str) -> int:
    return SMALL_INPUT.get(name, 112)


def make(name: str, **kw) -> nn.Module:
    torch.manual_seed(0)
    if name in SMALL_INPUT:
        kw.setdefault("input_size", SMALL_INPUT[name])
    kw.setdefault("embedding_size", 512)  # the checks below assume 512; resface64's own default is 256
    return build_backbone(name, **kw)


def batch(name: str, n: int = 2, seed: int = 1) -> torch.Tensor:
    size = input_size(name)
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def calibrated(model: nn.Module, name: str) -> nn.Module:
    """Eval-mode model whose BN running statistics come from data (fresh ones let activations explode)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = None  # cumulative average: one pass stores that batch's statistics
    model.train()
    with torch.no_grad():
        model(batch(name, 8, seed=7))
    return model.eval()


@functools.cache
def _calibrated_state(name: str) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in calibrated(make(name), name).state_dict().items()}


def calibrated_model(name: str) -> nn.Module:
    """``calibrated(make(name), name)``, calibrated once per backbone for the tests that only read it."""
    model = make(name)
    model.load_state_dict(_calibrated_state(name))
    return model.eval()


def meta_model(name: str, **kw) -> nn.Module:
    """Backbone ``name`` on the meta device: its structure (keys, shapes, parameter count), no weights."""
    with torch.device("meta"):
        return build_backbone(name, **kw)


def is_buffer_key(key: str) -> bool:
    return key.endswith(("running_mean", "running_var", "num_batches_tracked"))


# --- insightface compatibility -------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_state_dict_layout_equals_insightface(name):
    assert name in ALL
    model = meta_model(name)  # the layout does not depend on the weights' values
    ours = [[k, list(v.shape)] for k, v in model.state_dict().items()]
    assert ours == LAYOUTS[name]
    # and load_state_dict accepts that layout with strict=True (no key renamed by a load hook)
    long_keys = ("num_batches_tracked",)
    state = {
        key: torch.empty(shape, device="meta", dtype=torch.long if key.endswith(long_keys) else torch.float32)
        for key, shape in LAYOUTS[name]
    }
    result = model.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys


# Real weights for one IResNet (r100 is r50's class with more blocks: its layout, and its strict load of that
# layout, are checked above) and both MobileFaceNets.
@pytest.mark.parametrize("name", ["r50", "mbf", "mbf_large"])
def test_insightface_shaped_weights_load_strictly(name):
    model = build_backbone(name)
    state = REF.synthetic_state_dict(LAYOUTS[name], seed=3)
    result = model.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    loaded = model.state_dict()
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key


# r50's embeddings are recorded too; r18 runs the same IResNet code (the same blocks and forward, fewer of
# them, see NUMERIC) and r50's layout is checked above, so r50's forward adds cost, not coverage.
@pytest.mark.parametrize("name", ["r18", "mbf"])
def test_embeddings_equal_insightface(name):
    """Same weights, same input -> the embeddings arcface_torch computed (eval mode, 112x112)."""
    model = build_backbone(name)
    model.load_state_dict(REF.synthetic_state_dict(LAYOUTS[name]), strict=True)
    with torch.no_grad():
        out = model.eval()(REF.synthetic_input())
    expected = torch.tensor(EMBEDDINGS[name])
    assert out.shape == expected.shape == (2, 512)
    # The recorded embeddings of the two images differ, so the input-dependent part is compared too.
    assert torch.nn.functional.cosine_similarity(expected[0], expected[1], dim=0) < 0.9
    # recorded on another machine, whose kernels sum in another order: measured within 3.7e-6 of the scale
    assert_close_scaled(out, expected, rtol=KERNEL_RTOL)


@pytest.mark.parametrize(
    ("name", "low", "high"),
    [("r50", 43.5e6, 43.7e6), ("r100", 65.1e6, 65.2e6), ("mbf", 2.0e6, 2.1e6)],
)
def test_parameter_counts(name, low, high):
    reference = sum(torch.Size(shape).numel() for key, shape in LAYOUTS[name] if not is_buffer_key(key))
    ours = sum(p.numel() for p in meta_model(name).parameters())
    assert ours == reference
    assert low < ours < high


# --- registry -------------------------------------------------------------------------------------


def test_registry_lists_all_backbones():
    assert {"r18", "r34", "r50", "r100", "r200", "mbf", "mbf_large"} <= set(ALL)


def test_unknown_backbone_lists_valid_names():
    with pytest.raises(
        UnknownNameError, match=r"unknown backbone 'r101'.*valid names: .*mbf, mbf_large, r100"
    ):
        build_backbone("r101")


# --- every family (NUMERIC) -----------------------------------------------------------------------


def test_every_backbone_is_checked_numerically_or_on_fake_tensors():
    assert sorted(NUMERIC + DEEPER_IRESNETS) == sorted(ALL)


@pytest.mark.parametrize("name", DEEPER_IRESNETS)
def test_deeper_iresnets_on_fake_tensors(name):
    """Shapes only (no values): see NUMERIC for why the numeric checks of r18 cover these."""
    fake = ShapesOnly(name)
    model = fake.model
    assert type(model) is IResNet
    assert (model.embedding_size, model.input_size) == (512, 112)
    model.train()
    embedding, conv_final = fake(fake.input(4, 112), return_features=True)
    assert embedding.shape == (4, 512) and embedding.dtype == torch.float32
    assert conv_final.shape == (4, 512 * 7 * 7) and conv_final.dtype == torch.float32
    assert fake.unreached_parameters(embedding) == []
    assert not model.features.weight.requires_grad  # the frozen BN1d scale (see the r18 test below)
    model.eval()
    assert fake(fake.input(1, 112)).shape == (1, 512)


@pytest.mark.parametrize("name", NUMERIC)
def test_forward_backward(name):
    model = make(name).train()
    # 4 samples: with 2, the train-mode BN1d of the embedding maps any input to +-1 and blocks gradients.
    out = model(batch(name, 4))
    assert out.shape == (4, 512) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    # A loss that depends on every output coordinate through the BN1d of the embedding.
    (out * torch.linspace(-1, 1, 512)).sum().backward()
    for pname, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"{name}: {pname} got no gradient"
            assert torch.isfinite(p.grad).all(), f"{name}: {pname} has a non-finite gradient"
            assert p.grad.abs().sum() > 0, f"{name}: {pname} has an all-zero gradient"
        else:
            assert p.grad is None


@pytest.mark.parametrize("name", NUMERIC)
def test_batch_of_two_in_train_and_eval_mode(name):
    model = make(name)
    x = batch(name, 2)
    model.train()
    out = model(x)
    assert out.shape == (2, 512) and torch.isfinite(out).all()
    assert not torch.equal(out[0], out[1])
    out.square().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
    # Eval needs running statistics that fit the weights: with arcface_torch's N(0, 0.1) init and fresh
    # statistics, r200's activations overflow in eval mode (the reference behaves the same).
    model = calibrated(model, name)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, 512) and torch.isfinite(out).all()
    assert not torch.equal(out[0], out[1])


@pytest.mark.parametrize("name", NUMERIC)
def test_eval_mode_is_deterministic(name):
    model = calibrated_model(name)
    x = batch(name, 3)
    with torch.no_grad():
        a, b = model(x), model(x)
        single = model(x[1:2])
    assert torch.equal(a, b)
    assert_close_scaled(single[0], a[1], rtol=KERNEL_RTOL)  # no cross-sample dependence


@pytest.mark.parametrize("name", NUMERIC)
def test_bf16_body_returns_fp32_close_to_fp32(name):
    fp32 = calibrated_model(name)
    low = make(name, precision="bf16").eval()
    low.load_state_dict(fp32.state_dict())
    x = batch(name)
    with torch.no_grad():
        ref, out = fp32(x), low(x)
    assert out.dtype == torch.float32
    assert not torch.equal(out, ref)  # the body really ran in reduced precision
    cos = torch.nn.functional.cosine_similarity(out, ref)
    assert (cos > 0.97).all(), cos


@pytest.mark.parametrize("name", NUMERIC)
def test_grad_checkpoint_matches_plain_forward_backward(name):
    plain = make(name).train()
    ckpt = copy.deepcopy(plain)
    ckpt.grad_checkpoint = True
    x = batch(name, 4)
    out_plain, out_ckpt = plain(x), ckpt(x)
    torch.testing.assert_close(out_ckpt, out_plain)
    out_plain.square().mean().backward()
    out_ckpt.square().mean().backward()
    # The recomputation runs the same kernels on the same batch (measured bit-identical on every backbone);
    # each gradient is held to its own scale, which a fixed atol would not be for small gradients.
    for (pname, p1), (_, p2) in zip(plain.named_parameters(), ckpt.named_parameters(), strict=True):
        if p1.requires_grad:
            assert_close_scaled(p2.grad, p1.grad, rtol=KERNEL_RTOL, msg=pname)
    # recomputation in backward must not fold the batch into the BN running statistics a second time
    for (bname, b1), (_, b2) in zip(plain.named_buffers(), ckpt.named_buffers(), strict=True):
        torch.testing.assert_close(b2, b1, msg=bname)


@pytest.mark.parametrize("name", NUMERIC)
def test_channels_last_gives_same_output(name):
    model = calibrated_model(name)
    x = batch(name)
    with torch.no_grad():
        ref = model(x)
        from_input = model(x.contiguous(memory_format=torch.channels_last))
        model = model.to(memory_format=torch.channels_last)
        both = model(x.contiguous(memory_format=torch.channels_last))
    assert_close_scaled(from_input, ref, rtol=KERNEL_RTOL)
    assert_close_scaled(both, ref, rtol=KERNEL_RTOL)


# --- options --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["r18", "mbf"])
def test_grad_checkpoint_recomputes_blocks_in_backward_only_when_training(name):
    model = make(name, grad_checkpoint=True)
    block = model.layer1[0] if name == "r18" else model.layers[2]
    calls = []
    # A pre-hook: recomputation stops as soon as the saved tensors are rebuilt, before forward hooks run.
    block.register_forward_pre_hook(lambda *_: calls.append(1))
    model.train()
    model(batch(name, 4)).sum().backward()
    assert len(calls) == 2  # forward + recomputation
    calls.clear()
    model.eval()
    with torch.no_grad():
        model(batch(name))
    assert len(calls) == 1


def test_iresnet_embedding_bn_scale_is_frozen_at_one():
    model = make("r18")
    assert not model.features.weight.requires_grad
    assert model.features.bias.requires_grad
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.1, weight_decay=5e-4)
    model.train()(batch("r18", 4)).square().mean().backward()
    opt.step()
    assert torch.equal(model.features.weight, torch.ones(512))


def test_iresnet_init_follows_arcface_torch():
    model = make("r18")
    conv_std = torch.cat([m.weight.flatten() for m in model.modules() if isinstance(m, nn.Conv2d)]).std()
    assert abs(conv_std.item() - 0.1) < 0.002
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.equal(m.weight, torch.ones_like(m.weight))
            assert torch.equal(m.bias, torch.zeros_like(m.bias))


def test_mobilefacenet_init_is_kaiming_fan_out():
    model = make("mbf")
    weight = model.conv_sep.layers[0].weight  # 1x1 conv 256 -> 512: fan_out = 512
    assert abs(weight.std().item() - (2 / 512) ** 0.5) < 0.002


def test_zero_init_residual_starts_each_block_as_its_shortcut():
    model = make("r18", zero_init_residual=True).eval()
    for block in model.blocks():
        assert torch.equal(block.bn3.weight, torch.zeros_like(block.bn3.weight))
        assert torch.equal(block.bn2.weight, torch.ones_like(block.bn2.weight))
    block = model.layer1[1]  # no downsample: the block is the identity
    x = torch.randn(2, 64, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(block(x), x)
    assert not torch.equal(make("r18").eval().layer1[1](x), x)


@pytest.mark.parametrize(("name", "size"), [("r18", 64), ("r50", 48), ("mbf", 64)])
def test_input_size_option(name, size):
    model = make(name, input_size=size).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1)))
    assert out.shape == (2, 512)
    if name.startswith("r"):
        assert model.fc.in_features == 512 * (size // 16) ** 2
    else:
        assert model.features.layers[0].layers[0].kernel_size == (size // 16, size // 16)


def test_embedding_size_option():
    model = make("r18", embedding_size=128).eval()
    with torch.no_grad():
        assert model(batch("r18")).shape == (2, 128)
        assert make("mbf", embedding_size=256).eval()(batch("mbf")).shape == (2, 256)


def test_fp16_body_returns_fp32_close_to_fp32():
    fp32 = calibrated(make("r18"), "r18")
    low = make("r18", precision="fp16").eval()
    low.load_state_dict(fp32.state_dict())
    x = batch("r18")
    with torch.no_grad():
        ref, out = fp32(x), low(x)
    assert out.dtype == torch.float32
    assert not torch.equal(out, ref)
    assert (torch.nn.functional.cosine_similarity(out, ref) > 0.99).all()


@pytest.mark.parametrize("name", ["r18", "mbf"])
def test_embedding_layer_stays_fp32_under_enclosing_autocast(name):
    model = make(name).eval()
    fc = model.fc if name == "r18" else model.features.layers[2]
    seen = {}
    fc.register_forward_hook(lambda m, i, o: seen.update(fc_in=i[0].dtype, fc_out=o.dtype))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(batch(name))
    assert seen == {"fc_in": torch.float32, "fc_out": torch.float32}
    assert out.dtype == torch.float32


@pytest.mark.parametrize("name", ["r18", "mbf"])
def test_dropout_acts_in_train_mode_only(name):
    model = make(name, dropout=0.5)
    x = batch(name, 4)
    model.train()
    assert not torch.equal(model(x), model(x))
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="multiple of 16"):
        build_backbone("r50", input_size=100)
    with pytest.raises(ValueError, match="multiple of 16"):
        build_backbone("mbf", input_size=100)
    with pytest.raises(ValueError, match="precision must be one of fp32, fp16, bf16"):
        build_backbone("mbf", precision="half")
    with pytest.raises(ValueError, match="precision must be one of fp32, fp16, bf16"):
        build_backbone("r18", precision="float16")
