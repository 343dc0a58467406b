from __future__ import annotations

import math

import pytest
import torch

from heads import build_head, list_heads
from heads.margin import EPS

S = 64.0
THETAS = [1e-3, 0.3, 1.2, 2.0, 2.9, math.pi - 1e-3]
NAMES = [
    "softmax",
    "cosface",
    "arcface",
    "combined",
    "curricularface",
    "magface",
    "adaface",
    "frabsm",
    "nfrabsm",
]


def angled(theta: float, norm: float = 30.0, dtype=torch.float64) -> torch.Tensor:
    """An embedding at angle theta from class 0's centre (the x axis) in the plane of classes 0 and 1."""
    return torch.tensor([[norm * math.cos(theta), norm * math.sin(theta)]], dtype=dtype)


def head(name: str, dtype=torch.float64, **kw) -> torch.nn.Module:
    h = build_head(name, embedding_size=2, num_classes=3, **kw).eval()
    with torch.no_grad():
        h.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]))
    return h.to(dtype)


def logits_at(h: torch.nn.Module, theta: float, norm: float = 30.0, dtype=torch.float64) -> torch.Tensor:
    return h(angled(theta, norm, dtype), torch.tensor([0]))[0]


def clamp_cos(theta: float) -> float:
    return min(max(math.cos(theta), -1 + EPS), 1 - EPS)


def assert_non_targets(out: torch.Tensor, theta: float, tol: float) -> None:
    assert out[1].item() == pytest.approx(S * math.sin(theta), abs=tol)
    assert out[2].item() == pytest.approx(S * -clamp_cos(theta), abs=tol)


def test_registry_names():
    assert set(NAMES) <= set(list_heads())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("theta", THETAS)
def test_closed_forms_at_known_angles(theta, dtype):
    tol = 2e-3 if dtype == torch.float32 else 1e-6
    c = clamp_cos(theta)
    t = math.acos(c)
    cases = {
        ("softmax", ()): c,
        ("cosface", (("m", 0.4),)): c - 0.4,
        ("arcface", ()): math.cos(t + 0.5),
        ("arcface", (("variant", "straight_through"),)): math.cos(t + 0.5),
        ("arcface", (("variant", "clip"),)): math.cos(min(t + 0.5, math.pi - 1e-3)),
        ("arcface", (("variant", "fallback"),)): math.cos(t + 0.5)
        if c > math.cos(math.pi - 0.5)
        else c - 0.5 * math.sin(0.5),
        ("arcface", (("variant", "fallback"), ("easy_margin", True))): math.cos(t + 0.5) if c > 0 else c,
        ("combined", (("m1", 1.0), ("m2", 0.3), ("m3", 0.2))): math.cos(t + 0.3) - 0.2,
        ("combined", (("m1", 0.9), ("m2", 0.0), ("m3", 0.0))): math.cos(0.9 * t),
    }
    for (name, kw), expected in cases.items():
        out = logits_at(head(name, dtype, **dict(kw)), theta, dtype=dtype)
        assert out[0].item() == pytest.approx(S * expected, abs=tol * S), (name, kw)
        assert_non_targets(out, theta, tol * S)


def test_combined_margin_reduces_to_cosface_and_arcface():
    for theta in THETAS[:-1]:
        e = angled(theta)
        y = torch.tensor([0])
        torch.testing.assert_close(
            head("combined", m1=1.0, m2=0.0, m3=0.4)(e, y), head("cosface", m=0.4)(e, y)
        )
        torch.testing.assert_close(
            head("combined", m1=1.0, m2=0.5, m3=0.0)(e, y), head("arcface", m=0.5)(e, y)
        )


@pytest.mark.parametrize("theta", [0.2, 1.0, 2.0])
def test_exact_and_straight_through_gradients_wrt_cos(theta):
    m = 0.5
    for variant, expected in (
        ("exact", S * math.sin(theta + m) / math.sin(theta)),
        ("straight_through", S),
    ):
        h = head("arcface", variant=variant)
        cos = torch.tensor([[math.cos(theta), 0.1, -0.2]], dtype=torch.float64, requires_grad=True)
        logit = S * h.margin(cos, torch.tensor([0]), torch.ones(1, dtype=torch.float64))[0, 0]
        logit.backward()
        assert cos.grad[0, 0].item() == pytest.approx(expected, rel=1e-9), variant
        assert cos.grad[0, 1:].abs().sum() == 0


@pytest.mark.parametrize(
    ("name", "kw", "reversal"),
    [
        ("arcface", {"variant": "exact"}, math.pi - 0.5),
        ("combined", {"m1": 1.0, "m2": 0.5, "m3": 0.0}, math.pi - 0.5),
        ("combined", {"m1": 1.2, "m2": 0.3, "m3": 0.1}, (math.pi - 0.3) / 1.2),
        ("arcface", {"variant": "fallback"}, None),
        ("arcface", {"variant": "straight_through"}, None),
    ],
)
def test_exact_margins_reverse_the_target_gradient_past_pi(name, kw, reversal):
    # d logit / d cos(theta_y) > 0 pulls a sample towards its centre; the exact forms flip it past the point
    # where the margined angle reaches pi (the documented reason for the fallback variants)
    h = head(name, **kw)
    for theta in (0.3, 1.5, 2.35, 2.5, 2.8, 3.0):
        cos = torch.tensor([[math.cos(theta), 0.1, -0.2]], dtype=torch.float64, requires_grad=True)
        h.margin(cos, torch.tensor([0]), torch.ones(1, dtype=torch.float64))[0, 0].backward()
        pulls = cos.grad[0, 0].item() > 0
        assert pulls == (reversal is None or theta < reversal), (theta, cos.grad[0, 0].item())


def test_curricularface_hard_negatives_and_t_update():
    h = head("curricularface")
    with torch.no_grad():
        h.t.fill_(0.3)
    theta = 1.2  # cos(theta + m) = cos(1.7) = -0.129; class 1 at sin(1.2) = 0.932 is hard, class 2 easy
    out = logits_at(h, theta)
    c1, c2 = math.sin(theta), -math.cos(theta)
    assert out[0].item() == pytest.approx(S * math.cos(theta + 0.5), abs=1e-6)
    assert out[1].item() == pytest.approx(S * c1 * (0.3 + c1), abs=1e-6)
    assert out[2].item() == pytest.approx(S * c2, abs=1e-6)
    h.train()
    h(torch.cat([angled(0.4), angled(1.0)]), torch.tensor([0, 0]))
    assert h.t.item() == pytest.approx(0.99 * 0.3 + 0.01 * (math.cos(0.4) + math.cos(1.0)) / 2, abs=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("norm", [5.0, 40.0, 200.0])
def test_magface_margin_and_regularizer(norm, dtype):
    h = head("magface", dtype)
    a = min(max(norm, 10.0), 110.0)
    m = 0.45 + (0.8 - 0.45) * (a - 10.0) / 100.0
    for theta in (0.5, 2.0):  # easy margin: only where cos > 0
        out = logits_at(h, theta, norm, dtype)
        expected = math.cos(theta + m) if math.cos(theta) > 0 else math.cos(theta)
        assert out[0].item() == pytest.approx(S * expected, abs=1e-6 if dtype == torch.float64 else 0.1)
    reg = h.regularizer(angled(0.3, norm, dtype))
    assert reg.item() == pytest.approx(
        35.0 * (a / 110.0**2 + 1.0 / a), rel=1e-9 if dtype == torch.float64 else 1e-5
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("name", "add_scale"), [("adaface", 1.0), ("frabsm", 0.7), ("nfrabsm", 1.0)])
@pytest.mark.parametrize("norm", [2.0, 20.0, 50.0, 500.0])
def test_adaface_family_closed_form(name, add_scale, norm, dtype):
    tol = 2e-3 if dtype == torch.float32 else 1e-6
    h = head(name, dtype)  # eval: buffers at their initial mu = 20, sigma = 100
    n = min(max(norm, 0.001), 100.0)
    z = min(max(0.333 * (n - 20.0) / (100.0 + 1e-3), -1.0), 1.0)
    for theta in (1e-3, 0.7, 2.5, math.pi - 1e-3):
        t = math.acos(clamp_cos(theta))
        expected = math.cos(min(max(t - 0.4 * z, 1e-3), math.pi - 1e-3)) - add_scale * 0.4 * (1 + z)
        out = logits_at(h, theta, norm, dtype)
        assert out[0].item() == pytest.approx(S * expected, abs=tol * S)
        assert_non_targets(out, theta, tol * S)


def test_adaface_ema_statistics():
    h = head("adaface").train()
    h(torch.cat([angled(0.3, 10.0), angled(0.3, 30.0)]), torch.tensor([0, 0]))
    assert h.batch_mean.item() == pytest.approx(0.99 * 20 + 0.01 * 20, abs=1e-9)
    assert h.batch_std.item() == pytest.approx(0.99 * 100 + 0.01 * math.sqrt(200), abs=1e-9)


@pytest.mark.parametrize(
    ("name", "kw"),
    [
        ("softmax", {}),
        ("cosface", {}),
        ("arcface", {}),
        ("arcface", {"variant": "clip"}),
        ("arcface", {"variant": "fallback"}),
        ("combined", {"m1": 0.9, "m2": 0.3, "m3": 0.1}),
        ("curricularface", {}),
        ("magface", {}),
        ("adaface", {}),
        ("frabsm", {}),
    ],
)
def test_gradcheck_float64(name, kw):
    torch.manual_seed(0)
    h = build_head(name, embedding_size=6, num_classes=5, s=4.0, **kw).double().eval()
    if name == "curricularface":
        h.t.fill_(0.2)
    emb = (torch.randn(4, 6, dtype=torch.float64) * 20).requires_grad_()
    weight = h.weight.detach().clone().requires_grad_()
    labels = torch.tensor([0, 3, 1, 4])

    norms = emb.detach().norm(dim=1, keepdim=True)

    def fn(e: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if name in ("adaface", "frabsm"):
            # AdaFace reads the norm detached (no gradient through the quality proxy by design): hold the
            # norm fixed so the numerical gradient sees only the direction, as the analytic one does.
            e = torch.nn.functional.normalize(e, dim=1) * norms
        return torch.func.functional_call(h, {"weight": w}, (e, labels))

    assert torch.autograd.gradcheck(fn, (emb, weight), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", NAMES)
def test_no_nan_at_cos_plus_minus_one_under_autocast(name, dtype):
    h = build_head(name, embedding_size=2, num_classes=3).train()
    with torch.no_grad():
        h.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]))
    # targets exactly on their centre (cos = 1) and exactly opposite (cos = -1)
    emb = torch.tensor([[30.0, 0.0], [-30.0, 0.0], [0.0, 5.0]], requires_grad=True)
    labels = torch.tensor([0, 0, 2])
    with torch.autocast("cpu", dtype=dtype):
        logits = h(emb, labels)
        loss = torch.nn.functional.cross_entropy(logits, labels)
    loss.backward()
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all() and torch.isfinite(loss)
    assert torch.isfinite(emb.grad).all() and torch.isfinite(h.weight.grad).all()


def test_buffers_round_trip_through_state_dict():
    for name, buffers in (("curricularface", ["t"]), ("adaface", ["batch_mean", "batch_std"])):
        a = build_head(name, embedding_size=4, num_classes=3).train()
        emb = torch.randn(6, 4, generator=torch.Generator().manual_seed(0)) * 10
        a(emb, torch.tensor([0, 1, 2, 0, 1, 2]))
        b = build_head(name, embedding_size=4, num_classes=3)
        b.load_state_dict(a.state_dict())
        for key in buffers:
            assert torch.equal(getattr(a, key), getattr(b, key)), key
        assert set(buffers) <= set(a.state_dict())


def test_bad_inputs_name_value_and_limit():
    h = build_head("arcface", embedding_size=4, num_classes=3)
    emb = torch.randn(2, 4, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"label 3 outside \[0, 3\)"):
        h(emb, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"label -1 outside \[0, 3\)"):
        h(emb, torch.tensor([-1, 0]))
    with pytest.raises(TypeError, match=r"labels must be int64 class ids, got torch\.float32"):
        h(emb, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"embeddings of shape \(2, 5\), expected \(N, 4\)"):
        h(torch.zeros(2, 5), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="NaN or inf"):
        h(torch.tensor([[float("nan")] * 4, [1.0] * 4]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="variant must be one of"):
        build_head("arcface", embedding_size=4, num_classes=3, variant="fast")


# -- initial class centres --------------------------------------------------------------------------------

# the initialisation of each head's reference implementation: arcface_torch partial_fc_v2.py and
# CurricularFace head/metrics.py draw N(0, 0.01); AdaFace head.py, FRABSM head.py and MagFace
# models/magface.py draw uniform(-1, 1) and renormalise every class to length 1
PEER_INIT = {
    "softmax": "normal_0.01",
    "cosface": "normal_0.01",
    "arcface": "normal_0.01",
    "combined": "normal_0.01",
    "curricularface": "normal_0.01",
    "magface": "unit",
    "adaface": "unit",
    "frabsm": "unit",
    "nfrabsm": "unit",
}


def kurtosis(x: torch.Tensor) -> float:
    x = x - x.mean()
    return float((x**4).mean() / (x**2).mean() ** 2)


def assert_centres_drawn(weight: torch.Tensor, init: str) -> None:
    """Row lengths and the shape of the entries' distribution (kurtosis 3 for a normal, 1.8 for a uniform)."""
    w = weight.detach().double()
    dim = w.shape[1]
    norms = w.norm(dim=1)
    if init == "unit":
        torch.testing.assert_close(norms, torch.ones_like(norms), rtol=1e-6, atol=1e-6)
        # every row is a uniform(-1, 1) vector divided by its length, close to sqrt(dim / 3)
        scaled = w * math.sqrt(dim / 3)
        assert scaled.abs().max() < 1.5  # a normal's extremes would reach 2.5
        assert kurtosis(scaled) == pytest.approx(1.8, abs=0.05)
    else:
        assert w.std().item() == pytest.approx(0.01, rel=0.02)
        assert abs(w.mean().item()) < 5 * 0.01 / math.sqrt(w.numel())
        assert norms.mean().item() == pytest.approx(0.01 * math.sqrt(dim), rel=0.02)
        assert kurtosis(w) == pytest.approx(3.0, abs=0.1)


@pytest.mark.parametrize("name", NAMES)
def test_default_centre_init_is_the_reference_implementations(name):
    torch.manual_seed(0)
    h = build_head(name, embedding_size=128, num_classes=400)
    assert h.init == PEER_INIT[name]
    assert_centres_drawn(h.weight, PEER_INIT[name])


@pytest.mark.parametrize(
    ("name", "init"), [("arcface", "unit"), ("adaface", "normal_0.01"), ("nfrabsm", "normal_0.01")]
)
def test_centre_init_can_be_chosen(name, init):
    torch.manual_seed(1)
    h = build_head(name, embedding_size=128, num_classes=400, init=init)
    assert_centres_drawn(h.weight, init)


def test_unknown_centre_init_is_refused():
    with pytest.raises(ValueError, match=r"AdaFace: init must be one of normal_0.01, unit, got 'xavier'"):
        build_head("adaface", embedding_size=4, num_classes=3, init="xavier")


# -- FRABSM heads against the FRABSM repository's own definition --------------------------------------------


def frabsm_repository_logits(
    embeddings: torch.Tensor, labels: torch.Tensor, kernel: torch.Tensor, state: dict, add_factor: float
) -> torch.Tensor:
    """The FRABSM repository's head.py forward, written from its definition (Xkf0/FRABSM): first commit
    a420194 (class SmaFace, additive term m + m z) and, from commit c708290 on, that term times 0.7. The
    embedding arrives normalised with its norm beside it; ``kernel`` is E x C; ``state`` holds the EMA
    statistics, updated in place at every call."""
    m, h, s, t_alpha, eps = 0.4, 0.333, 64.0, 0.01, 1e-3
    norms = embeddings.norm(dim=1, keepdim=True)
    cosine = (embeddings / norms) @ (kernel / kernel.norm(dim=0, keepdim=True))
    cosine = cosine.clamp(-1 + eps, 1 - eps)
    safe_norms = norms.clamp(0.001, 100).detach()
    state["mean"] = safe_norms.mean() * t_alpha + (1 - t_alpha) * state["mean"]
    state["std"] = safe_norms.std() * t_alpha + (1 - t_alpha) * state["std"]
    scaler = ((safe_norms - state["mean"]) / (state["std"] + eps) * h).clamp(-1, 1)
    onehot = torch.zeros_like(cosine).scatter_(1, labels.view(-1, 1), 1.0)
    theta = cosine.acos()
    cosine = (theta + onehot * (-m * scaler)).clamp(eps, math.pi - eps).cos()
    cosine = cosine - onehot * (m + m * scaler) * add_factor
    return cosine * s


@pytest.mark.parametrize(("name", "add_factor"), [("nfrabsm", 1.0), ("frabsm", 0.7)])
def test_frabsm_heads_equal_the_repository_definition(name, add_factor):
    g = torch.Generator().manual_seed(3)
    h = build_head(name, embedding_size=16, num_classes=9).double().train()
    state = {"mean": torch.tensor(20.0, dtype=torch.float64), "std": torch.tensor(100.0, dtype=torch.float64)}
    for step in range(3):  # the EMA statistics move from step to step: the margins must follow them
        labels = torch.randint(0, 9, (12,), generator=g)
        embeddings = torch.randn(12, 16, generator=g, dtype=torch.float64) * (5 + 10 * step)
        expected = frabsm_repository_logits(embeddings, labels, h.weight.detach().T, state, add_factor)
        cos = torch.nn.functional.normalize(embeddings) @ torch.nn.functional.normalize(h.weight.detach()).T
        assert cos.abs().max() < 1 - 1e-3  # the repository clamps cos to 1 -+ 1e-3, we to 1 -+ 1e-7
        out = h(embeddings, labels)
        torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10 * S)
        torch.testing.assert_close(h.batch_mean, state["mean"].reshape(()), rtol=1e-12, atol=0.0)
        torch.testing.assert_close(h.batch_std, state["std"].reshape(()), rtol=1e-12, atol=0.0)
