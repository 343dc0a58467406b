from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from losses import build_loss, list_losses
from losses.probface import attention_distance, attention_triplet_loss
from losses.softmax_losses import inverse_log_frequency_weights
from losses.triplet_loss import pairwise_distances

LOGITS = torch.tensor(
    [[2.0, 0.5, -1.0], [0.1, 0.2, 3.0], [1.0, 1.0, 1.0], [-2.0, 4.0, 0.0]], dtype=torch.float64
)
LABELS = torch.tensor([0, 2, 1, 0])


def ce_list() -> list[float]:
    out = []
    for row, y in zip(LOGITS.tolist(), LABELS.tolist(), strict=True):
        out.append(math.log(sum(math.exp(v) for v in row)) - row[y])
    return out


def test_registry():
    assert {"cross_entropy", "focal", "frabsm_weight", "triplet"} <= set(list_losses())


def test_weighted_cross_entropy_closed_form():
    ce = ce_list()
    w = [0.5, 2.0, 1.0]
    expected = sum(w[y] * c for y, c in zip(LABELS.tolist(), ce, strict=True)) / sum(
        w[y] for y in LABELS.tolist()
    )
    assert build_loss("cross_entropy", class_weights=w)(LOGITS, LABELS).item() == pytest.approx(expected)
    assert build_loss("cross_entropy")(LOGITS, LABELS).item() == pytest.approx(sum(ce) / 4)


def test_focal_closed_form_gamma_zero_and_weights_act():
    ce = ce_list()
    focal = [(1 - math.exp(-c)) ** 2 * c for c in ce]
    assert build_loss("focal", gamma=2.0)(LOGITS, LABELS).item() == pytest.approx(sum(focal) / 4)
    assert build_loss("focal", gamma=0.0)(LOGITS, LABELS).item() == pytest.approx(
        F.cross_entropy(LOGITS, LABELS).item(), abs=1e-12
    )
    a = build_loss("focal", class_weights=[1.0, 1.0, 5.0])(LOGITS, LABELS)
    b = build_loss("focal", class_weights=[5.0, 1.0, 1.0])(LOGITS, LABELS)
    assert a.item() != pytest.approx(b.item(), rel=1e-3)
    w = [1.0, 1.0, 5.0]
    expected = sum(w[y] * f for y, f in zip(LABELS.tolist(), focal, strict=True)) / sum(
        w[y] for y in LABELS.tolist()
    )
    assert a.item() == pytest.approx(expected)


def test_inverse_log_frequency_weights():
    counts = torch.tensor([10, 100, 1000])
    w = inverse_log_frequency_weights(counts)
    raw = [1 / math.log(1 + n) for n in (10, 100, 1000)]
    assert w.tolist() == pytest.approx([3 * r / sum(raw) for r in raw], rel=1e-6)
    assert w.sum().item() == pytest.approx(3.0)


def frabsm_weight(p: float, alpha: float, p0: float = 0.6) -> float:
    base = 1 + alpha * (1 / (1 + math.exp(-(p0 - p))) - 0.5)
    return base if alpha <= 1 else 7 * base / (7 + alpha)


@pytest.mark.parametrize("alpha", [0.5, 1.0, 3.0])
@pytest.mark.parametrize("p", [0.0, 0.3, 0.9, 1.0])
def test_frabsm_weight_closed_form(alpha, p):
    loss = build_loss("frabsm_weight", alpha=alpha)
    assert loss.weight(torch.tensor(p, dtype=torch.float64)).item() == pytest.approx(frabsm_weight(p, alpha))


def test_frabsm_range_and_forward():
    loss = build_loss("frabsm_weight", alpha=1.0)
    assert loss.weight(torch.tensor(1.0)).item() == pytest.approx(0.9013, abs=1e-4)  # easy batch
    assert loss.weight(torch.tensor(0.0)).item() == pytest.approx(1.1457, abs=1e-4)  # hard batch
    ce = ce_list()
    mean = sum(ce) / 4
    assert loss(LOGITS, LABELS).item() == pytest.approx(frabsm_weight(math.exp(-mean), 1.0) * mean)
    per = build_loss("frabsm_weight", alpha=1.0, reduction="sample")(LOGITS, LABELS)
    assert per.item() == pytest.approx(sum(frabsm_weight(math.exp(-c), 1.0) * c for c in ce) / 4)


@pytest.mark.parametrize("reduction", ["batch", "sample"])
def test_frabsm_gradcheck_includes_weight_derivative(reduction):
    loss = build_loss("frabsm_weight", alpha=3.0, reduction=reduction)
    logits = LOGITS.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda x: loss(x, LABELS), (logits,))
    # the weight is not detached: the gradient differs from weight * dCE
    loss(logits, LABELS).backward()
    detached = logits.detach().clone().requires_grad_()
    ce = F.cross_entropy(detached, LABELS, reduction="none")
    w = loss.weight(torch.exp(-(ce.mean() if reduction == "batch" else ce))).detach()
    ((w * ce).mean() if reduction == "sample" else w * ce.mean()).backward()
    assert not torch.allclose(logits.grad, detached.grad)


def test_loss_bad_inputs():
    with pytest.raises(ValueError, match=r"label 3 outside \[0, 3\)"):
        build_loss("focal")(LOGITS, torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="alpha must be >= 0"):
        build_loss("frabsm_weight", alpha=-1)


# -------------------------------------------------------------------------------------------- triplet
POINTS = torch.tensor(
    [[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [0.5, 2.0], [3.0, 0.0], [3.0, 1.5]], dtype=torch.float64
)
IDS = torch.tensor([0, 0, 1, 1, 2, 2])


def d(i: int, j: int, pts: torch.Tensor = POINTS) -> float:
    return math.dist(pts[i].tolist(), pts[j].tolist())


def manual(mining: str, margin: float, dist=d) -> float:
    n = len(IDS)
    pos = lambda a: [p for p in range(n) if p != a and IDS[p] == IDS[a]]  # noqa: E731
    neg = lambda a: [q for q in range(n) if IDS[q] != IDS[a]]  # noqa: E731
    if mining == "batch_hard":
        vals = [
            max(0.0, max(dist(a, p) for p in pos(a)) - min(dist(a, q) for q in neg(a)) + margin)
            for a in range(n)
        ]
        return sum(vals) / len(vals)
    if mining == "batch_all":
        vals = [dist(a, p) - dist(a, q) + margin for a in range(n) for p in pos(a) for q in neg(a)]
        active = [v for v in vals if v > 0]
        return sum(active) / len(active)
    vals = []
    for a in range(n):
        for p in pos(a):
            farther = [dist(a, q) for q in neg(a) if dist(a, q) > dist(a, p)]
            chosen = min(farther) if farther else max(dist(a, q) for q in neg(a))
            vals.append(max(0.0, margin + dist(a, p) - chosen))
    return sum(vals) / len(vals)


def test_pairwise_distances_and_zero_distance_gradient():
    dist = pairwise_distances(POINTS)
    for i, j in itertools.product(range(6), range(6)):
        assert dist[i, j].item() == pytest.approx(d(i, j), abs=1e-7)
    x = POINTS.clone().requires_grad_()
    pairwise_distances(x).sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("mining", ["batch_hard", "batch_all", "semi_hard"])
@pytest.mark.parametrize("margin", [1.2, 1.8])
def test_miners_match_hand_computed_triplets(mining, margin):
    loss = build_loss("triplet", margin=margin, mining=mining, normalize=False)
    assert loss(POINTS, IDS).item() == pytest.approx(manual(mining, margin), abs=1e-9)
    assert 0.0 < loss.last_stats["active_fraction"] <= 1.0


def test_batch_all_reports_fraction_of_active_triplets():
    loss = build_loss("triplet", margin=1.2, mining="batch_all", normalize=False)
    loss(POINTS, IDS)
    vals = [
        d(a, p) - d(a, q) + 1.2
        for a in range(6) for p in range(6) for q in range(6)
        if p != a and IDS[p] == IDS[a] and IDS[q] != IDS[a]
    ]  # fmt: skip
    assert loss.last_stats["triplets"] == len(vals) == 24  # 6 anchors x 1 positive x 4 negatives
    assert loss.last_stats["active_fraction"] == pytest.approx(sum(v > 0 for v in vals) / len(vals))


def test_triplet_gradcheck_and_margin_warning():
    loss = build_loss("triplet", margin=0.5, mining="semi_hard")
    x = (POINTS + 0.1).clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda e: loss(e, IDS), (x,))
    with pytest.warns(UserWarning, match="every triplet stays active"):
        build_loss("triplet", margin=2.5)


def test_attention_triplet_is_semi_hard_on_attention_distance():
    sigma2 = torch.tensor([[0.5], [1.0], [0.2], [0.8], [1.5], [0.3]], dtype=torch.float64)
    att = attention_distance(POINTS + 0.3, sigma2)
    expected = manual("semi_hard", 3.0, dist=lambda i, j: att[i, j].item())
    assert attention_triplet_loss(POINTS + 0.3, sigma2, IDS).item() == pytest.approx(expected, abs=1e-9)


WEIGHTED = [
    ("cross_entropy", {"class_weights": [0.5, 2.0, 1.0]}),
    ("focal", {"gamma": 2.0, "class_weights": [1.0, 3.0, 0.5]}),
]


@pytest.mark.parametrize(("name", "params"), WEIGHTED)
def test_gradcheck_cross_entropy_and_focal(name, params):
    loss = build_loss(name, **params)
    assert torch.autograd.gradcheck(lambda x: loss(x, LABELS), (LOGITS.clone().requires_grad_(),))


def test_heads_and_losses_refuse_bad_labels_in_the_same_words():
    from heads import build_head

    emb = torch.randn(4, 4, generator=torch.Generator().manual_seed(0))
    head = build_head("arcface", embedding_size=4, num_classes=3)
    takers = {
        "ArcFace": lambda y: head(emb, y),
        "cross_entropy": lambda y: build_loss("cross_entropy")(LOGITS, y),
        "focal": lambda y: build_loss("focal")(LOGITS, y),
        "triplet": lambda y: build_loss("triplet")(emb, y),
    }
    for owner, take in takers.items():
        wrong_type = rf"^{owner}: labels must be int64 class ids, got torch\.float32$"
        with pytest.raises(TypeError, match=wrong_type):
            take(torch.tensor([0.0, 1.0, 1.0, 2.0]))
        if owner != "triplet":  # a loss on the embeddings has no number of classes
            with pytest.raises(ValueError, match=rf"^{owner}: label 3 outside \[0, 3\)$"):
                take(torch.tensor([0, 3, 1, 2]))
    with pytest.raises(ValueError, match=r"^triplet: \(3,\) labels for 4 embeddings$"):
        takers["triplet"](torch.tensor([0, 1, 1]))
