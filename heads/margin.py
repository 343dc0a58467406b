"""Margin heads (docs/methods.md §3.1-§3.7): embeddings + labels -> logits already multiplied by the scale s.

Every head owns the class centres ``weight`` (C x E, one row per class, as insightface's Partial FC
stores them), normalises embeddings and centres, computes ``cos(theta_j)`` clamped to
``[-1 + eps, 1 - eps]`` and replaces the target cosine by its method's margined value. Heads that use the
embedding norm (MagFace, AdaFace, FRABSM) read it from the un-normalised embedding.

The centres start as the head's reference implementation starts them (``init``, see :func:`init_centres`):
N(0, 0.01) for the insightface/arcface_torch family and CurricularFace, unit-length rows for AdaFace,
FRABSM and MagFace.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.labels import check_labels
from heads.registry import HEADS

EPS = 1e-7  # clamp of the cosine: keeps arccos and its gradient finite at theta = 0 and pi
CENTRE_INITS = ("normal_0.01", "unit")


def init_centres(rows: torch.Tensor, init: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """Fill class-centre ``rows`` (one per class) in place with the initialisation ``init`` and return them.

    * ``normal_0.01``: entries N(0, 0.01), rows of length about 0.01 sqrt(E) (0.23 for E = 512), as
      arcface_torch's ``PartialFC_V2`` (partial_fc_v2.py) and CurricularFace (head/metrics.py) start;
    * ``unit``: entries uniform(-1, 1), then every row rescaled to length 1, as AdaFace, FRABSM and MagFace
      start (``uniform_(-1, 1).renorm_(2, 1, 1e-5).mul_(1e5)`` on their E x C kernel).

    The logits see only the centres' directions, but the length sets how fast they turn: the gradient with
    respect to a centre scales as 1 / |w| and the angle one SGD step turns it as 1 / |w|^2, so N(0, 0.01)
    centres move much further in the first steps than unit ones at the same learning rate.
    """
    if init not in CENTRE_INITS:
        raise ValueError(f"init must be one of {', '.join(CENTRE_INITS)}, got {init!r}")
    with torch.no_grad():
        if init == "normal_0.01":
            return rows.normal_(0.0, 0.01, generator=generator)
        rows.uniform_(-1.0, 1.0, generator=generator)
        return rows.div_(rows.norm(dim=1, keepdim=True).clamp(min=1e-12))


def check_inputs(
    owner: str,
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    embedding_size: int,
    num_classes: int,
    finite: bool = True,
) -> None:
    """Refuse inputs a head cannot use, naming the value and the limit (non-finite embeddings only when
    ``finite``)."""
    if embeddings.ndim != 2 or embeddings.shape[1] != embedding_size:
        shape = tuple(embeddings.shape)
        raise ValueError(f"{owner}: embeddings of shape {shape}, expected (N, {embedding_size})")
    check_labels(owner, labels, num_classes, rows=embeddings.shape[0])
    if finite and not torch.isfinite(embeddings).all():
        raise ValueError(f"{owner}: embeddings contain NaN or inf")


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class MarginHead(nn.Module):
    """Base class: class centres, input checks, cosine logits; subclasses define :meth:`margin`.

    ``init`` (``normal_0.01`` | ``unit``) is how the centres start (:func:`init_centres`); each head defaults
    to its reference implementation's choice. Partial FC redraws them per block of classes from a seed with
    the same ``init``.
    """

    def __init__(
        self, embedding_size: int, num_classes: int, s: float = 64.0, init: str = "normal_0.01"
    ) -> None:
        super().__init__()
        if embedding_size <= 0 or num_classes <= 0:
            raise ValueError(
                f"embedding_size and num_classes must be positive, got {embedding_size}, {num_classes}"
            )
        if init not in CENTRE_INITS:
            raise ValueError(
                f"{type(self).__name__}: init must be one of {', '.join(CENTRE_INITS)}, got {init!r}"
            )
        self.embedding_size = embedding_size
        self.num_classes = num_classes
        self.s = s
        self.init = init
        self.weight = nn.Parameter(init_centres(torch.empty(num_classes, embedding_size), init))

    def check_inputs(self, embeddings: torch.Tensor, labels: torch.Tensor) -> None:
        check_inputs(type(self).__name__, embeddings, labels, self.embedding_size, self.num_classes)

    def cosine(self, embeddings: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """Clamped cosines between embeddings and class centres (``weight``: a subset of the rows)."""
        weight = self.weight if weight is None else weight
        dtype = compute_dtype(embeddings)
        cos = F.linear(F.normalize(embeddings.to(dtype), dim=1), F.normalize(weight.to(dtype), dim=1))
        return cos.clamp(-1.0 + EPS, 1.0 - EPS)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self.check_inputs(embeddings, labels)
        # Margins are computed in fp32 (fp64 when given) whatever the autocast: fp16 cos(theta + m) near
        # cos = +-1 is where NaN losses come from.
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            cos = self.cosine(embeddings)
            norms = embeddings.to(cos.dtype).norm(dim=1)
            return self.logits(cos, labels, norms)

    def logits(
        self,
        cos: torch.Tensor,
        labels: torch.Tensor,
        norms: torch.Tensor,
        cos_y_all: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """s * margined cosines. A label of -1 marks a sample whose class is not among these columns
        (Partial FC shards); ``cos_y_all`` then gives every sample's detached target cosine."""
        return self.s * self.margin(cos, labels, norms, cos_y_all)

    def margin(
        self,
        cos: torch.Tensor,
        labels: torch.Tensor,
        norms: torch.Tensor,
        cos_y_all: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The cosine matrix with the target entries replaced by their margined values (before * s)."""
        raise NotImplementedError

    @staticmethod
    def replace_target(cos: torch.Tensor, labels: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``cos`` with entry (i, labels[i]) replaced by ``target[i]``; rows labelled -1 are unchanged."""
        onehot = torch.arange(cos.shape[1], device=cos.device) == labels.unsqueeze(1)
        return torch.where(onehot, target.unsqueeze(1), cos)

    @staticmethod
    def target_cos(cos: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """cos(theta_y) per sample (an arbitrary valid cosine for rows labelled -1, which are never used)."""
        return cos.gather(1, labels.clamp(min=0).unsqueeze(1)).squeeze(1)

    def extra_repr(self) -> str:
        sizes = f"embedding_size={self.embedding_size}, num_classes={self.num_classes}"
        return f"{sizes}, s={self.s}, init={self.init}"


@HEADS.register("softmax")
class NormSoftmax(MarginHead):
    """Normalised softmax without margin: logits s * cos(theta_j) (a baseline)."""

    def margin(self, cos: Tensor, labels: Tensor, norms: Tensor, cos_y_all: Tensor | None = None) -> Tensor:
        return cos


@HEADS.register("cosface")
class CosFace(MarginHead):
    """Target logit s * (cos(theta_y) - m)."""

    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        s: float = 64.0,
        m: float = 0.4,
        init: str = "normal_0.01",
    ) -> None:
        super().__init__(embedding_size, num_classes, s, init)
        self.m = m

    def margin(self, cos: Tensor, labels: Tensor, norms: Tensor, cos_y_all: Tensor | None = None) -> Tensor:
        return self.replace_target(cos, labels, self.target_cos(cos, labels) - self.m)


def arc_margin(cos_y: torch.Tensor, m: float | torch.Tensor) -> torch.Tensor:
    """cos(theta + m) from cos(theta) with its exact gradient sin(theta + m) / sin(theta) w.r.t. cos(theta).

    That gradient changes sign at theta = pi - m: beyond it the target logit *grows* with theta, so the loss
    pushes the sample further from its own centre. The ``fallback`` and ``clip`` ArcFace variants exist to
    avoid this."""
    return torch.cos(torch.acos(cos_y) + m)


class _StraightThroughArc(torch.autograd.Function):
    """Forward cos(theta + m); backward passes the gradient as if the margin were the identity."""

    @staticmethod
    def forward(ctx, cos_y: torch.Tensor, m: float) -> torch.Tensor:
        return torch.cos(torch.acos(cos_y) + m)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


@HEADS.register("arcface")
class ArcFace(MarginHead):
    """Target logit s * cos(theta_y + m) in one of four variants (docs/methods.md §3.2):

    * ``exact`` (default): cos(theta + m) with its true gradient, s*sin(theta+m)/sin(theta) w.r.t. cos. For
      theta > pi - m that gradient reverses its sign (cos(theta + m) rises again past theta + m = pi), so a
      sample that far from its centre is pushed further away; ``clip`` and ``fallback`` exist for this;
    * ``clip``: theta + m clipped to [eps, pi - eps] (AdaFace);
    * ``fallback``: cos(theta + m) if cos(theta) > cos(pi - m), else cos(theta) - m*sin(m), keeping the logit
      monotonic in theta (evoLVe / CurricularFace); ``easy_margin`` applies the margin only where cos > 0;
    * ``straight_through``: the forward value of ``exact``, but the backward treats the margin as the identity
      (d logit / d cos = s), which is what arcface_torch's in-place no-grad rewrite computes.
    """

    VARIANTS = ("exact", "clip", "fallback", "straight_through")

    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        s: float = 64.0,
        m: float = 0.5,
        variant: str = "exact",
        easy_margin: bool = False,
        init: str = "normal_0.01",
    ) -> None:
        super().__init__(embedding_size, num_classes, s, init)
        if variant not in self.VARIANTS:
            raise ValueError(f"arcface variant must be one of {', '.join(self.VARIANTS)}, got {variant!r}")
        if easy_margin and variant != "fallback":
            raise ValueError("easy_margin belongs to the 'fallback' variant")
        self.m, self.variant, self.easy_margin = m, variant, easy_margin

    def margin(self, cos: Tensor, labels: Tensor, norms: Tensor, cos_y_all: Tensor | None = None) -> Tensor:
        cos_y = self.target_cos(cos, labels)
        if self.variant == "exact":
            target = arc_margin(cos_y, self.m)
        elif self.variant == "straight_through":
            target = _StraightThroughArc.apply(cos_y, self.m)
        elif self.variant == "clip":
            target = torch.cos((torch.acos(cos_y) + self.m).clamp(1e-3, math.pi - 1e-3))
        else:
            target = fallback_arc(cos_y, self.m, self.easy_margin)
        return self.replace_target(cos, labels, target)


def fallback_arc(cos_y: torch.Tensor, m: float, easy_margin: bool = False) -> torch.Tensor:
    """cos(theta + m) where theta + m < pi, else the monotonic cos(theta) - m*sin(m)."""
    margined = arc_margin(cos_y, m)
    if easy_margin:
        return torch.where(cos_y > 0, margined, cos_y)
    return torch.where(cos_y > math.cos(math.pi - m), margined, cos_y - m * math.sin(m))


@HEADS.register("combined")
class CombinedMargin(MarginHead):
    """insightface's combined margin: target s * (cos(m1 * theta_y + m2) - m3).

    Its gradient is exact, like ArcFace's ``exact`` variant, and reverses its sign in the same way: for
    m1 * theta_y + m2 > pi, i.e. theta_y > (pi - m2) / m1, the target logit rises with theta_y and the loss
    pushes the sample away from its centre (no fallback here).
    """

    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        s: float = 64.0,
        m1: float = 1.0,
        m2: float = 0.5,
        m3: float = 0.0,
        init: str = "normal_0.01",
    ) -> None:
        super().__init__(embedding_size, num_classes, s, init)
        self.m1, self.m2, self.m3 = m1, m2, m3

    def margin(self, cos: Tensor, labels: Tensor, norms: Tensor, cos_y_all: Tensor | None = None) -> Tensor:
        theta = torch.acos(self.target_cos(cos, labels))
        return self.replace_target(cos, labels, torch.cos(self.m1 * theta + self.m2) - self.m3)


@HEADS.register("curricularface")
class CurricularFace(MarginHead):
    """ArcFace-with-fallback positives; hard negatives (cos_j > cos(theta_y + m)) get cos_j * (t + cos_j).

    ``t`` is a buffer, an EMA of the batch-mean target cosine: t <- 0.01 * mean(cos_y) + 0.99 * t. The
    centres start N(0, 0.01), as in the CurricularFace repository (head/metrics.py).
    """

    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        s: float = 64.0,
        m: float = 0.5,
        init: str = "normal_0.01",
    ) -> None:
        super().__init__(embedding_size, num_classes, s, init)
        self.m = m
        self.register_buffer("t", torch.zeros(()))

    def margin(self, cos: Tensor, labels: Tensor, norms: Tensor, cos_y_all: Tensor | None = None) -> Tensor:
        cos_y = self.target_cos(cos, labels)
        with torch.no_grad():
            reference = cos_y if cos_y_all is None else cos_y_all
            threshold = arc_margin(reference, self.m)  # before the fallback, as the method defines hardness
            if self.training:
                self.t.mul_(0.99).add_(0.01 * reference.mean())
        hard = cos > threshold.unsqueeze(1)
        out = torch.where(hard, cos * (self.t + cos), cos)
        return self.replace_target(out, labels, fallback_arc(cos_y, self.m))


@HEADS.register("magface")
class MagFace(MarginHead):
    """Magnitude-aware margin: a = clamp(|f|, l_a, u_a), m(a) linear from l_m to u_m, target
    s * cos(theta_y + m(a)) (easy margin). :meth:`regularizer` gives g(a) = a / u_a^2 + 1 / a, added to the
    loss with weight ``lambda_g``. The centres start unit-length, as MagFace's ``MagLinear``
    (models/magface.py).
    """

    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        s: float = 64.0,
        l_a: float = 10.0,
        u_a: float = 110.0,
        l_m: float = 0.45,
        u_m: float = 0.8,
        lambda_g: float = 35.0,
        init: str = "unit",
    ) -> None:
        super().__init__(embedding_size, num_classes, s, init)
        self.l_a, self.u_a, self.l_m, self.u_m, self.lambda_g = l_a, u_a, l_m, u_m, lambda_g

    def margin_of(self, norms: torch.Tensor) -> torch.Tensor:
        a = norms.clamp(self.l_a, self.u_a)
        return self.l_m + (self.u_m - self.l_m) * (a - self.l_a) / (self.u_a - self.l_a)

    def regularizer(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Mean g(a) over the batch, already multiplied by ``lambda_g``."""
        a = embeddings.to(compute_dtype(embeddings)).norm(dim=1).clamp(self.l_a, self.u_a)
        return self.lambda_g * (a / self.u_a**2 + 1.0 / a).mean()

    def margin(self, cos: Tensor, labels: Tensor, norms: Tensor, cos_y_all: Tensor | None = None) -> Tensor:
        cos_y = self.target_cos(cos, labels)
        margined = arc_margin(cos_y, self.margin_of(norms))
        return self.replace_target(cos, labels, torch.where(cos_y > 0, margined, cos_y))


@HEADS.register("adaface")
class AdaFace(MarginHead):
    """Quality-adaptive margin (docs/methods.md §3.6).

    z = clip(h (n - mu) / (sigma + 1e-3), -1, 1) from the detached norm n and EMA batch statistics
    (mu, sigma); target s * [cos(clip(theta_y - m z, eps, pi - eps)) - g_add] with
    g_add = add_scale * m * (1 + z). ``add_scale`` is 1 for AdaFace and NFRABSM, 0.7 for FRABSM. The centres
    start unit-length, as in AdaFace's head.py.
    """

    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        s: float = 64.0,
        m: float = 0.4,
        h: float = 0.333,
        t_alpha: float = 0.01,
        add_scale: float = 1.0,
        init: str = "unit",
    ) -> None:
        super().__init__(embedding_size, num_classes, s, init)
        self.m, self.h, self.t_alpha, self.add_scale = m, h, t_alpha, add_scale
        self.register_buffer("batch_mean", torch.tensor(20.0))
        self.register_buffer("batch_std", torch.tensor(100.0))

    def quality(self, norms: torch.Tensor) -> torch.Tensor:
        """Update the EMA statistics (training only) and return z in [-1, 1] (no gradient)."""
        n = norms.detach().clamp(0.001, 100.0)
        if self.training and n.numel() > 1:
            self.batch_mean.mul_(1 - self.t_alpha).add_(self.t_alpha * n.mean())
            self.batch_std.mul_(1 - self.t_alpha).add_(self.t_alpha * n.std())
        return (self.h * (n - self.batch_mean) / (self.batch_std + 1e-3)).clamp(-1.0, 1.0)

    def margin(self, cos: Tensor, labels: Tensor, norms: Tensor, cos_y_all: Tensor | None = None) -> Tensor:
        z = self.quality(norms)
        theta = torch.acos(self.target_cos(cos, labels))
        angular = (theta - self.m * z).clamp(1e-3, math.pi - 1e-3)
        target = torch.cos(angular) - self.add_scale * self.m * (1.0 + z)
        return self.replace_target(cos, labels, target)


@HEADS.register("frabsm")
def frabsm(embedding_size: int, num_classes: int, s: float = 64.0, m: float = 0.4, h: float = 0.333,
           t_alpha: float = 0.01, add_scale: float = 0.7, init: str = "unit") -> AdaFace:  # fmt: skip
    """FRABSM head: AdaFace with the additive margin scaled by 0.7 (docs/methods.md §3.7), as the FRABSM
    repository's head.py has it since commit c708290 (Xkf0/FRABSM)."""
    return AdaFace(
        embedding_size, num_classes, s=s, m=m, h=h, t_alpha=t_alpha, add_scale=add_scale, init=init
    )


@HEADS.register("nfrabsm")
def nfrabsm(embedding_size: int, num_classes: int, s: float = 64.0, m: float = 0.4, h: float = 0.333,
            t_alpha: float = 0.01, init: str = "unit") -> AdaFace:  # fmt: skip
    """NFRABSM: the FRABSM head *without* the 0.7 factor on the additive margin (add_scale 1.0).

    This is the head of the FRABSM repository's first commit (Xkf0/FRABSM a420194, head.py, class
    ``SmaFace``): g_add = m + m z, unscaled; commit c708290 later multiplied it by 0.7 (FRABSM). The mining
    weight on the loss (``frabsm_weight``, any ``alpha``) is set separately and combines with either head.
    """
    return AdaFace(embedding_size, num_classes, s=s, m=m, h=h, t_alpha=t_alpha, add_scale=1.0, init=init)
