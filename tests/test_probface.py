"""ProbFace: the uncertainty module, its loss, fusion and risk-controlled verification against direct
computations; training through train.py on a frozen backbone; and, on real faces, sigma^2 rising for
blurred and down-sampled copies of faces after a short training on a pretrained MobileFaceNet."""

from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import train
from backbones import build_backbone
from core.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from core.config import ConfigError, load_config
from data.decode import decode_rgb
from data.transforms import normalize_batch
from data.verification import load_bin
from evaluation.embedders import load_embedder
from losses.probface import attention_distance
from mining import PKSampler
from objectives.probface import build_uncertainty
from probface import fusion, plot, risk
from probface.embedder import extract_uncertain, load_probface
from probface.loss import ProbFaceLoss
from probface.model import BETA_INIT, GAMMA_INIT, ProbFaceNet, UncertaintyModule, conv_final_size
from tests.synthetic_faces import write_identity_folder, write_pairs_bin
from validation_ijb.protocol import template_features

ROOT = Path(__file__).resolve().parent.parent
PROBFACE = str(ROOT / "configs" / "recipes" / "probface.yaml")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny networks on one thread: a busy machine's spinning threads cost several times the work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------- module


def test_uncertainty_module_shapes_initial_affine_and_formula():
    torch.manual_seed(0)
    scalar, per_dim = UncertaintyModule(40, "scalar"), UncertaintyModule(40, "per_dim", embedding_size=6)
    assert (scalar.gamma.item(), scalar.beta.item()) == pytest.approx((0.1, -1.0))
    assert (per_dim.gamma.item(), per_dim.beta.item()) == pytest.approx((0.1, -7.0))
    assert not per_dim.bn2.affine and per_dim.fc1.bias is None and per_dim.fc2.bias is None
    x = torch.randn(10, 40, dtype=torch.float64)
    for module, outputs in ((scalar, 1), (per_dim, 6)):
        module = module.double()
        with torch.no_grad():  # random running statistics and affine, then the formula by hand (eval mode)
            for bn in (module.bn1, module.bn2):
                bn.running_mean.uniform_(-1, 1)
                bn.running_var.uniform_(0.5, 2)
            module.bn1.weight.uniform_(0.5, 2)
            module.gamma.fill_(0.7)
        module.eval()
        out = module(x)
        assert out.shape == (10, outputs)

        def bn(v, layer):
            v = (v - layer.running_mean) / torch.sqrt(layer.running_var + layer.eps)
            return v * layer.weight + layer.bias if layer.affine else v

        h = torch.relu(bn(x @ module.fc1.weight.T, module.bn1))
        z = bn(h @ module.fc2.weight.T, module.bn2)
        expected = torch.log(1e-6 + torch.exp(module.gamma * z + module.beta))
        torch.testing.assert_close(out, expected)
        huge = module(x * 1e4)  # log(1e-6 + exp(a)) stays finite where exp(a) overflows
        assert torch.isfinite(huge).all() and (huge >= math.log(1e-6) - 1e-6).all()
    with pytest.raises(ValueError, match="uncertainty kind must be one of scalar, per_dim"):
        UncertaintyModule(40, "vector")


def test_uncertainty_batchnorm_is_probfaces_epsilon_and_moving_average():
    """ProbFace's TensorFlow BNs: epsilon 1e-3, moving statistics m <- 0.995 m + 0.005 batch (decay 0.995),
    the variance starting at 1 and taking the unbiased batch variance as PyTorch does."""
    torch.manual_seed(0)
    module = UncertaintyModule(12, "per_dim", embedding_size=3).double().train()
    x = torch.randn(16, 12, dtype=torch.float64) * 3 + 1
    with torch.no_grad():
        h = x @ module.fc1.weight.T
        module(x)
    for bn in (module.bn1, module.bn2):
        assert bn.eps == pytest.approx(1e-3)
    torch.testing.assert_close(module.bn1.running_mean, 0.005 * h.mean(0), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(module.bn1.running_var, 0.995 + 0.005 * h.var(0), rtol=1e-9, atol=1e-12)
    module.eval()
    with torch.no_grad():
        normalised = module.bn1(h)
    expected = (h - module.bn1.running_mean) / torch.sqrt(module.bn1.running_var + 1e-3)
    torch.testing.assert_close(normalised, expected * module.bn1.weight + module.bn1.bias)
    other = UncertaintyModule(12, bn_eps=1e-5, bn_momentum=0.1)  # PyTorch's defaults, as an option
    assert (other.bn2.eps, other.bn2.momentum) == (1e-5, 0.1)


def test_the_uncertainty_bn_momentum_comes_from_the_config():
    backbone = build_backbone("mbf", embedding_size=8, input_size=32)
    settings = ["model.backbone=mbf", "model.embedding_size=8", "model.input_size=32"]
    default = build_uncertainty(load_config(PROBFACE, settings), backbone)
    assert default.bn1.momentum == default.bn2.momentum == pytest.approx(0.005)
    short = build_uncertainty(
        load_config(PROBFACE, [*settings, "model.uncertainty_bn_momentum=0.1"]), backbone
    )
    assert short.bn1.momentum == short.bn2.momentum == pytest.approx(0.1)
    bad = load_config(PROBFACE, [*settings, "model.uncertainty_bn_momentum=0"])
    with pytest.raises(ConfigError, match=r"model.uncertainty_bn_momentum must be in \(0, 1\], got 0"):
        build_uncertainty(bad, backbone)


@pytest.mark.parametrize("arch", ["mbf", "r18"])
def test_backbones_return_their_last_map_with_the_embedding(arch):
    torch.manual_seed(0)
    model = build_backbone(arch, embedding_size=8, input_size=32).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        embedding, conv_final = model(x, return_features=True)
        torch.testing.assert_close(embedding, model(x))
        torch.testing.assert_close(conv_final, torch.flatten(model.forward_features(x), 1).float())
    assert conv_final.shape == (2, 512 * 2 * 2) == (2, conv_final_size(model, 32))


def test_a_backbone_without_its_feature_map_is_refused():
    class Plain(torch.nn.Module):
        def forward(self, x):
            return x

    with pytest.raises(ValueError, match=r"does not return its last feature map"):
        ProbFaceNet(Plain(), UncertaintyModule(4))


def probface_attention(mu: np.ndarray, s2: np.ndarray) -> np.ndarray:
    """The attention distance as ProbFace's release defines it (utils/tflib.py ``negative_MLS``): for a
    scalar sigma^2, 2 (1 - cos) / (1e-10 + s_i + s_j); per dimension, the MEAN over the dimensions of
    (mu_id - mu_jd)^2 / (1e-10 + s_id + s_jd)."""
    if s2.shape[1] == 1:
        return 2 * (1 - mu @ mu.T) / (1e-10 + s2 + s2.T)
    return np.mean((mu[:, None] - mu[None]) ** 2 / (1e-10 + s2[:, None] + s2[None]), axis=2)


def probface_semi_hard(a: np.ndarray, labels: np.ndarray, margin: float) -> float:
    """ProbFace's ``triplet_semihard_loss`` (TensorFlow's): for each anchor a and positive p != a, the
    smallest d(a, n) > d(a, p) over negatives n, else the largest d(a, n); the sum of
    max(0, margin + d(a, p) - d(a, n)) over the positive pairs divided by their number."""
    n = len(labels)
    total, positives = 0.0, 0
    for i in range(n):
        negatives = a[i, labels != labels[i]]
        for p in range(n):
            if p == i or labels[p] != labels[i]:
                continue
            farther = negatives[negatives > a[i, p]]
            chosen = farther.min() if farther.size else negatives.max()
            total += max(0.0, margin + a[i, p] - chosen)
            positives += 1
    return total / positives


@pytest.mark.parametrize("kind", ["scalar", "per_dim"])
def test_probface_loss_against_a_direct_computation(kind):
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(4), 3)
    emb = rng.normal(size=(12, 5))
    log_s2 = rng.normal(-1 if kind == "scalar" else -3, 0.5, size=(12, 1 if kind == "scalar" else 5))
    loss = ProbFaceLoss(constraint_weight=0.01, triplet_weight=0.1)
    total = loss((torch.from_numpy(emb), torch.from_numpy(log_s2)), torch.from_numpy(labels))

    mu = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    s2 = np.exp(log_s2)
    mls = []
    for i in range(12):
        for j in range(12):
            t = s2[i] + s2[j]
            if i != j and labels[i] == labels[j]:
                if kind == "scalar":
                    mls.append(2 * (1 - mu[i] @ mu[j]) / t[0] + np.log(t[0]))
                else:
                    mls.append(np.mean((mu[i] - mu[j]) ** 2 / t + np.log(t)))
    constraint = np.sum((s2 / s2.mean() - 1) ** 2)
    triplet = probface_semi_hard(probface_attention(mu, s2), labels, 3.0)
    assert 0.5 < triplet < 10  # the margin is active: the term has a gradient
    expected = np.mean(mls) + 0.01 * constraint + 0.1 * triplet
    assert float(total) == pytest.approx(expected, rel=1e-6, abs=1e-9 * abs(expected))
    assert loss.last_stats["triplet"] == pytest.approx(triplet, rel=1e-6)


def test_per_dimension_attention_is_the_mean_over_dimensions():
    """ProbFace's per-dimension attention distance averages over D: with equal variances in every dimension
    it is the scalar one divided by D. On 4 identities x 2 images in D = 256 with sigma^2 = 1e-3 (near the
    per-dimension module's initial e^-7) a sum over D made every distance about 1,000, the semi-hard term 0
    and its gradient 0; the mean gives distances of the order of the margin 3."""
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 256, generator=g, dtype=torch.float64)
    emb = centres.repeat_interleave(2, 0) + torch.randn(8, 256, generator=g, dtype=torch.float64)
    labels = torch.arange(4).repeat_interleave(2)
    log_s2 = torch.full((8, 256), math.log(1e-3), dtype=torch.float64, requires_grad=True)
    loss = ProbFaceLoss(mls_weight=0.0, constraint_weight=0.0, triplet_weight=1.0)
    term = loss((emb, log_s2), labels)
    mu = F.normalize(emb, dim=1).numpy()
    expected = probface_semi_hard(probface_attention(mu, np.full((8, 256), 1e-3)), labels.numpy(), 3.0)
    assert expected > 0.5
    assert float(term.detach()) == pytest.approx(expected, rel=1e-6)
    term.backward()
    assert log_s2.grad.abs().sum() > 0

    scalar = torch.from_numpy(np.exp(np.random.default_rng(2).normal(-1, 0.5, size=(8, 1))))
    torch.testing.assert_close(
        attention_distance(torch.from_numpy(mu), scalar.expand(8, 256)),
        attention_distance(torch.from_numpy(mu), scalar) / 256,
        rtol=1e-9,
        atol=1e-12,
    )


def test_the_triplet_term_reaches_sigma_only_unless_asked():
    """mu is detached in the triplet term as in ProbFace: the gradient of sigma^2 is the same either way,
    and mu receives one only with ``triplet_mu_gradient``."""
    g = torch.Generator().manual_seed(3)
    labels = torch.arange(4).repeat_interleave(3)
    grads = {}
    for mu_gradient in (False, True):
        emb = torch.randn(12, 6, generator=torch.Generator().manual_seed(4), requires_grad=True)
        log_s2 = torch.randn(12, 1, generator=g.manual_seed(5), requires_grad=True)
        loss = ProbFaceLoss(mls_weight=0.0, constraint_weight=0.0, triplet_weight=1.0,
                            triplet_mu_gradient=mu_gradient)  # fmt: skip
        loss((emb, log_s2), labels).backward()
        assert loss.last_stats["triplet"] > 0
        grads[mu_gradient] = (emb.grad, log_s2.grad.clone())
    assert grads[False][0] is None or not grads[False][0].any()
    assert grads[True][0].abs().sum() > 0
    torch.testing.assert_close(grads[False][1], grads[True][1], rtol=1e-6, atol=1e-9)


def test_only_the_uncertainty_learns_from_the_mls_term():
    torch.manual_seed(0)
    emb = torch.randn(8, 4, requires_grad=True)
    log_s2 = torch.zeros(8, 1, requires_grad=True)
    ProbFaceLoss(triplet_weight=0.0)((emb, log_s2), torch.arange(4).repeat_interleave(2)).backward()
    assert emb.grad is None or not emb.grad.any()  # mu is detached in L_MLS
    assert log_s2.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------- fusion


@pytest.mark.parametrize("temperature", [1.0, 0.5, 3.0])
def test_fusion_against_a_direct_computation(temperature):
    rng = np.random.default_rng(2)
    mu = rng.normal(size=(5, 8))
    mu /= np.linalg.norm(mu, axis=1, keepdims=True)
    for s2 in (rng.uniform(0.1, 2, size=(5, 1)), rng.uniform(0.1, 2, size=(5, 8))):
        w = (1 / s2) ** (1 / temperature)
        w /= w.sum(0)
        expected_mu = (w * mu).sum(0)
        expected_mu /= np.linalg.norm(expected_mu)
        got_mu, got_s2 = fusion.fuse(mu, s2, temperature)
        np.testing.assert_allclose(got_mu, expected_mu, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got_s2, (w * s2).sum(0), rtol=1e-5)
    one_mu, one_s2 = fusion.fuse(mu[:1], s2[:1])  # a template of one image is that image
    np.testing.assert_allclose(one_mu, mu[0], rtol=1e-5)
    np.testing.assert_allclose(one_s2, s2[0], rtol=1e-6)
    with pytest.raises(ValueError, match="positive, finite variances"):
        fusion.fuse(mu, np.zeros((5, 1)))


def test_template_fusion_and_the_ijb_pooling_weights_agree():
    rng = np.random.default_rng(3)
    mu = rng.normal(size=(30, 6)).astype(np.float32)
    mu /= np.linalg.norm(mu, axis=1, keepdims=True)
    s2 = rng.uniform(0.05, 1.5, size=(30, 1))
    templates = rng.integers(0, 7, size=30) * 10
    ids, fused_mu, fused_s2 = fusion.fuse_templates(mu, s2, templates, temperature=0.7)
    assert ids.tolist() == sorted(set(templates.tolist()))
    for t, i in enumerate(ids):
        members = templates == i
        expected = fusion.fuse(mu[members], s2[members], 0.7)
        np.testing.assert_allclose(fused_mu[t], expected[0], rtol=1e-6)
        np.testing.assert_allclose(fused_s2[t], expected[1], rtol=1e-6)
    # validation_ijb pools unit features weighted per image; one image per media gives the fused mu
    weights = fusion.image_weights(s2, temperature=0.7)
    assert weights.max() == pytest.approx(1.0)
    pooled_ids, pooled = template_features(mu, templates, np.arange(30), weights)
    assert pooled_ids.tolist() == ids.tolist()
    np.testing.assert_allclose(pooled, fused_mu, rtol=1e-5, atol=1e-6)


def test_pair_scores_closed_form():
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(6, 4)), rng.normal(size=(6, 4))
    sa, sb = rng.uniform(0.1, 1, size=(6, 1)), rng.uniform(0.1, 1, size=(6, 1))
    ua, ub = a / np.linalg.norm(a, axis=1, keepdims=True), b / np.linalg.norm(b, axis=1, keepdims=True)
    cos = np.sum(ua * ub, axis=1)
    np.testing.assert_allclose(fusion.cosine_scores(a, b), cos, rtol=1e-9)
    t = (sa + sb)[:, 0]
    np.testing.assert_allclose(fusion.mls_scores(a, sa, b, sb), -(2 * (1 - cos) / t + np.log(t)), rtol=1e-9)


# -------------------------------------------------------------------------------------- risk control


def contiguous_folds(n: int) -> list[np.ndarray]:
    """Test masks of 10 contiguous folds, the first n % 10 one longer (sklearn's KFold without shuffling,
    as ProbFace's utils.KFold and the .bin protocol make them)."""
    sizes = [n // 10 + (1 if k < n % 10 else 0) for k in range(10)]
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    masks = [np.zeros(n, dtype=bool) for _ in range(10)]
    for k in range(10):
        masks[k][bounds[k] : bounds[k + 1]] = True
    return masks


def direct_ten_fold(dist: np.ndarray, same: np.ndarray, thresholds) -> float:
    """Threshold by brute force on the other folds, the first best, "same" when dist < threshold."""
    accuracies = []
    for test in contiguous_folds(len(same)):
        candidates = thresholds(dist[~test])
        train_acc = [np.mean((dist[~test] < t) == same[~test]) for t in candidates]
        best = candidates[int(np.argmax(train_acc))]
        accuracies.append(np.mean((dist[test] < best) == same[test]))
    return float(np.mean(accuracies))


def probface_ten_fold(score: np.ndarray, same: np.ndarray) -> float:
    """ProbFace's verification (evaluation/verification_risk.py ``calculate_roc`` with metrics.accuracy):
    on the other folds every genuine pair's score is a candidate, "same" when score >= candidate, the
    threshold is the mean of all candidates of the best accuracy; applied alike to the held-out fold."""
    accuracies = []
    for test in contiguous_folds(len(same)):
        candidates = np.sort(score[~test][same[~test]])
        train_acc = np.array([np.mean((score[~test] >= t) == same[~test]) for t in candidates])
        threshold = np.mean(candidates[train_acc == train_acc.max()])
        accuracies.append(np.mean((score[test] >= threshold) == same[test]))
    return float(np.mean(accuracies))


def test_probface_threshold_is_the_mean_of_the_best_genuine_scores():
    # genuine 0.9, 0.8, 0.5, impostors 0.6, 0.2: candidates 0.5 and 0.8 both classify 4 of 5 right
    scores, same = np.array([0.9, 0.6, 0.8, 0.2, 0.5]), np.array([True, False, True, False, True])
    assert risk.probface_threshold(scores, same) == pytest.approx(0.65)
    assert risk.probface_threshold(scores[~same], same[~same]) == np.inf  # no genuine pair: all "different"


def test_risk_controlled_accuracy_against_a_direct_reimplementation():
    rng = np.random.default_rng(5)
    pairs, d = 240, 16
    sigma = rng.uniform(0.05, 1.0, size=(2 * pairs, 1))
    same = np.arange(pairs) % 2 == 0
    first = rng.normal(size=(pairs, d))
    second = np.where(same[:, None], first, rng.normal(size=(pairs, d)))
    mu = np.empty((2 * pairs, d))
    mu[0::2] = first + rng.normal(size=(pairs, d)) * sigma[0::2]  # noise grows with sigma
    mu[1::2] = second + rng.normal(size=(pairs, d)) * sigma[1::2]
    mu /= np.linalg.norm(mu, axis=1, keepdims=True)
    s2 = sigma**2
    rows = risk.risk_controlled(mu, s2, same, (0.0, 0.1, 0.2, 0.3), "max")
    bin_rows = risk.risk_controlled(mu, s2, same, (0.0, 0.1, 0.2, 0.3), "max", thresholds="bin")
    u = np.maximum(s2[0::2, 0], s2[1::2, 0])
    grid = lambda _: np.arange(0, 4, 0.01)  # noqa: E731 - the .bin protocol's thresholds

    def midpoints(train_dist):
        v = np.unique(train_dist)
        return np.concatenate([[v[0] - 1], (v[:-1] + v[1:]) / 2, [v[-1] + 1]])

    differs = 0
    for row, bin_row in zip(rows, bin_rows, strict=True):
        keep = u <= np.percentile(u, 100 * (1 - row["risk"]))
        assert row["pairs"] == bin_row["pairs"] == keep.sum()
        a, b = mu[0::2][keep], mu[1::2][keep]
        t = s2[0::2, 0][keep] + s2[1::2, 0][keep]
        cosine = np.sum(a * b, axis=1)
        mls = -(2 * (1 - cosine) / t + np.log(t))
        assert row["cosine_accuracy"] == pytest.approx(probface_ten_fold(cosine, same[keep]), abs=1e-12)
        assert row["mls_accuracy"] == pytest.approx(probface_ten_fold(mls, same[keep]), abs=1e-12)
        bin_cosine = direct_ten_fold(np.sum((a - b) ** 2, axis=1), same[keep], grid)
        assert bin_row["cosine_accuracy"] == pytest.approx(bin_cosine, abs=1e-12)
        bin_mls = direct_ten_fold(-mls, same[keep], midpoints)
        assert bin_row["mls_accuracy"] == pytest.approx(bin_mls, abs=1e-12)
        differs += row["cosine_accuracy"] != bin_row["cosine_accuracy"]
    assert differs  # the two rules are not the same rule
    assert [r["pairs"] for r in rows] == [240, 216, 192, 168]
    assert rows[-1]["cosine_accuracy"] > rows[0]["cosine_accuracy"]  # refusing uncertain pairs helps
    np.testing.assert_array_equal(risk.pair_uncertainty(s2, "sum"), s2[0::2, 0] + s2[1::2, 0])
    per_dim = rng.uniform(0.1, 1.0, size=(8, 3))  # one u per pair: a per-dimension sigma^2 by its mean
    expected_u = np.maximum(per_dim[0::2].mean(1), per_dim[1::2].mean(1))
    np.testing.assert_allclose(risk.pair_uncertainty(per_dim), expected_u, rtol=1e-12)
    assert risk.sigma2_percentiles(s2)["p50"] == pytest.approx(np.median(s2))


# ------------------------------------------------------------------------------- training, train.py


@pytest.fixture(scope="module")
def faces(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("probface")
    return {
        "train": write_identity_folder(root / "train", identities=12, per_identity=8, seed=5),
        "val": write_pairs_bin(root / "val" / "lfw.bin", pairs=40).parent,
        "root": root,
    }


def set_bn_statistics(model: torch.nn.Module, images: torch.Tensor) -> None:
    """Replace every BN layer's running mean and variance with those of ``images`` (one train-mode pass,
    cumulative averages), leaving the weights as they are."""
    layers = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None  # cumulative average: exactly the statistics of this batch
    model.train()
    with torch.no_grad():
        model(images)
    model.eval()


def last_maps(model: torch.nn.Module, images: np.ndarray) -> torch.Tensor:
    with torch.no_grad():
        return model(normalize_batch(torch.from_numpy(images), "rgb", 32), return_features=True)[1]


@pytest.fixture(scope="module")
def pretrained(faces) -> Path:
    """A recognition checkpoint of this framework: 24 ArcFace steps (4 epochs) of MobileFaceNet (32-d,
    32x32), its BN statistics then set from the 96 training faces. A few steps leave BN's running statistics
    near their initial 0 / 1, with which the evaluation-mode activations of this network vanish (every face
    gave the same last map, variance ~1e-12); with the faces' statistics each face has its own map."""
    out = faces["root"] / "arcface"
    settings = [f"data.root={faces['train']}", f"output_dir={out}", "data.image_size=32"]
    settings += ["data.batch_size=16", "data.num_workers=0", "model.embedding_size=32", "train.max_steps=24"]
    assert train.main(["--config", str(ROOT / "configs" / "cpu_tiny.yaml"), "--set", *settings]) == 0
    state = load_checkpoint(out / "last.pt")
    model = build_backbone("mbf", embedding_size=32, input_size=32)
    model.load_state_dict(state["backbone"])
    files = sorted(faces["train"].glob("*/*.jpg"))
    images = np.stack([decode_rgb(f.read_bytes(), str(f)).transpose(2, 0, 1) for f in files])
    set_bn_statistics(model, normalize_batch(torch.from_numpy(images), "rgb", 32))
    maps = last_maps(model, load_bin(faces["val"] / "lfw.bin").images)
    assert float(maps.var(0).mean()) > 0.1 * float(maps.pow(2).mean())  # the faces' maps differ
    save_checkpoint(out / "last.pt", {**state, "backbone": model.state_dict()})
    return out / "last.pt"


def probface_settings(faces: dict[str, Path], out: Path, pretrained: Path, *extra: str) -> list[str]:
    return [
        f"data.root={faces['train']}", f"output_dir={out}", "data.image_size=32", "data.num_workers=0",
        "model.backbone=mbf", "model.embedding_size=32", "model.input_size=32", "data.batch_size=16",
        f"model.pretrained={pretrained}", "train.epochs=4", "train.max_steps=0", "train.log_every=1",
        "data.val_root=", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def probface_run(faces, pretrained) -> Path:
    """12 ProbFace steps through train.py on the frozen pretrained backbone, a checkpoint at step 8."""
    out = faces["root"] / "probface"
    settings = probface_settings(
        faces, out, pretrained, f"data.val_root={faces['val']}", "train.save_every=8"
    )
    assert train.main(["--config", PROBFACE, "--set", *settings]) == 0
    return out


def test_probface_trains_only_the_uncertainty_on_the_frozen_backbone(
    faces, pretrained, probface_run, tmp_path
):
    out, resumed = probface_run, tmp_path / "resumed"
    state, start = load_checkpoint(out / "last.pt"), load_checkpoint(pretrained)
    assert state["step"] == 12 and state["meta"]["uncertainty"] == "scalar" and state["head"] == {}
    assert state["backbone"].keys() == start["backbone"].keys()
    for key, value in start["backbone"].items():  # weights and BN statistics, bit for bit
        assert torch.equal(state["backbone"][key], value), key
    trained = [i for group in state["optimizer"]["param_groups"] for i in group["params"]]
    assert len(trained) == len(state["optimizer"]["state"]) == 6  # fc1, bn1 (2), fc2, gamma, beta only
    log = (out / "train.log").read_text()
    mls = [float(line.split(" mls ")[1].split()[0]) for line in log.splitlines() if " mls " in line]
    assert len(mls) == 12 and all(math.isfinite(v) for v in mls)
    # each face has its own map, so the module's normalised output z differs per face and its shared scale
    # gamma learns (z = 0 and no gradient to gamma if every face gave the same map)
    assert abs(float(state["uncertainty"]["gamma"]) - GAMMA_INIT) > 1e-5
    # the MLS term of a constant sigma2 over genuine pairs, mean of 2 (1 - cos) / (2 sigma2) + log(2 sigma2),
    # is least at sigma2* = mean (1 - cos): training moves the mean sigma2 from its start e^beta0 towards
    # the sigma2* of these frozen features (computed here from the training faces' unit embeddings)
    files = sorted(faces["train"].glob("*/*.jpg"))
    labels = np.array([f.parent.name for f in files])
    train_faces = np.stack([decode_rgb(f.read_bytes(), str(f)).transpose(2, 0, 1) for f in files])
    mu, sigma2 = load_probface(out / "last.pt")(torch.from_numpy(train_faces))
    cos = mu.double().numpy() @ mu.double().numpy().T
    genuine = (labels[:, None] == labels[None, :]) & ~np.eye(len(labels), dtype=bool)
    optimum, start = float((1.0 - cos[genuine]).mean()), math.exp(BETA_INIT["scalar"])
    assert optimum > start + 0.05  # the direction is known before training
    assert start + 0.02 < float(sigma2.mean()) < optimum

    # the embedder gives the backbone's unit mu and a positive sigma^2; resume equals no interruption
    embedder, plain = load_probface(out / "last.pt"), load_embedder(out / "last.pt")
    images = torch.from_numpy(load_bin(faces["val"] / "lfw.bin").images[:6])
    mu, sigma2 = embedder(images)
    torch.testing.assert_close(mu, F.normalize(plain(images), dim=1))
    assert sigma2.shape == (6, 1) and (sigma2 > 0).all()
    assert float(sigma2.std() / sigma2.mean()) > 0.01  # one sigma2 per face, not one for all
    again = probface_settings(faces, resumed, pretrained, "train.save_every=0")
    assert train.main(["--config", PROBFACE, "--set", *again, "--resume", str(out / "step_8.pt")]) == 0
    for key, value in state["uncertainty"].items():
        assert torch.equal(load_checkpoint(resumed / "last.pt")["uncertainty"][key], value), key


def test_risk_and_plot_commands_on_a_probface_checkpoint(faces, pretrained, probface_run, tmp_path, capsys):
    out = probface_run
    bin_path = faces["val"] / "lfw.bin"
    assert (
        risk.main(
            ["--model", str(out / "last.pt"), "--bin", str(bin_path), "--json", str(tmp_path / "r.json")]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "sigma^2 percentiles: p0" in printed and "cosine acc" in printed
    result = json.loads((tmp_path / "r.json").read_text())
    kept = [row["pairs"] for row in result["lfw"]["rows"]]
    assert kept[0] == 40 and kept == sorted(kept, reverse=True) and kept[-1] < 40
    # the pairs' uncertainties u = max(sigma2_1, sigma2_2) are distinct, so a risk r keeps the pairs up to
    # the (1 - r) quantile of the 40 u: floor((1 - r) 39) + 1 of them
    _, per_image = extract_uncertain(load_probface(out / "last.pt"), load_bin(bin_path).images, flip=False)
    u = np.maximum(per_image[0::2, 0], per_image[1::2, 0])
    assert len(np.unique(u)) == 40
    risks = [row["risk"] for row in result["lfw"]["rows"]]
    assert kept == [math.floor(round((1 - r) * 39, 6)) + 1 for r in risks]
    # the numbers are those of the library function on the same features: by default each image alone
    # and ProbFace's thresholds, as its evaluation; --flip fuses the mirror image, --thresholds bin
    val = load_bin(bin_path)
    embedder = load_probface(out / "last.pt")
    mu, sigma2 = extract_uncertain(embedder, val.images, flip=False)
    assert result["lfw"]["rows"] == risk.risk_controlled(mu, sigma2, val.issame)
    assert result["settings"]["flip"] is False and result["settings"]["thresholds"] == "probface"
    argv = ["--model", str(out / "last.pt"), "--bin", str(bin_path), "--json", str(tmp_path / "f.json")]
    assert risk.main([*argv, "--flip", "--thresholds", "bin"]) == 0
    flipped = json.loads((tmp_path / "f.json").read_text())["lfw"]["rows"]
    mu, sigma2 = extract_uncertain(embedder, val.images, flip=True)
    assert flipped == risk.risk_controlled(mu, sigma2, val.issame, thresholds="bin")
    assert flipped != result["lfw"]["rows"]

    png = tmp_path / "faces.png"
    assert (
        plot.main(
            ["--model", str(out / "last.pt"), "--bin", str(bin_path), "--count", "4", "--out", str(png)]
        )
        == 0
    )
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    faces_with_repeats = val.images[[0, 1, 0, 2, 1]]  # a .bin repeats faces across its pairs
    np.testing.assert_array_equal(plot.distinct(faces_with_repeats), val.images[:3])
    assert risk.main(["--model", str(pretrained), "--bin", str(bin_path)]) == 2
    assert "holds no uncertainty module" in capsys.readouterr().err


def test_a_frozen_backbone_needs_a_matching_pretrained_checkpoint(faces, pretrained, tmp_path, capsys):
    settings = probface_settings(faces, tmp_path / "a", pretrained)
    assert train.main(["--config", PROBFACE, "--set", *settings, "model.pretrained="]) == 2
    assert "model.freeze_backbone needs model.pretrained" in capsys.readouterr().err
    cfg = load_config(
        PROBFACE, probface_settings(faces, tmp_path / "b", pretrained, "model.embedding_size=16")
    )
    with pytest.raises(CheckpointError, match=r"trained with embedding_size 32 \(this run: 16\)"):
        train.fit(cfg)


# ---------------------------------------------------------------------------------- real faces


def mobilefacenet_features(shared_data: Path):
    """The real MobileFaceNet ONNX as a frozen backbone: (embedding, flattened last conv map) of uint8
    RGB faces (N, 112, 112, 3); the map is the output of its last PReLU (512 x 7 x 7, before the GDC)."""
    onnx = pytest.importorskip("onnx")
    import onnxruntime

    model = onnx.load(str(shared_data / "models" / "onnx" / "mobilefacenet_paddle_128d.onnx"))
    last_map = [node for node in model.graph.node if node.op_type == "PRelu"][-1].output[0]
    model.graph.output.append(onnx.helper.make_tensor_value_info(last_map, onnx.TensorProto.FLOAT, None))
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    session = onnxruntime.InferenceSession(model.SerializeToString(), options, ["CPUExecutionProvider"])

    def run(images: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        x = (images[..., ::-1].astype(np.float32) - 127.5) / 127.5  # BGR, as the model was trained
        x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
        parts = [session.run(None, {"x": x[i : i + 32]}) for i in range(0, len(x), 32)]
        embedding = np.concatenate([p[0] for p in parts])
        conv_final = np.concatenate([p[1].reshape(len(p[1]), -1) for p in parts])
        return torch.from_numpy(embedding), torch.from_numpy(conv_final)

    return run


def low_resolution(image: np.ndarray, side: int) -> np.ndarray:
    small = cv2.resize(image, (side, side), interpolation=cv2.INTER_AREA)
    return cv2.resize(small, image.shape[:2][::-1], interpolation=cv2.INTER_LINEAR)


def test_sigma2_rises_for_degraded_faces(shared_data):
    """The uncertainty module learns, from the MLS loss alone, that faces the frozen network embeds
    unreliably are uncertain: trained for 24 steps on 16 CelebA identities (half of the crops down-sampled
    to 14-40 px and back), it gives 16 other people's faces a larger sigma^2 when Gaussian-blurred or
    down-sampled to 20 px than when clean, which the untrained module does not."""
    folders = sorted(p for p in (shared_data / "celeba_aligned112").iterdir() if p.is_dir())
    rng = np.random.default_rng(0)
    images, labels = [], []
    for label, folder in enumerate(folders[:16]):
        for path in sorted(folder.glob("*.jpg"))[:6]:
            image = decode_rgb(path.read_bytes(), str(path))
            images.append(low_resolution(image, int(rng.integers(14, 41))) if rng.random() < 0.5 else image)
            labels.append(label)
    clean = np.stack([decode_rgb(sorted(f.glob("*.jpg"))[0].read_bytes()) for f in folders[-16:]])
    blurred = np.stack([cv2.GaussianBlur(image, (0, 0), 3.0) for image in clean])
    small = np.stack([low_resolution(image, 20) for image in clean])

    features = mobilefacenet_features(shared_data)
    embedding, conv_final = features(np.stack(images))
    _, test_maps = features(np.concatenate([clean, blurred, small]))
    torch.manual_seed(0)
    module = UncertaintyModule(conv_final.shape[1], "scalar")
    loss_fn = ProbFaceLoss()  # MLS + output constraint + attention triplet, ProbFace's weights
    optimizer = torch.optim.SGD(module.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    labels_t = torch.tensor(labels)
    positions = {c: np.flatnonzero(np.array(labels) == c) for c in range(16)}

    def test_sigma2() -> torch.Tensor:
        module.eval()
        with torch.no_grad():
            return module(test_maps).exp().view(3, 16)

    before = test_sigma2()
    sampler, step = PKSampler(positions, p=8, k=4, seed=0, rank=0, world_size=1), 0
    while step < 24:
        sampler.set_epoch(step)
        for batch in sampler:
            module.train()
            loss = loss_fn((embedding[batch], module(conv_final[batch])), labels_t[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
    after = test_sigma2()
    for degraded in (1, 2):
        assert (after[degraded] > after[0]).float().mean() >= 0.9, after
        assert after[degraded].median() > 1.2 * after[0].median(), after
        assert (before[degraded] > before[0]).float().mean() < 0.75, before


def test_ijb_pooling_weights_from_a_probface_checkpoint(
    shared_data, probface_run, tmp_path, capsys, monkeypatch
):
    """probface.ijb writes one weight per face of face_tid_mid, (1/sigma^2) of the aligned face, which
    validation_ijb.evaluate takes as --weights: each template becomes normalise(sum over its media of the
    media's mean of w_i f_i) (an LFW-built IJB-C tree of 4 people)."""
    from probface import ijb
    from validation_ijb import evaluate, lfw_ijb
    from validation_ijb.meta import load_ijb

    tree = lfw_ijb.build(tmp_path / "ijb", shared_data / "lfw_color150", identities=4)
    model, weights, sigma2 = probface_run / "last.pt", tmp_path / "w.npy", tmp_path / "s2.npy"
    argv = ["--model", str(model), "--ijb-root", str(tree.root), "--out", str(weights), "--workers", "0"]
    assert ijb.main([*argv, "--sigma2", str(sigma2)]) == 0
    w, s2 = np.load(weights), np.load(sigma2)
    meta = load_ijb(tree.root, "ijbc")
    assert w.shape == (len(meta.names),) and s2.shape == (len(meta.names), 1)
    np.testing.assert_allclose(w, s2[:, 0].min() / s2[:, 0], rtol=1e-5)

    pooled = []  # the template features each evaluation scores
    pool = evaluate.template_features

    def recorded(*args, **kwargs):
        pooled.append(pool(*args, **kwargs))
        return pooled[-1]

    def direct(feats: np.ndarray, per_image: np.ndarray) -> np.ndarray:
        """N0D0F1 image features unit(f(x) + f(flip x)), weighted, averaged per media, summed, unit."""
        feats = feats / np.linalg.norm(feats, axis=1, keepdims=True)
        rows = []
        for template in sorted(set(meta.templates.tolist())):
            members = meta.templates == template
            media, weighted = meta.medias[members], feats[members] * per_image[members, None]
            total = sum(weighted[media == m].mean(0) for m in np.unique(media))
            rows.append(total / np.linalg.norm(total))
        return np.stack(rows)

    monkeypatch.setattr(evaluate, "template_features", recorded)
    cache = tmp_path / "cache"
    argv = ["--ijb-root", str(tree.root), "--workers", "0", "--modes", "N0D0F1"]
    with_model = [*argv, "--model", str(model), "--cache", str(cache)]
    assert evaluate.main([*with_model, "--weights", str(weights)]) == 0
    assert "N0D0F1" in capsys.readouterr().out
    (saved_path,) = cache.glob("*.npz")
    with np.load(saved_path) as saved:
        names, landmarks = saved["names"], saved["landmarks"]
        model_feats = saved["original"].astype(np.float64) + saved["flipped"]
    ids, pooled_w = pooled[0]
    assert ids.tolist() == sorted(set(meta.templates.tolist()))
    np.testing.assert_allclose(pooled_w, direct(model_feats, w), rtol=1e-5, atol=1e-5)

    # The tiny backbone gives nearly one feature for every real face and a short training nearly one
    # sigma^2, so the weights' effect shows on spread features and weights, re-scored from a features file.
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(2, len(names), 32)).astype(np.float32)
    spread = rng.uniform(0.05, 1.0, size=len(names))
    np.savez(tmp_path / "spread.npz", names=names, landmarks=landmarks, original=feats[0], flipped=feats[1])
    np.save(tmp_path / "spread_w.npy", spread)
    argv += ["--model", str(tmp_path / "spread.npz")]
    assert evaluate.main([*argv, "--weights", str(tmp_path / "spread_w.npy")]) == 0
    assert evaluate.main(argv) == 0
    (_, weighted), (_, plain) = pooled[1:]
    summed = feats.sum(0, dtype=np.float64)
    np.testing.assert_allclose(weighted, direct(summed, spread), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(plain, direct(summed, np.ones(len(names))), rtol=1e-5, atol=1e-5)
    assert np.abs(weighted - plain).max() > 0.05  # the weights moved the templates
