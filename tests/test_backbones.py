from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from backbones import build_backbone, list_backbones
from core.registry import UnknownNameError

REFERENCE = json.loads(
    (Path(__file__).parent / "fixtures" / "backbones" / "insightface_state_dict_shapes.json").read_text()
)
# Small inputs keep the deep IResNets fast; r18 and MobileFaceNet (fixed 7x7 GDC) run at full 112.
INPUT_SIZE = {"r18": 112, "r34": 32, "r50": 32, "r100": 32, "r200": 32, "mbf": 112, "mbf_large": 112}


def make(name: str, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    if name.startswith("r") and "input_size" not in kw:
        kw["input_size"] = INPUT_SIZE[name]
    return build_backbone(name, **kw)


def calibrated(model: torch.nn.Module, name: str) -> torch.nn.Module:
    """Eval-mode model whose BN running statistics come from data (fresh ones let activations explode)."""
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = None  # cumulative average: one pass stores that batch's statistics
    model.train()
    with torch.no_grad():
        model(batch(name, 8, seed=7))
    return model.eval()


def batch(name: str, n: int = 2, seed: int = 1) -> torch.Tensor:
    size = INPUT_SIZE[name]
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def is_buffer_key(key: str) -> bool:
    return key.endswith(("running_mean", "running_var", "num_batches_tracked"))


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_state_dict_layout_equals_insightface(name):
    ours = [[k, list(v.shape)] for k, v in build_backbone(name).state_dict().items()]
    assert ours == REFERENCE[name]


@pytest.mark.parametrize("name", ["r50", "mbf"])
def test_insightface_shaped_weights_load_strictly(name):
    model = build_backbone(name)
    gen = torch.Generator().manual_seed(3)
    state = {
        key: torch.tensor(5) if key.endswith("num_batches_tracked") else torch.randn(shape, generator=gen)
        for key, shape in REFERENCE[name]
    }
    result = model.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    first_key = REFERENCE[name][0][0]
    assert torch.equal(model.state_dict()[first_key], state[first_key])


@pytest.mark.parametrize(("name", "low", "high"), [("r50", 43.5e6, 43.7e6), ("r100", 65.1e6, 65.2e6)])
def test_parameter_counts(name, low, high):
    reference = sum(torch.Size(shape).numel() for key, shape in REFERENCE[name] if not is_buffer_key(key))
    ours = sum(p.numel() for p in build_backbone(name).parameters())
    assert ours == reference
    assert low < ours < high


def test_registry_lists_all_backbones():
    assert set(list_backbones()) == {"r18", "r34", "r50", "r100", "r200", "mbf", "mbf_large"}


def test_unknown_backbone_lists_valid_names():
    with pytest.raises(UnknownNameError, match=r"unknown backbone 'r101'.*valid names: mbf, mbf_large, r100"):
        build_backbone("r101")


@pytest.mark.parametrize("name", sorted(INPUT_SIZE))
def test_forward_backward_every_backbone(name):
    assert name in list_backbones()
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


@pytest.mark.parametrize("name", sorted(INPUT_SIZE))
def test_eval_mode_is_deterministic(name):
    model = calibrated(make(name), name)
    x = batch(name, 3)
    with torch.no_grad():
        a, b = model(x), model(x)
        single = model(x[1:2])
    assert torch.equal(a, b)
    torch.testing.assert_close(single[0], a[1], rtol=1e-4, atol=1e-4)  # no cross-sample dependence


def test_iresnet_embedding_bn_scale_is_frozen_at_one():
    model = make("r18")
    assert not model.features.weight.requires_grad
    assert torch.equal(model.features.weight, torch.ones(512))


def test_embedding_size_option():
    model = make("r18", embedding_size=128).eval()
    with torch.no_grad():
        assert model(batch("r18")).shape == (2, 128)
    assert make("mbf", embedding_size=256).eval()(batch("mbf")).shape == (2, 256)


@pytest.mark.parametrize("name", ["r18", "mbf"])
def test_grad_checkpoint_matches_plain_forward_backward(name):
    plain = make(name).train()
    ckpt = copy.deepcopy(plain)
    ckpt.grad_checkpoint = True
    x = batch(name, 4)
    out_plain, out_ckpt = plain(x), ckpt(x)
    torch.testing.assert_close(out_ckpt, out_plain)
    out_plain.square().mean().backward()
    out_ckpt.square().mean().backward()
    for (pname, p1), (_, p2) in zip(plain.named_parameters(), ckpt.named_parameters(), strict=True):
        if p1.requires_grad:
            torch.testing.assert_close(p2.grad, p1.grad, rtol=1e-4, atol=1e-6, msg=pname)
    # recomputation in backward must not fold the batch into the BN running statistics a second time
    for (bname, b1), (_, b2) in zip(plain.named_buffers(), ckpt.named_buffers(), strict=True):
        torch.testing.assert_close(b2, b1, msg=bname)


@pytest.mark.parametrize("name", ["r18", "mbf"])
def test_channels_last_gives_same_output(name):
    model = calibrated(make(name), name)
    x = batch(name)
    with torch.no_grad():
        ref = model(x)
        model = model.to(memory_format=torch.channels_last)
        out = model(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_low_precision_body_returns_fp32_close_to_fp32(precision):
    fp32 = calibrated(make("r18"), "r18")
    low = make("r18", precision=precision).eval()
    low.load_state_dict(fp32.state_dict())
    x = batch("r18")
    with torch.no_grad():
        ref, out = fp32(x), low(x)
    assert out.dtype == torch.float32
    cos = torch.nn.functional.cosine_similarity(out, ref)
    assert (cos > 0.98).all(), cos
    assert not torch.equal(out, ref)  # the body really ran in reduced precision


def test_embedding_layer_stays_fp32_under_enclosing_autocast():
    model = make("r18").eval()
    seen = {}
    model.fc.register_forward_hook(lambda m, i, o: seen.update(fc_in=i[0].dtype, fc_out=o.dtype))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(batch("r18"))
    assert seen == {"fc_in": torch.float32, "fc_out": torch.float32}
    assert out.dtype == torch.float32


def test_dropout_acts_in_train_mode_only():
    model = make("r18", dropout=0.5)
    x = batch("r18")
    model.train()
    assert not torch.equal(model(x), model(x))
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="multiple of 16"):
        build_backbone("r50", input_size=100)
    with pytest.raises(ValueError, match="precision must be one of fp32, fp16, bf16"):
        build_backbone("mbf", precision="half")
