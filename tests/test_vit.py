"""Vision Transformers: arcface_torch's layout, settings and outputs; attention; the backbone contract
(gradients, determinism, precision, checkpointing, export); layer-wise lr decay; recipes; a tiny run that
learns through train.py.

The big sizes are only built on the meta device (shapes without memory or initialisation); the forward
passes run ``vit_t`` (19 M parameters) or the CPU size ``vit_xs``.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import train
from backbones import BACKBONES, build_backbone
from backbones.converters import ConversionError, convert
from backbones.vit import SIZES, Attention, DropPath, VisionTransformer
from core.checkpoint import load_checkpoint
from core.config import OptimConfig, ScheduleConfig, load_config
from core.optim import build_optimizer, build_scheduler
from core.registry import ConfigError
from data.verification import load_bin
from evaluation.embedders import TorchEmbedder
from evaluation.extract import extract
from evaluation.verification import evaluate_pairs, fuse_flip
from scripts import bench_backbones, export_onnx
from tests.conftest import assert_close_scaled
from tests.synthetic_faces import write_identity_folder, write_pairs_bin

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "backbones"
REFERENCE = json.loads((FIXTURES / "arcface_torch_vit.json").read_text())
LAYOUTS, SETTINGS = REFERENCE["layouts"], REFERENCE["settings"]
EMBEDDINGS = REFERENCE["embeddings"]["vit_t"]
# Embeddings computed with another summation order (the reference's explicit softmax attention vs the fused
# kernel, another machine's kernels) were measured within 1.2e-6 (eval) and 1.3e-5 (train mode, BN over 4
# images) of their largest |value|; a wrong layer order, norm or mask placement moves them by O(1).
KERNEL_RTOL = 1e-4


def _reference_tools():
    spec = importlib.util.spec_from_file_location(
        "make_reference_shapes", FIXTURES / "make_reference_shapes.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


REF = _reference_tools()


def meta_model(name: str) -> nn.Module:
    with torch.device("meta"):
        return build_backbone(name)


def layout(model: nn.Module) -> list[list]:
    return [[key, list(value.shape)] for key, value in model.state_dict().items()]


def vit_t(**kw) -> VisionTransformer:
    torch.manual_seed(0)
    return build_backbone("vit_t", **kw)


def batch(n: int = 4, size: int = 112, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# --- arcface_torch compatibility ------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_state_dict_layout_equals_arcface_torch(name):
    assert layout(meta_model(name)) == LAYOUTS[name]


def test_vit_l_is_arcface_torchs_large_setting():
    # arcface_torch's get_model has no plain vit_l; its one large ViT is vit_l_dp005_mask_005
    assert BACKBONES.get("vit_l") is BACKBONES.get("vit_l_dp005_mask_005")


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_settings_equal_arcface_torch(name):
    model, ref = meta_model(name), SETTINGS[name]
    block = model.blocks[0]
    assert [model.patch_size] * 2 == ref["patch_size"] and [model.input_size] * 2 == ref["img_size"]
    assert model.num_patches == ref["num_patches"] and model.embed_dim == ref["embed_dim"]
    assert len(model.blocks) == ref["depth"] and block.attn.num_heads == ref["num_heads"]
    assert block.mlp.fc1.out_features == ref["mlp_hidden"] and type(block.mlp.act).__name__ == ref["mlp_act"]
    assert (block.attn.qkv.bias is not None) == ref["qkv_bias"]
    assert [b.drop_path.rate for b in model.blocks] == pytest.approx(ref["drop_path"], rel=1e-6, abs=0)
    # the fraction arcface_torch's training drops: its forward_features masks with random_masking's default
    # 0.1 whatever positive ratio get_model passed (0.05 for the *_mask_005 settings), none with 0
    assert model.mask_ratio == (0.1 if ref["mask_ratio"] > 0 else 0.0)
    assert [m.eps for m in model.feature if isinstance(m, nn.BatchNorm1d)] == ref["feature_bn_eps"]
    assert model.norm.eps == ref["norm_eps"] and block.norm1.eps == ref["norm_eps"]


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_arcface_torch_shaped_weights_load_strictly(name):
    model = meta_model(name)
    state = {key: torch.empty(shape, device="meta") for key, shape in LAYOUTS[name]}
    result = model.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    del state[LAYOUTS[name][0][0]]
    with pytest.raises(RuntimeError, match="Missing key"):
        model.load_state_dict(state, strict=True)


@pytest.fixture(scope="module")
def reference_vit_t() -> VisionTransformer:
    """vit_t holding the synthetic weights the reference embeddings were recorded with."""
    model = vit_t()
    state = REF.synthetic_state_dict(LAYOUTS["vit_t"])
    result = model.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    loaded = model.state_dict()
    assert all(torch.equal(loaded[key], value) for key, value in state.items())
    return model


def test_eval_embeddings_equal_arcface_torch(reference_vit_t):
    """Same weights, same input -> the embeddings arcface_torch's code computed (eval mode, 112x112)."""
    with torch.no_grad():
        out = reference_vit_t.eval()(REF.synthetic_input())
    expected = torch.tensor(EMBEDDINGS["eval"])
    assert F.cosine_similarity(expected[0], expected[1], dim=0) < 0.9  # the two images differ
    assert_close_scaled(out, expected, rtol=KERNEL_RTOL)


def test_train_mode_embeddings_equal_arcface_torch(reference_vit_t):
    """Train mode with the global generator seeded as the recording was: the same patches are dropped and
    the same residual branches skipped, the mask token takes the same places, BN uses batch statistics."""
    model = copy.deepcopy(reference_vit_t).train()  # train mode updates the BN running statistics
    x = REF.synthetic_input(REFERENCE["meta"]["train_batch"])
    with torch.no_grad():
        torch.manual_seed(REFERENCE["meta"]["train_seed"])
        out = model(x)
        torch.manual_seed(REFERENCE["meta"]["train_seed"] + 1)
        other_draw = model(x)
    expected = torch.tensor(EMBEDDINGS["train"])
    assert_close_scaled(out, expected, rtol=KERNEL_RTOL)
    assert (other_draw - expected).abs().max() > 100 * KERNEL_RTOL * expected.abs().max()


def test_arcface_torch_vit_model_pt_converts_to_a_checkpoint(reference_vit_t, tmp_path):
    # a model.pt saved from DDP, as arcface_torch's train_v2.py writes it
    state = {f"module.{k}": v for k, v in reference_vit_t.state_dict().items()}
    torch.save(state, tmp_path / "model.pt")
    out = convert("insightface", tmp_path / "model.pt", tmp_path / "ours.pt", "vit_t")
    ckpt = load_checkpoint(out)
    assert ckpt["meta"]["arch"] == "vit_t" and ckpt["meta"]["embedding_size"] == 512
    assert all(torch.equal(ckpt["backbone"][k], v) for k, v in reference_vit_t.state_dict().items())
    del state["module.feature.3.running_mean"]
    torch.save(state, tmp_path / "broken.pt")
    with pytest.raises(ConversionError, match=r"broken.pt: no features.running_mean or feature.3.running"):
        convert("insightface", tmp_path / "broken.pt", tmp_path / "x.pt", "vit_t")


# --- attention ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_attention_equals_explicit_softmax(dtype):
    torch.manual_seed(0)
    attn = Attention(dim=48, num_heads=6).to(dtype).eval()
    x = torch.randn(3, 11, 48, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = attn(x.to(dtype))
        # softmax(q k^T / sqrt(d)) v per head, in float64 from the module's weights
        q, k, v = (x @ attn.qkv.weight.double().T).reshape(3, 11, 3, 6, 8).permute(2, 0, 3, 1, 4)
        weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(8), dim=-1)
        heads = (weights @ v).transpose(1, 2).reshape(3, 11, 48)
        expected = heads @ attn.proj.weight.double().T + attn.proj.bias.double()
    assert_close_scaled(out.double(), expected, rtol=1e-12 if dtype == torch.float64 else 1e-5)


def test_drop_path_drops_whole_samples_in_training_only():
    torch.manual_seed(0)
    layer = DropPath(0.5).train()
    out = layer(torch.ones(64, 5, 3))
    per_sample = out.flatten(1)
    assert set(per_sample.unique().tolist()) == {0.0, 2.0}  # dropped, or kept and scaled by 1 / (1 - 0.5)
    assert (per_sample == per_sample[:, :1]).all()  # one draw per sample
    assert 16 < (per_sample[:, 0] == 0).sum() < 48
    assert torch.equal(layer.eval()(torch.ones(4, 5, 3)), torch.ones(4, 5, 3))


# --- the backbone contract ------------------------------------------------------------------------


def vit_xs(drop_path: float = 0.2, **kw) -> VisionTransformer:
    """The CPU size at 112 x 112 (144 tokens, 10% masked in training), with stochastic depth switched on
    (rates rising to ``drop_path``) so that the checks cover every random draw of the reference sizes."""
    torch.manual_seed(0)
    model = build_backbone("vit_xs", **kw)
    for i, block in enumerate(model.blocks):
        block.drop_path.rate = drop_path * i / (len(model.blocks) - 1)
    return model


def test_forward_backward_every_parameter_gets_a_gradient():
    model = vit_xs().train()
    torch.manual_seed(3)
    # 4 images: the train-mode BN1d of the head maps 2 images to +-1 and passes almost no gradient
    out = model(batch(4))
    assert out.shape == (4, 512) and out.dtype == torch.float32 and torch.isfinite(out).all()
    (out * torch.linspace(-1, 1, 512)).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{name} has an all-zero gradient"


def test_without_masking_only_the_mask_token_is_unused():
    model = vit_xs()
    model.mask_ratio = 0.0  # arcface_torch's *_mask0 settings: the mask token is never used
    torch.manual_seed(3)
    model.train()(batch(4)).square().sum().backward()
    unused = [name for name, p in model.named_parameters() if p.grad is None]
    assert unused == ["mask_token"]


def test_patches_are_dropped_in_training_only():
    torch.manual_seed(0)
    model = VisionTransformer(embed_dim=32, depth=1, num_heads=2, mask_ratio=0.05)  # keeps int(144 x 0.95)
    seen = []
    model.blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
    x = batch(3)
    with torch.no_grad():
        tokens = model.train().forward_features(x)
        assert seen == [136]
        # after the final norm, each image has 144 - 136 mask tokens, at places of its own
        is_mask = (tokens == model.mask_token).all(dim=-1)
        assert is_mask.sum(dim=1).tolist() == [8, 8, 8]
        assert not torch.equal(is_mask[0], is_mask[1])
        tokens = model.eval().forward_features(x)
    assert seen == [136, 144]
    assert not (tokens == model.mask_token).all(dim=-1).any()


def test_eval_mode_is_deterministic_and_per_image():
    model = vit_xs().eval()
    x = batch(3)
    with torch.no_grad():
        a, b, single = model(x), model(x), model(x[1:2])
    assert torch.equal(a, b)
    assert_close_scaled(single[0], a[1], rtol=KERNEL_RTOL)
    assert F.cosine_similarity(a[0], a[1], dim=0) < 0.99


@pytest.mark.parametrize(("precision", "dtype"), [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_low_precision_blocks_return_fp32_close_to_fp32(precision, dtype):
    fp32 = vit_xs().eval()
    low = vit_xs(precision=precision).eval()
    low.load_state_dict(fp32.state_dict())
    seen = {}
    low.blocks[0].attn.qkv.register_forward_hook(lambda m, i, o: seen.update(qkv=o.dtype))
    low.feature[0].register_forward_hook(lambda m, i, o: seen.update(head_in=i[0].dtype, head_out=o.dtype))
    x = batch(2)
    with torch.no_grad():
        ref, out = fp32(x), low(x)
    assert seen == {"qkv": dtype, "head_in": torch.float32, "head_out": torch.float32}
    assert out.dtype == torch.float32 and not torch.equal(out, ref)
    cos = F.cosine_similarity(out, ref)
    assert (cos > 0.99).all(), cos


def test_embedding_head_stays_fp32_under_enclosing_autocast():
    model = vit_xs().eval()
    seen = {}
    model.feature[0].register_forward_hook(lambda m, i, o: seen.update(head_in=i[0].dtype, head_out=o.dtype))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(batch(2))
    assert seen == {"head_in": torch.float32, "head_out": torch.float32} and out.dtype == torch.float32


def test_grad_checkpoint_equals_plain_forward_backward():
    plain = vit_xs().train()
    ckpt = copy.deepcopy(plain)
    ckpt.grad_checkpoint = True
    calls = []
    ckpt.blocks[3].register_forward_pre_hook(lambda *_: calls.append(1))
    x = batch(4)
    outs = []
    for model in (plain, ckpt):
        torch.manual_seed(11)  # the same patches dropped, the same branches skipped
        outs.append(model(x))
        outs[-1].square().mean().backward()
    torch.testing.assert_close(outs[1], outs[0])
    assert len(calls) == 2  # forward, then the recomputation in backward (same stochastic depth draw)
    for (name, p1), (_, p2) in zip(plain.named_parameters(), ckpt.named_parameters(), strict=True):
        assert_close_scaled(p2.grad, p1.grad, rtol=KERNEL_RTOL, msg=name)


def test_return_features_gives_the_tokens_the_head_reads():
    model = build_backbone("vit_xs", embedding_size=64, input_size=112).eval()
    with torch.no_grad():
        embedding, tokens = model(batch(2), return_features=True)
        assert tokens.shape == (2, model.conv_final_dim) == (2, 144 * 96)
        torch.testing.assert_close(model.feature(tokens), embedding)


def test_input_size_embedding_size_and_bad_options():
    model = build_backbone("vit_xs", input_size=64, embedding_size=128).eval()
    assert model.num_patches == 49 and model.feature[0].in_features == 49 * 96  # 64 // 9 = 7 per side
    with torch.no_grad():
        assert model(batch(2, size=64)).shape == (2, 128)
    with pytest.raises(ValueError, match=r"input of \(112, 112\) pixels; this ViT was built for 64x64"):
        model(batch(2))
    with pytest.raises(ValueError, match="input_size must be at least the patch size 9"):
        build_backbone("vit_xs", input_size=8)
    with pytest.raises(ValueError, match="precision must be one of fp32, fp16, bf16"):
        build_backbone("vit_xs", precision="half")
    with pytest.raises(ValueError, match=r"mask_ratio must be in \[0, 1\)"):
        VisionTransformer(32, 1, 2, mask_ratio=1.0)


def test_onnx_export_equals_pytorch(tmp_path):
    torch.manual_seed(0)
    model = build_backbone("vit_xs", embedding_size=128).eval()
    out = tmp_path / "vit.onnx"
    export_onnx.export(TorchEmbedder(model, "rgb"), out, fold=False)
    x = batch(3, seed=4)  # a batch size other than the one exported with
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = session.run(None, {"data": x.numpy()})[0]
    with torch.no_grad():
        expected = model(x).numpy()
    assert got.shape == (3, 128)
    # two engines whose kernels sum in different orders; measured within 1e-6 of the largest |value|
    assert_close_scaled(np.asarray(got), expected, rtol=5e-5)


def test_bench_counts_attention_and_every_matrix_product():
    """The benchmark's count of vit_xs equals the multiply-accumulates written out layer by layer."""
    size = SIZES["vit_xs"]
    d, length, hidden = size.embed_dim, 144, 4 * size.embed_dim
    per_block = length * d * 3 * d + 2 * length * length * d + length * d * d + 2 * length * d * hidden
    expected = length * d * 3 * 81 + size.depth * per_block + length * d * d + d * 512
    torch.manual_seed(0)
    assert bench_backbones.forward_macs(build_backbone("vit_xs"), 112) == expected


# --- layer-wise learning-rate decay ---------------------------------------------------------------


def test_layer_decay_scales_each_layer_and_the_schedule_keeps_the_ratios():
    model = build_backbone("vit_xs", input_size=32)  # depth 4: layers 0 (embeddings) .. 5 (norm + head)
    head = nn.Linear(8, 8)
    cfg = OptimConfig(name="adamw", lr=1e-3, weight_decay=0.1, layer_decay=0.5, no_decay_bn_bias=True)
    optimizer = build_optimizer(cfg, [model, head])
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    wd_of = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    expected = {
        "pos_embed": 0.5**5, "mask_token": 0.5**5, "patch_embed.proj.weight": 0.5**5,
        "blocks.0.attn.qkv.weight": 0.5**4, "blocks.1.mlp.fc2.weight": 0.5**3, "blocks.3.norm1.bias": 0.5,
        "norm.weight": 1.0, "feature.0.weight": 1.0, "feature.3.bias": 1.0,
    }  # fmt: skip
    params = dict(model.named_parameters())
    for name, scale in expected.items():
        assert lr_of[id(params[name])] == pytest.approx(1e-3 * scale), name
    assert lr_of[id(head.weight)] == 1e-3
    assert (
        wd_of[id(params["blocks.3.norm1.bias"])] == 0.0
        and wd_of[id(params["blocks.0.attn.qkv.weight"])] == 0.1
    )
    assert sorted(lr_of) == sorted(id(p) for p in [*model.parameters(), *head.parameters()])  # each once
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(lr_of)
    assert optimizer.param_groups[0]["lr"] == 1e-3  # the group the log reports holds the full rate
    scheduler = build_scheduler(
        optimizer, ScheduleConfig(warmup_epochs=1.0), steps_per_epoch=4, total_steps=12
    )
    for _ in range(6):
        optimizer.step()
        scheduler.step()
    factor = optimizer.param_groups[0]["lr"] / 1e-3
    assert 0 < factor < 1
    for group in optimizer.param_groups:
        assert group["lr"] == pytest.approx(1e-3 * factor * group["lr_scale"])


def test_layer_decay_sets_the_size_of_adamw_steps():
    """AdamW's first step moves each weight by its group's lr (m / sqrt(v) = +-1): block 0 of 4 at 0.5^4."""
    torch.manual_seed(0)
    model = build_backbone("vit_xs", input_size=32).train()
    cfg = OptimConfig(name="adamw", lr=1e-2, weight_decay=0.0, layer_decay=0.5)
    optimizer = build_optimizer(cfg, [model])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model(batch(4, size=32)).square().mean().backward()
    optimizer.step()
    for name, scale in (
        ("blocks.0.attn.qkv.weight", 0.5**4),
        ("blocks.3.mlp.fc1.weight", 0.5),
        ("feature.0.weight", 1),
    ):
        p = dict(model.named_parameters())[name]
        moved = (p.detach() - before[name]).abs()[p.grad.abs() > 1e-12]
        assert moved.numel() > 0
        assert moved.max().item() == pytest.approx(1e-2 * scale, rel=1e-3), name


def test_without_layer_decay_the_groups_are_unchanged():
    model = build_backbone("vit_xs", input_size=32)
    optimizer = build_optimizer(OptimConfig(name="adamw", lr=1e-3), [model])
    assert len(optimizer.param_groups) == 1 and "lr_scale" not in optimizer.param_groups[0]
    assert len(optimizer.param_groups[0]["params"]) == len(list(model.parameters()))


def test_layer_decay_needs_a_backbone_with_layers():
    with pytest.raises(ConfigError, match=r"optim.layer_decay 0.75 needs a backbone that numbers its layers"):
        build_optimizer(OptimConfig(layer_decay=0.75), [build_backbone("mbf"), nn.Linear(2, 2)])
    with pytest.raises(ConfigError, match=r"optim.layer_decay must be a number in \(0, 1\]"):
        load_config(ROOT / "configs" / "base.yaml", ["optim.layer_decay=1.5"])


# --- recipes --------------------------------------------------------------------------------------

# arcface_torch's configs (recognition/arcface_torch/configs/<file>.py): network, batch per GPU,
# gradient_acc, sample_rate, num_epoch, warmup_epoch (num_epoch // 10, or // 8 for vit_h); every one:
# CosFace (margin_list (1.0, 0.0, 0.4), s 64), AdamW lr 0.001, weight_decay 0.1, fp16, embedding 512.
ARCFACE_TORCH = {
    "vit_t_wf42m_8gpu": ("wf42m_pfc03_40epoch_8gpu_vit_t", "vit_t_dp005_mask0", 512, 1, 0.3, 40, 4),
    "vit_b_wf42m_8gpu": ("wf42m_pfc03_40epoch_8gpu_vit_b", "vit_b_dp005_mask_005", 256, 12, 0.3, 40, 4),
    "vit_t_wf42m_64gpu": ("wf42m_pfc03_40epoch_64gpu_vit_t", "vit_t_dp005_mask0", 384, 1, 0.3, 40, 4),
    "vit_s_wf42m_64gpu": ("wf42m_pfc03_40epoch_64gpu_vit_s", "vit_s_dp005_mask_0", 384, 1, 0.3, 40, 4),
    "vit_b_wf42m_64gpu": ("wf42m_pfc03_40epoch_64gpu_vit_b", "vit_b_dp005_mask_005", 384, 1, 0.3, 40, 4),
    "vit_l_wf42m_64gpu": ("wf42m_pfc03_40epoch_64gpu_vit_l", "vit_l_dp005_mask_005", 384, 1, 0.3, 40, 4),
    "vit_h_wf42m": ("wf42m_pfc02_vit_h", "vit_h", 768, 1, 0.5, 16, 2),
}


def test_every_vit_recipe_is_listed():
    assert sorted(p.stem for p in (ROOT / "configs" / "recipes").glob("vit_*.yaml")) == sorted(ARCFACE_TORCH)


@pytest.mark.parametrize("recipe", sorted(ARCFACE_TORCH))
def test_vit_recipes_follow_arcface_torch(recipe):
    source, network, batch_size, accumulation, sample_rate, epochs, warmup = ARCFACE_TORCH[recipe]
    path = ROOT / "configs" / "recipes" / f"{recipe}.yaml"
    assert f"configs/{source}.py" in path.read_text()  # the header cites the file it follows
    cfg = load_config(path)
    assert (cfg.model.backbone, cfg.data.batch_size, cfg.optim.grad_accum) == (
        network,
        batch_size,
        accumulation,
    )
    assert (cfg.head.name, cfg.head.params, cfg.head.sample_rate) == (
        "cosface",
        {"s": 64.0, "m": 0.4},
        sample_rate,
    )
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.betas) == (
        "adamw",
        1e-3,
        0.1,
        [0.9, 0.999],
    )
    assert not cfg.optim.no_decay_bn_bias and cfg.optim.layer_decay == 1.0
    # arcface_torch clips the sum of the accumulated gradients at norm 5; train.py clips their mean
    assert cfg.optim.grad_clip == pytest.approx(5.0 / accumulation, rel=1e-6)
    assert (cfg.schedule.name, cfg.schedule.power, cfg.schedule.warmup_epochs) == ("polynomial", 1.0, warmup)
    assert cfg.train.epochs == epochs and cfg.model.embedding_size == 512 and cfg.model.precision == "fp16"
    assert cfg.model.ddp_fp16_grads
    # arcface_torch's get_model turns gradient checkpointing on for vit_b, vit_l and vit_h
    assert cfg.model.grad_checkpoint == SETTINGS[network]["using_checkpoint"]
    assert (ROOT / "scripts" / f"train_{recipe}.sh").read_text().count(f'train_recipe.sh" {recipe} ') == 1


@pytest.fixture(scope="module")
def faces(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("synthetic")
    return {
        "train": write_identity_folder(root / "train", identities=40, per_identity=16),
        "val": write_pairs_bin(root / "val" / "lfw.bin", pairs=200).parent,
    }


def test_vit_t_recipe_steps_with_its_backbone_and_layer_decay(faces, capsys):
    sets = [
        f"data.root={faces['train']}", "data.val_root=", "data.image_size=32", "data.batch_size=8",
        "data.num_workers=0", "model.precision=fp32", "optim.layer_decay=0.75",
    ]  # fmt: skip
    status = train.main(
        ["--config", str(ROOT / "configs/recipes/vit_t_wf42m_8gpu.yaml"), "--set", *sets, "--dry-run"]
    )
    out = capsys.readouterr()
    assert status == 0, out.err
    report = dict(line.split(": ", 1) for line in out.out.splitlines() if ": " in line)
    assert report["backbone"] == "vit_t_dp005_mask0"
    losses = [float(v) for v in report["losses"].strip("[]").split(",")]
    assert len(losses) == 2 and all(0 < v < math.log(40) + 3.02 * 64 for v in losses)


def test_a_tiny_vit_learns_to_verify_unseen_identities(faces, tmp_path):
    out = tmp_path / "run"
    settings = [
        f"data.root={faces['train']}", f"output_dir={out}", f"data.val_root={faces['val']}",
        "data.image_size=32", "data.num_workers=0", "model.embedding_size=64", "train.epochs=4",
        "train.val_every=40",
    ]  # fmt: skip
    assert train.main(["--config", str(ROOT / "configs" / "vit_cpu_tiny.yaml"), "--set", *settings]) == 0
    val = load_bin(faces["val"] / "lfw.bin")
    torch.manual_seed(2048)  # the run's experiment.seed: the network it started from
    untrained = build_backbone("vit_xs", embedding_size=64, input_size=32).eval()
    chance = evaluate_pairs(fuse_flip(*extract(TorchEmbedder(untrained), val.images, 100)), val.issame)[
        "accuracy"
    ]

    log = (out / "train.log").read_text()
    assert "vit_xs + cosface" in log
    accuracies = [
        float(line.split("lfw ")[1].split("±")[0]) for line in log.splitlines() if "validation" in line
    ]
    losses = [float(line.split(" loss ")[1].split()[0]) for line in log.splitlines() if " loss " in line]
    assert len(accuracies) == 2  # steps 40 and 80 (the end)
    assert accuracies[-1] >= 80.0 and accuracies[-1] >= chance * 100 + 15, (chance, log)
    assert losses[-1] < losses[0] / 4, log
