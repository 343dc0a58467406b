from __future__ import annotations

import math

import pytest
import torch

from losses.closeness_diversity import closeness_loss, diversity_loss, diversity_prototypes
from losses.probface import attention_distance, mls_loss, mutual_likelihood_score, output_constraint


def unit(angle: float) -> list[float]:
    return [math.cos(angle), math.sin(angle)]


def test_closeness_closed_form():
    angles = [0.0, 0.5, 1.3]
    easy = torch.tensor([[[3 * v for v in unit(a)] for a in angles], [unit(0.2)] * 3], dtype=torch.float64)
    pairs = [(0, 1), (0, 2), (1, 2)]
    class0 = sum(2 - 2 * math.cos(angles[i] - angles[j]) for i, j in pairs) / 3
    assert closeness_loss(easy).item() == pytest.approx((class0 + 0.0) / 2, abs=1e-12)
    with pytest.raises(ValueError, match=">= 2 images"):
        closeness_loss(easy[:, :1])


def test_diversity_closed_form():
    s = 4.0
    hard = torch.tensor([unit(0.0), unit(1.0)], dtype=torch.float64)
    protos = torch.tensor([unit(0.3), unit(2.5), unit(-0.8)], dtype=torch.float64) * 7
    expected = []
    for h in (0.0, 1.0):
        cos = [math.cos(h - p) for p in (0.3, 2.5, -0.8)]
        expected.append(math.log(sum(math.exp(s * max(0.0, c) ** 2) for c in cos) / 3))
    assert diversity_loss(hard, protos, s=s).item() == pytest.approx(sum(expected) / 2, abs=1e-12)


def test_diversity_prototypes_exclude_selected_classes():
    weight = torch.arange(20.0).view(10, 2)
    protos = diversity_prototypes(weight, torch.tensor([[3, 4, 7], [4, 1, 9]]), torch.tensor([1, 7]))
    assert protos.tolist() == weight[[3, 4, 9]].tolist()
    assert not protos.requires_grad


def test_gradcheck_closeness_and_diversity():
    g = torch.Generator().manual_seed(0)
    easy = torch.randn(2, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    hard = torch.randn(3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    protos = torch.randn(6, 5, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(closeness_loss, (easy,))
    assert torch.autograd.gradcheck(lambda h: diversity_loss(h, protos, s=8.0), (hard,))


def test_mls_scalar_and_per_dimension_closed_forms():
    mu1 = torch.tensor([unit(0.0)], dtype=torch.float64)
    mu2 = torch.tensor([unit(0.7)], dtype=torch.float64)
    s1, s2 = torch.tensor([[0.2]], dtype=torch.float64), torch.tensor([[0.5]], dtype=torch.float64)
    expected = -(2 * (1 - math.cos(0.7)) / 0.7 + math.log(0.7))
    assert mutual_likelihood_score(mu1, mu2, s1, s2).item() == pytest.approx(expected, abs=1e-12)
    d1, d2 = torch.tensor([[0.1, 0.3]], dtype=torch.float64), torch.tensor([[0.2, 0.4]], dtype=torch.float64)
    diff = [mu1[0, k].item() - mu2[0, k].item() for k in range(2)]
    per_dim = -sum(diff[k] ** 2 / (d1[0, k] + d2[0, k]).item() + math.log((d1[0, k] + d2[0, k]).item())
                   for k in range(2)) / 2  # fmt: skip
    assert mutual_likelihood_score(mu1, mu2, d1, d2).item() == pytest.approx(per_dim, abs=1e-12)


def test_mls_loss_uses_only_genuine_pairs_and_trains_sigma_only():
    mu = torch.tensor([unit(0.0), unit(0.4), unit(2.0), unit(2.2)], dtype=torch.float64, requires_grad=True)
    sigma2 = torch.tensor([[0.1], [0.2], [0.3], [0.4]], dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1])

    def score(i: int, j: int, a: float, b: float) -> float:
        return -(
            2 * (1 - math.cos(a - b)) / (sigma2[i] + sigma2[j]).item()
            + math.log((sigma2[i] + sigma2[j]).item())
        )

    expected = -(2 * score(0, 1, 0.0, 0.4) + 2 * score(2, 3, 2.0, 2.2)) / 4
    loss = mls_loss(mu, sigma2, labels)
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    loss.backward()
    assert mu.grad is None and sigma2.grad is not None
    with pytest.raises(ValueError, match="same identity"):
        mls_loss(mu, sigma2, torch.tensor([0, 1, 2, 3]))


def test_output_constraint_and_attention_distance():
    sigma2 = torch.tensor([[1.0], [2.0], [3.0]], dtype=torch.float64)
    assert output_constraint(sigma2).item() == pytest.approx((0.5 - 1) ** 2 + 0 + (1.5 - 1) ** 2)
    assert output_constraint(sigma2, "l1").item() == pytest.approx(1.0)
    mu = torch.tensor([unit(0.0), unit(1.0), unit(2.0)], dtype=torch.float64)
    a = attention_distance(mu, sigma2)
    assert a[0, 2].item() == pytest.approx(2 * (1 - math.cos(2.0)) / 4.0)
    assert torch.allclose(a, a.T) and torch.allclose(a.diag(), torch.zeros(3, dtype=torch.float64))
    # the mean is a stop-gradient: d/ds_i = 2 (s_i / mean - 1) / mean
    s = sigma2.clone().requires_grad_()
    output_constraint(s).backward()
    torch.testing.assert_close(s.grad, 2 * (sigma2 / 2.0 - 1) / 2.0)


def test_gradcheck_mls_loss_wrt_sigma():
    mu = torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    scalar = torch.rand(6, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) + 0.1
    per_dim = torch.rand(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(4)) + 0.1
    for sigma2 in (scalar, per_dim):
        assert torch.autograd.gradcheck(lambda s: mls_loss(mu, s, labels), (sigma2.requires_grad_(),))
