"""The GPU paths proven on the CPU: device discipline, bf16 autocast and torch.compile.

Device discipline. A tensor made without ``device=`` lands on the CPU; on a GPU run it then meets the
inputs' CUDA tensors and the step fails (a ProbFace loss once built its genuine-pair mask that way). The
``meta`` device cannot show this for the whole framework: heads check label ranges with ``int(...)``,
Partial FC samples with ``torch.unique`` and the triplet miners index with boolean masks, all of which
need values. So every component runs on a stand-in accelerator instead: PyTorch's Python-registered
``privateuse1`` backend, named ``fakegpu``, whose tensors (:class:`OnFakeGPU`) carry real CPU values
while reporting ``device fakegpu:0``. A dispatch mode (:class:`DeviceDiscipline`) sees every ATen call,
forward and backward, factories included: a factory given ``device=x.device`` makes a fakegpu tensor, one
without makes a CPU tensor, and any op that meets a fakegpu tensor and a CPU tensor of one or more
dimensions raises :class:`DeviceMismatch` (CPU 0-dim tensors pass, as CUDA takes them as scalars; CPU
index tensors are refused although CUDA would copy them, since each is a hidden host-to-device copy).
``copy_`` and ``.to()`` are the deliberate transfers and pass. ``.numpy()`` of a fakegpu tensor fails as
it does on CUDA. Every case is also run on the CPU and the two results must agree, so the stand-in runs
the real computation. Registering the backend makes ``fakegpu`` the process's accelerator, so the checks
run in a child process.

Covered, from the registries so a new part is included automatically: every head (alone and through
Partial FC at sample rate 1 and 0.5 with inter-class filtering, its mining and checkpoint methods
included), every loss, every triplet miner; and every public function and class of ``losses`` and
``mining`` (a new one fails :func:`test_every_public_loss_and_mining_part_is_covered` until it has a case
or a stated exemption). The samplers make no tensors: they yield plain integers (checked). The
collectives of ``core.distributed`` need a process group, which cannot hold fakegpu tensors: their
``device=tensor.device`` allocations are covered by the 2-process gloo tests only, on the CPU.
"""

from __future__ import annotations

import importlib
import inspect
import multiprocessing
import pkgutil
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

import losses
import mining
from heads import HEADS, build_head
from heads.margin import CosFace
from heads.partial_fc import PartialFC
from losses import LOSSES
from losses.triplet_loss import MINERS
from probface.loss import ProbFaceLoss  # also registers loss "probface"

FAKE = "fakegpu"
E, C = 8, 11  # embedding size; 11 classes
LABELS = [0, 0, 3, 3, 5, 5, 7, 7, 10, 10, 2, 2]  # two images per identity: genuine pairs for every loss


# ------------------------------------------------------------------------------- the stand-in device


class DeviceMismatch(RuntimeError):
    """An op met a tensor on the stand-in accelerator and a CPU tensor (not a 0-dim scalar)."""


def fake_device() -> torch.device:
    return torch.device(FAKE, 0)


def install_fake_accelerator() -> None:
    """Register ``fakegpu`` as PyTorch's privateuse1 backend (once per process; changes the process's
    accelerator, so only in a child process)."""
    from torch.utils import backend_registration as registration

    if torch._C._get_privateuse1_backend_name() == FAKE:
        return

    class Module(registration._DummyBackendModule):
        def get_amp_supported_dtype(self) -> list[torch.dtype]:  # autocast(device_type="fakegpu")
            return [torch.float16, torch.bfloat16]

    registration._setup_privateuseone_for_python_backend(FAKE, backend_module=Module())


class OnFakeGPU(torch.Tensor):
    """A tensor on the stand-in accelerator: a CPU tensor ``elem`` inside, ``device fakegpu:0`` outside."""

    elem: torch.Tensor

    @staticmethod
    def __new__(cls, elem: torch.Tensor) -> OnFakeGPU:
        return torch.Tensor._make_wrapper_subclass(
            cls, elem.shape, strides=elem.stride(), storage_offset=elem.storage_offset(),
            dtype=elem.dtype, device=fake_device(), requires_grad=elem.requires_grad,
        )  # fmt: skip

    def __init__(self, elem: torch.Tensor) -> None:
        self.elem = elem

    def __repr__(self) -> str:
        return f"OnFakeGPU({self.elem!r})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        return run_op(func, args, kwargs or {})


TRANSFERS = {"aten.copy_.default", "aten._to_copy.default"}  # deliberate device changes


def run_op(func, args, kwargs):  # type: ignore[no-untyped-def]
    """Run one ATen op on the CPU values, refusing a mix of devices, and put the result where the op's
    inputs (or its ``device=`` argument) say."""
    tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
    on_fake = any(isinstance(t, OnFakeGPU) for t in tensors)
    if on_fake and str(func) not in TRANSFERS:
        stray = [t for t in tensors if not isinstance(t, OnFakeGPU) and t.dim() > 0]
        if stray:
            raise DeviceMismatch(
                f"{func}: a {stray[0].device} tensor of shape {tuple(stray[0].shape)} meets tensors on "
                f"{fake_device()} (made without device=?)"
            )
    requested = kwargs.get("device")
    kwargs = dict(kwargs)
    if requested is not None and torch.device(requested).type == FAKE:
        kwargs["device"] = torch.device("cpu")
    args, kwargs = tree_map(lambda t: t.elem if isinstance(t, OnFakeGPU) else t, (args, kwargs))
    out = func(*args, **kwargs)
    to_fake = torch.device(requested).type == FAKE if requested is not None else on_fake
    if not to_fake:
        return out
    return tree_map(lambda t: OnFakeGPU(t) if type(t) is torch.Tensor else t, out)


class DeviceDiscipline(TorchDispatchMode):
    """Routes every ATen call (factories too, which have no tensor argument) through :func:`run_op`."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        return run_op(func, args, kwargs or {})


def to_cpu(value: Any) -> Any:
    """Detached CPU copies of every tensor in a nest of dicts, lists and tuples."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    if isinstance(value, dict):
        return {k: to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_cpu(v) for v in value]
    return value


# --------------------------------------------------------------------------------------------- cases


def inputs(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded embeddings (leaf, requiring grad) and labels on ``device``."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(len(LABELS), E, generator=g) * 8).to(device).requires_grad_()
    return x, torch.tensor(LABELS).to(device)


def head_case(name: str) -> Callable[[torch.device], Any]:
    def case(device: torch.device) -> Any:
        torch.manual_seed(0)
        head = build_head(name, embedding_size=E, num_classes=C).to(device).train()
        x, y = inputs(device)
        logits = head(x, y)
        loss = F.cross_entropy(logits, y)
        regularizer = getattr(head, "regularizer", None)  # MagFace's g(a)
        if regularizer is not None:
            loss = loss + regularizer(x)
        loss.backward()
        return {"logits": logits, "x_grad": x.grad, "w_grad": head.weight.grad, "state": head.state_dict()}

    return case


def partial_fc_case(name: str, sample_rate: float, filtering: float) -> Callable[[torch.device], Any]:
    def case(device: torch.device) -> Any:
        torch.manual_seed(0)
        pfc = PartialFC(name, E, C, sample_rate, init_seed=3, interclass_filtering_threshold=filtering)
        pfc = pfc.to(device).train()
        optimizer = torch.optim.SGD(pfc.parameters(), lr=0.1, momentum=0.9)
        x, y = inputs(device)
        out = pfc.scores(x, y, keep_cosines=True)
        out.ce.mean().backward()
        optimizer.step()
        negatives = pfc.top_negatives(out.cosines, 3)
        centres = pfc.gather_centres(negatives[:, 0].clamp(min=0))
        state = pfc.state_dict()
        pfc.load_state_dict(state)
        opt_state = pfc.optimizer_state_dict(optimizer)
        pfc.load_optimizer_state_dict(optimizer, opt_state)
        return {"ce": out.ce, "labels": out.labels, "target_cos": out.target_cos, "index": out.index,
                "x_grad": x.grad, "negatives": negatives, "centres": centres, "state": state,
                "momentum": opt_state["state"][0]["momentum_buffer"]}  # fmt: skip

    return case


def classification_loss_case(name: str, class_weights: bool) -> Callable[[torch.device], Any]:
    """A loss on a head's logits: ``forward(logits, labels)`` and ``reduce(ce, labels)``."""

    def case(device: torch.device) -> Any:
        params = {"class_weights": torch.linspace(0.5, 1.5, C)} if class_weights else {}
        loss_fn = LOSSES.build(name, **params).to(device)
        x, y = inputs(device)
        logits = x @ torch.linspace(-1, 1, E * C).view(E, C).to(device)
        loss = loss_fn(logits, y) + loss_fn.reduce(F.cross_entropy(logits, y, reduction="none"), y)
        loss.backward()
        return {"loss": loss, "x_grad": x.grad}

    return case


def embedding_loss_case(name: str, **params: Any) -> Callable[[torch.device], Any]:
    """A loss on the embeddings (``head.name: none``): (embeddings, labels), or ProbFace's
    ((embeddings, log sigma^2), labels)."""

    def case(device: torch.device) -> Any:
        loss_fn = LOSSES.build(name, **params).to(device)
        x, y = inputs(device)
        outputs: Any = x
        if isinstance(loss_fn, ProbFaceLoss):
            log_sigma2 = (x[:, :1].detach() * 0.1 - 3.0).requires_grad_()
            outputs = (x, log_sigma2)
        loss = loss_fn(outputs, y)
        loss.backward()
        return {"loss": loss, "x_grad": x.grad, "stats": getattr(loss_fn, "last_stats", {})}

    return case


def loss_cases(name: str) -> dict[str, Callable[[torch.device], Any]]:
    """The cases of registered loss ``name``; a loss that is neither on logits (it has ``reduce``) nor a
    known embedding loss has none, and fails the test until it gets one."""
    loss = LOSSES.build(name)
    if hasattr(loss, "reduce"):
        cases = {f"loss:{name}": classification_loss_case(name, False)}
        if "class_weights" in inspect.signature(LOSSES.get(name)).parameters:
            cases[f"loss:{name}:class_weights"] = classification_loss_case(name, True)
        return cases
    if name == "triplet":
        return {f"loss:triplet:{m}": embedding_loss_case(name, mining=m) for m in MINERS}
    if name == "probface":
        return {
            "loss:probface": embedding_loss_case(name),
            "loss:probface:l1_mu_gradient": embedding_loss_case(
                name, constraint="l1", triplet_mu_gradient=True
            ),
        }
    return {f"loss:{name}": _no_case(f"loss {name!r} has no device-discipline case: add one")}


def _no_case(message: str) -> Callable[[torch.device], Any]:
    def case(device: torch.device) -> Any:
        raise LookupError(message)

    return case


def loss_function_cases() -> dict[str, Callable[[torch.device], Any]]:
    """The loss functions that no registered loss reaches with every option."""
    from losses.closeness_diversity import closeness_loss, diversity_loss, diversity_prototypes
    from losses.probface import attention_distance, mutual_likelihood_score, pairwise_mls
    from losses.softmax_losses import per_sample_ce
    from losses.triplet_loss import pairwise_distances

    def closeness_diversity(device: torch.device) -> Any:
        x, _ = inputs(device)
        weight = torch.linspace(-1, 1, C * E).view(C, E).to(device)
        negatives = torch.tensor([[1, 2, 4], [6, 8, 9]]).to(device)
        prototypes = diversity_prototypes(weight, negatives, torch.tensor([0, 9]).to(device))
        loss = closeness_loss(x.view(4, 3, E)) + diversity_loss(x[:5], prototypes, s=16.0)
        loss.backward()
        return {"loss": loss, "x_grad": x.grad, "prototypes": prototypes}

    def probface_distances(device: torch.device) -> Any:
        x, _ = inputs(device)
        scalar = torch.linspace(0.1, 0.3, len(LABELS)).view(-1, 1).to(device)
        per_dim = torch.linspace(0.1, 0.3, len(LABELS) * E).view(-1, E).to(device)
        mu = F.normalize(x, dim=1)
        out = [
            pairwise_mls(mu, scalar),
            pairwise_mls(mu, per_dim),
            attention_distance(x, per_dim),
            attention_distance(x, scalar),
            mutual_likelihood_score(mu[:3], mu[3:6], per_dim[:3], per_dim[3:6]),
        ]
        sum(o.sum() for o in out).backward()
        return {"out": out, "x_grad": x.grad}

    def distances_and_ce(device: torch.device) -> Any:
        x, y = inputs(device)
        out = [pairwise_distances(x), pairwise_distances(x, squared=True), per_sample_ce(x, y % E, "t")]
        sum(o.sum() for o in out).backward()
        return {"out": out, "x_grad": x.grad}

    return {
        "function:closeness_diversity_losses": closeness_diversity,
        "function:probface_distances": probface_distances,
        "function:distances_and_ce": distances_and_ce,
    }


def mining_cases() -> dict[str, Callable[[torch.device], Any]]:
    from mining import DifficultyScores, top_negative_classes
    from mining.closeness_diversity import ClosenessDiversityMiner

    def top_negatives(device: torch.device) -> Any:
        x, y = inputs(device)
        cos = torch.tanh(x.repeat(1, 2)[:, :C])  # (N, C) cosine-like scores
        return {"ids": top_negative_classes(cos, y, k=3)}

    def difficulty(device: torch.device) -> Any:
        scores = DifficultyScores(20, seed=1).to(device)
        scores.update(torch.tensor([1, 3, 3, 19]).to(device), torch.tensor([0.5, -0.2, 0.4, 0.9]).to(device))
        return {"scores": scores.scores}

    def closeness_diversity_miner(device: torch.device) -> Any:
        torch.manual_seed(0)
        images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (24, 3, 2, 2), dtype=np.uint8))
        labels = torch.arange(24) // 2  # 12 classes of 2 images
        positions = {c: np.flatnonzero(labels.numpy() == c) for c in range(12)}
        miner = ClosenessDiversityMiner(
            positions, load=lambda p: images[torch.from_numpy(np.asarray(p))], classes=4, num_easy=2,
            num_hard=1, negatives=3, scale=16.0,
        )  # fmt: skip
        backbone = nn.Linear(12, E).to(device)
        classifier = PartialFC("arcface", E, 12, init_seed=0).to(device)
        scores = DifficultyScores(24, seed=2).to(device)
        batch = labels[:12].to(device)
        embed = lambda im: im.to(device).float().flatten(1) / 255.0  # noqa: E731
        out = classifier.scores(backbone(embed(images[:12])), batch, keep_cosines=True)
        scores.update(torch.arange(12).to(device), out.target_cos)
        summed, terms = miner.gradient(
            backbone, classifier, out.cosines, scores, batch, embed, np.random.default_rng(0)
        )
        return {"grads": summed, "terms": [terms.closeness, terms.diversity, terms.threshold], "ce": out.ce}

    return {
        "mining:top_negative_classes": top_negatives,
        "mining:difficulty_scores": difficulty,
        "mining:closeness_diversity_miner": closeness_diversity_miner,
    }


def all_cases() -> dict[str, Callable[[torch.device], Any]]:
    cases: dict[str, Callable[[torch.device], Any]] = {}
    for name in HEADS.names():
        cases[f"head:{name}"] = head_case(name)
        cases[f"partial_fc:{name}"] = partial_fc_case(name, 1.0, 0.0)
        cases[f"partial_fc:{name}:sampled_filtered"] = partial_fc_case(name, 0.5, 0.2)
    for name in LOSSES.names():
        cases.update(loss_cases(name))
    cases.update(loss_function_cases())
    cases.update(mining_cases())
    return cases


# Public functions and classes of ``losses`` and ``mining`` -> the case that runs them on the stand-in
# accelerator, or why none is needed.
COVERAGE = {
    "losses.closeness_diversity.closeness_loss": "function:closeness_diversity_losses",
    "losses.closeness_diversity.diversity_loss": "function:closeness_diversity_losses",
    "losses.closeness_diversity.diversity_prototypes": "function:closeness_diversity_losses",
    "losses.probface.mutual_likelihood_score": "function:probface_distances",
    "losses.probface.pairwise_mls": "function:probface_distances",
    "losses.probface.attention_distance": "function:probface_distances",
    "losses.probface.mls_loss": "loss:probface",
    "losses.probface.output_constraint": "loss:probface:l1_mu_gradient",
    "losses.probface.attention_triplet_loss": "loss:probface:l1_mu_gradient",
    "losses.probface_loss.ProbFaceLoss": "loss:probface",
    "losses.softmax_losses.per_sample_ce": "function:distances_and_ce",
    "losses.softmax_losses.inverse_log_frequency_weights": "exempt: class counts from the data, on the CPU "
    "by design; the weights travel with the loss's buffer (loss:cross_entropy:class_weights)",
    "losses.softmax_losses.CrossEntropy": "loss:cross_entropy",
    "losses.softmax_losses.FocalLoss": "loss:focal",
    "losses.softmax_losses.FRABSMLoss": "loss:frabsm_weight",
    "losses.triplet_loss.pairwise_distances": "function:distances_and_ce",
    "losses.triplet_loss.triplet_from_distances": "loss:triplet:semi_hard",
    "losses.triplet_loss.TripletLoss": "loss:triplet:batch_hard",
    "mining.difficulty.DifficultyScores": "mining:difficulty_scores",
    "mining.difficulty.top_negative_classes": "mining:top_negative_classes",
    "mining.difficulty.EasyHardSampler": "sampler: NumPy indices (test_samplers_make_no_tensors)",
    "mining.closeness_diversity.ClosenessDiversityMiner": "mining:closeness_diversity_miner",
    "mining.closeness_diversity.MinedTerms": "exempt: a record of Python floats",
    "mining.closeness_diversity.is_mining_step": "exempt: integers only",
    "mining.pk_sampler.PKSampler": "sampler: NumPy indices (test_samplers_make_no_tensors)",
}


def public_parts() -> list[str]:
    """Every public function and class defined in a module of ``losses`` or ``mining``."""
    found = []
    for package in (losses, mining):
        for info in pkgutil.iter_modules(package.__path__, package.__name__ + "."):
            module = importlib.import_module(info.name)
            for attr, obj in vars(module).items():
                defined_here = getattr(obj, "__module__", None) == module.__name__
                if (
                    not attr.startswith("_")
                    and defined_here
                    and (inspect.isfunction(obj) or inspect.isclass(obj))
                ):
                    found.append(f"{module.__name__}.{attr}")
    return sorted(found)


# ------------------------------------------------------------------------------------- child process


def _compare(fake: Any, cpu: Any, where: str = "") -> str:
    """'' when the stand-in's results equal the CPU's (to 1e-5 of their scale), else the first difference."""
    if isinstance(cpu, torch.Tensor):
        if not isinstance(fake, torch.Tensor) or fake.shape != cpu.shape or fake.dtype != cpu.dtype:
            return f"{where}: {fake!r} vs {cpu!r}"
        if cpu.is_floating_point():
            scale = float(cpu.abs().max()) if cpu.numel() else 0.0
            bad = cpu.numel() and float((fake - cpu).abs().max()) > 1e-5 * max(scale, 1e-12)
        else:
            bad = not torch.equal(fake, cpu)
        return f"{where}: values differ" if bad else ""
    if isinstance(cpu, dict):
        return next((m for k in cpu if (m := _compare(fake.get(k), cpu[k], f"{where}.{k}"))), "")
    if isinstance(cpu, (list, tuple)):
        return next((m for i, c in enumerate(cpu) if (m := _compare(fake[i], c, f"{where}[{i}]"))), "")
    if isinstance(cpu, float):
        return "" if abs(fake - cpu) <= 1e-5 * max(abs(cpu), 1e-12) else f"{where}: {fake} vs {cpu}"
    return "" if fake == cpu else f"{where}: {fake!r} vs {cpu!r}"


def run_case(case: Callable[[torch.device], Any]) -> str:
    """'' when ``case`` runs on the stand-in accelerator and agrees with the CPU; else what went wrong."""
    try:
        with DeviceDiscipline():
            fake = to_cpu(case(fake_device()))
    except DeviceMismatch as err:
        return f"DeviceMismatch: {err}"
    except Exception as err:  # reported per case
        return f"{type(err).__name__}: {err}"
    cpu = to_cpu(case(torch.device("cpu")))
    differs = _compare(fake, cpu)
    return f"the stand-in's results differ from the CPU's: {differs}" if differs else ""


def _mls_loss_mask_on_cpu(mu: torch.Tensor, sigma2: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """ProbFace's MLS loss with its diagonal mask made without the inputs' device (the old bug)."""
    from losses.probface import pairwise_mls

    scores = pairwise_mls(F.normalize(mu.detach(), dim=1), sigma2)
    diagonal = torch.eye(len(labels), dtype=torch.bool)
    genuine = (labels.unsqueeze(0) == labels.unsqueeze(1)) & ~diagonal
    return -scores[genuine].mean()


class _BrokenProbFaceLoss(nn.Module):
    def forward(self, outputs: tuple[torch.Tensor, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        return _mls_loss_mask_on_cpu(F.normalize(outputs[0], dim=1), outputs[1].exp(), labels)


class _BrokenMaskHead(CosFace):
    """CosFace with its target mask made on the CPU: ``torch.arange(C)`` without ``device=``."""

    def margin(
        self,
        cos: torch.Tensor,
        labels: torch.Tensor,
        norms: torch.Tensor,
        cos_y_all: torch.Tensor | None = None,
    ) -> torch.Tensor:
        onehot = torch.arange(cos.shape[1]) == labels.unsqueeze(1)
        return torch.where(onehot, cos - self.m, cos)


def discipline_report() -> dict[str, str]:
    """Child process: every case's verdict, then the deliberately broken parts' (which must fail)."""
    torch.set_num_threads(1)
    install_fake_accelerator()
    report = {name: run_case(case) for name, case in all_cases().items()}
    # the broken parts go through the registries and the same cases as the real ones
    LOSSES._factories["_broken_probface"] = _BrokenProbFaceLoss
    HEADS._factories["_broken_mask_head"] = _BrokenMaskHead
    try:

        def probface_inputs(device: torch.device) -> Any:  # ProbFace's input: (embeddings, log sigma^2)
            loss_fn = LOSSES.build("_broken_probface").to(device)
            x, y = inputs(device)
            return {"loss": loss_fn((x, x[:, :1] * 0.1 - 3.0), y)}

        report["broken:probface_mask"] = run_case(probface_inputs)
        report["broken:head_mask"] = run_case(head_case("_broken_mask_head"))
        report["broken:head_mask_partial_fc"] = run_case(partial_fc_case("_broken_mask_head", 1.0, 0.0))
    finally:
        del LOSSES._factories["_broken_probface"], HEADS._factories["_broken_mask_head"]
    return report


@pytest.fixture(scope="module")
def report() -> dict[str, str]:
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(discipline_report)


# --------------------------------------------------------------------------------------------- tests


CASE_NAMES = sorted(all_cases())


@pytest.mark.parametrize("case", CASE_NAMES)
def test_device_discipline(report: dict[str, str], case: str) -> None:
    assert report[case] == "", f"{case}: {report[case]}"


def test_broken_parts_are_caught(report: dict[str, str]) -> None:
    """A loss building its mask on the CPU (ProbFace's old bug) and a head building its one-hot on the
    CPU are refused, alone and through Partial FC: the check can fail."""
    assert report["broken:probface_mask"].startswith("DeviceMismatch: aten.bitwise_and")
    assert "meets tensors on fakegpu:0" in report["broken:probface_mask"]
    for case in ("broken:head_mask", "broken:head_mask_partial_fc"):
        assert report[case].startswith("DeviceMismatch: aten.eq"), report[case]


def built_in(registry, package: str) -> list[str]:
    """The names ``registry`` holds from the framework's own ``package`` (a user's parts, registered by
    other tests through custom_imports in this process, are theirs to check)."""
    return [n for n in registry.names() if registry.get(n).__module__.split(".")[0] == package]


def test_every_registered_part_has_cases() -> None:
    names = set(CASE_NAMES)
    assert built_in(HEADS, "heads") and built_in(LOSSES, "losses")
    for head in built_in(HEADS, "heads"):
        assert {f"head:{head}", f"partial_fc:{head}", f"partial_fc:{head}:sampled_filtered"} <= names
    for loss in built_in(LOSSES, "losses"):
        assert any(n == f"loss:{loss}" or n.startswith(f"loss:{loss}:") for n in names), loss
    assert {f"loss:triplet:{m}" for m in MINERS} <= names


def test_every_public_loss_and_mining_part_is_covered() -> None:
    missing = [part for part in public_parts() if part not in COVERAGE]
    assert not missing, f"no device-discipline case or exemption for {missing}: add one to COVERAGE"
    for part, where in COVERAGE.items():
        if not where.startswith(("exempt:", "sampler:")):
            assert where in CASE_NAMES, f"{part}: case {where!r} does not exist"


def test_samplers_make_no_tensors() -> None:
    """The samplers yield plain integers (keys, dataset positions): nothing of theirs lives on a device."""
    from data.sampler import GlobalBatchSampler, PKBatchSampler
    from mining import EasyHardSampler, PKSampler

    positions = {c: np.arange(4 * c, 4 * c + 4) for c in range(6)}
    batches = [
        *GlobalBatchSampler(24, 4, world_size=2, rank=1, grad_accum=2, seed=1),
        *PKBatchSampler(positions, 4, 2, world_size=1, rank=0, seed=1),
        *PKSampler(positions, p=2, k=3, seed=1),
    ]
    flat = [i for batch in batches for key in batch for i in (key if isinstance(key, tuple) else (key,))]
    assert flat and all(type(i) is int for i in flat)
    picked = EasyHardSampler(positions, num_easy=2, num_hard=1, num_probe=100).sample(
        np.array([1, 4]), np.linspace(0, 1, 24), np.random.default_rng(0)
    )
    assert all(isinstance(v, np.ndarray | np.floating) for v in picked.values())


# ------------------------------------------------------------------------------- bf16 autocast, CPU

BF16_UNIT = 2.0**-8  # bf16's unit roundoff: 8 significant bits
FEATURES, CLASSES, WIDTH = 32, 16, 16


def autocast_run(kind: str, name: str, bf16: bool, steps: int = 5) -> dict[str, Any]:
    """``steps`` SGD steps of a linear "backbone" on fixed seeded features with registered head ``name``
    (through Partial FC, one process) or loss ``name``, the whole step under CPU bf16 autocast when
    ``bf16``. Returns the losses, the first step's gradients and the trained parameters."""
    g = torch.Generator().manual_seed(0)
    features = torch.randn(64, FEATURES, generator=g)
    labels = torch.arange(64) % CLASSES
    torch.manual_seed(0)
    backbone, uncertainty = nn.Linear(FEATURES, WIDTH), nn.Linear(FEATURES, 1)
    params = list(backbone.parameters())
    loss_fn, classifier = None, None
    if kind == "head":
        classifier = PartialFC(name, WIDTH, CLASSES, init_seed=0)
    else:
        loss_fn = LOSSES.build(name)
        if hasattr(loss_fn, "reduce"):
            classifier = PartialFC("arcface", WIDTH, CLASSES, init_seed=0)
        elif isinstance(loss_fn, ProbFaceLoss):
            params += list(uncertainty.parameters())
    if classifier is not None:
        params += list(classifier.parameters())
    optimizer = torch.optim.SGD(params, lr=0.05, momentum=0.9)
    losses, first_grads = [], None
    for _ in range(steps):
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            emb = backbone(features)
            if kind == "head":
                loss = classifier(emb, labels)
                regularizer = getattr(classifier.head, "regularizer", None)
                loss = loss + regularizer(emb) if regularizer is not None else loss
            elif classifier is not None:
                loss = loss_fn.reduce(*classifier.per_sample_ce(emb, labels))
            elif isinstance(loss_fn, ProbFaceLoss):
                loss = loss_fn((emb, uncertainty(features) - 3.0), labels)
            else:
                loss = loss_fn(emb, labels)
        loss.backward()
        if first_grads is None:
            first_grads = [p.grad.detach().clone() for p in params if p.grad is not None]
        optimizer.step()
        losses.append(loss.detach().float())
    return {"losses": torch.stack(losses), "grads": first_grads, "params": [p.detach() for p in params]}


AUTOCAST_PARTS = [("head", n) for n in HEADS.names()] + [("loss", n) for n in LOSSES.names()]
# Hard-example selection (batch-hard triplets) flips under bf16 rounding, moving whole gradient rows: its
# first-step gradients are not compared, its losses are.
SELECTION_BY_VALUE = {("loss", "triplet")}


@pytest.mark.parametrize(("kind", "name"), AUTOCAST_PARTS, ids=[f"{k}:{n}" for k, n in AUTOCAST_PARTS])
def test_bf16_autocast_trains_close_to_fp32(kind: str, name: str) -> None:
    """Bounds, in bf16 unit roundoffs u = 2^-8: the first loss within u (rounding the embeddings moves
    s * cos by about s u / 2), every loss of 5 steps within 8u = 3.1% (measured at most 2.0%, CurricularFace,
    whose hard-negative set changes with rounding), the first step's gradients within 16u = 6.3% of their
    largest |value| (measured at most 1.3%: bf16 matmuls in the linear layer's backward)."""
    fp32 = autocast_run(kind, name, bf16=False)
    bf16 = autocast_run(kind, name, bf16=True)
    assert torch.isfinite(bf16["losses"]).all(), bf16["losses"]
    assert all(torch.isfinite(p).all() for p in bf16["params"])
    assert bf16["losses"][-1] < bf16["losses"][0], f"{name} does not train under bf16: {bf16['losses']}"
    relative = ((bf16["losses"] - fp32["losses"]).abs() / fp32["losses"].abs()).tolist()
    assert relative[0] <= BF16_UNIT, relative
    assert max(relative) <= 8 * BF16_UNIT, relative
    if (kind, name) not in SELECTION_BY_VALUE:
        for got, want in zip(bf16["grads"], fp32["grads"], strict=True):
            assert (got - want).abs().max() <= 16 * BF16_UNIT * want.abs().max()


# ------------------------------------------------------------------------------ torch.compile, CPU
# The smallest network that runs the framework's backbone code: IResNet with one block per stage, 16x16
# input (compiling MobileFaceNet takes minutes on 2 cores). Compilation takes tens of seconds here (more
# with a cold inductor cache), hence ``slow``.

COMPILE_BATCH, COMPILE_CLASSES, COMPILE_SIZE = 8, 10, 16


def tiny_backbone() -> nn.Module:
    from backbones.iresnet import IResNet

    torch.manual_seed(0)
    return IResNet((1, 1, 1, 1), embedding_size=WIDTH, input_size=COMPILE_SIZE)


def compile_batch(rank: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(10 + rank)
    images = torch.randint(
        0, 256, (COMPILE_BATCH, 3, COMPILE_SIZE, COMPILE_SIZE), generator=g, dtype=torch.uint8
    )
    return images, torch.randint(0, COMPILE_CLASSES, (COMPILE_BATCH,), generator=g)


def training_steps(compiled: bool, steps: int = 2, ddp: bool = False, rank: int = 0) -> dict[str, Any]:
    """``steps`` steps as train.py takes them (normalised uint8 batch, backbone, Partial FC, summed DDP
    gradients, SGD), the backbone, or its DDP wrapper, compiled by ``torch.compile`` when ``compiled``."""
    from torch.nn.parallel import DistributedDataParallel

    from core.distributed import register_sum_hook
    from data.transforms import normalize_batch

    backbone = tiny_backbone()
    classifier = PartialFC("arcface", WIDTH, COMPILE_CLASSES, init_seed=0)
    model: nn.Module = backbone
    if ddp:
        model = DistributedDataParallel(backbone, bucket_cap_mb=4, static_graph=True)
        register_sum_hook(model)
    if compiled:
        model = torch.compile(model)
    named = [*backbone.named_parameters(), *(("head." + k, v) for k, v in classifier.named_parameters())]
    params = {k: v for k, v in named if v.requires_grad}
    start = {k: v.detach().clone() for k, v in params.items()}
    optimizer = torch.optim.SGD(params.values(), lr=0.1, momentum=0.9)
    images, labels = compile_batch(rank)
    losses, first_grads = [], {}
    for _ in range(steps):
        optimizer.zero_grad()
        loss = classifier(model(normalize_batch(images)), labels)
        loss.backward()
        first_grads = first_grads or {k: v.grad.clone() for k, v in params.items()}
        optimizer.step()
        losses.append(loss.detach())
    return {
        "losses": torch.stack(losses),
        "grads": first_grads,
        "updates": {k: v.detach() - start[k] for k, v in params.items()},
        "buffers": {k: v.clone() for k, v in [*backbone.named_buffers(), *classifier.named_buffers()]},
    }


def training_differences(compiled: dict[str, Any], eager: dict[str, Any]) -> dict[str, float]:
    """The greatest |compiled - eager| of the losses, of all first-step gradients, all updates (weights
    after the steps minus before) and all float buffers, each set taken as one vector and the difference
    relative to its largest |value| (a bias before a BatchNorm has a gradient of rounding noise, whose own
    scale means nothing); integer buffers (BN's batch counts) must be equal."""

    def flat(tensors: dict[str, torch.Tensor], keys: list[str]) -> torch.Tensor:
        return torch.cat([tensors[k].double().flatten() for k in keys])

    worst = {}
    for part in ("losses", "grads", "updates", "buffers"):
        if part == "losses":
            got, want = compiled[part].double(), eager[part].double()
        else:
            for key, value in eager[part].items():
                if not value.is_floating_point():
                    assert torch.equal(compiled[part][key], value), f"{part}.{key}"
            keys = [k for k, v in eager[part].items() if v.is_floating_point()]
            got, want = flat(compiled[part], keys), flat(eager[part], keys)
        worst[part] = float((got - want).abs().max() / want.abs().max())
    return worst


# Bounds relative to each set's largest |value|: inductor fuses and reorders fp32 reductions (BN
# statistics, the convolutions' backward). Measured: losses 9e-7, first-step gradients 3.4e-6, buffers
# 2.4e-6 (1 process and 2 gloo ranks); the updates after 2 steps 3.2e-6 on one process and 1.1e-4 under
# DDP (whose compiled graph is split at the gradient buckets), where the first step's rounding passes
# through a momentum SGD step at lr 0.1 on ArcFace's s = 64 logits.
COMPILE_RTOL = {"losses": 1e-4, "grads": 1e-4, "buffers": 1e-4, "updates": 1e-3}


def assert_compiled_equals_eager(compiled: dict[str, Any], eager: dict[str, Any]) -> None:
    worst = training_differences(compiled, eager)
    assert all(worst[k] <= COMPILE_RTOL[k] for k in COMPILE_RTOL), worst


@pytest.mark.slow
def test_compiled_training_step_equals_eager() -> None:
    torch._dynamo.reset()
    assert_compiled_equals_eager(training_steps(True), training_steps(False))


def _compiled_ddp_worker(rank: int, out: str) -> None:
    import torch.distributed as dist

    from tests.conftest import rendezvous

    dist.init_process_group("gloo", init_method=rendezvous(out), rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        results = {"compiled": training_steps(True, ddp=True, rank=rank),
                   "eager": training_steps(False, ddp=True, rank=rank)}  # fmt: skip
        torch.save(results, f"{out}/rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_compiled_ddp_training_step_equals_eager_on_two_gloo_processes(tmp_path) -> None:
    """train.py's order: DDP (summing hook, static graph, several buckets) and then torch.compile."""
    import torch.multiprocessing as mp

    mp.spawn(_compiled_ddp_worker, args=(str(tmp_path),), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for result in ranks:
        assert_compiled_equals_eager(result["compiled"], result["eager"])
    # the ranks trained one model: the same weights everywhere, from different local batches
    for key, value in ranks[0]["compiled"]["updates"].items():
        if not key.startswith("head."):  # the class centres are sharded: each rank holds its own
            assert torch.equal(value, ranks[1]["compiled"]["updates"][key]), key
    assert not torch.equal(*(compile_batch(r)[0] for r in range(2)))


@pytest.mark.slow
def test_compiled_extractor_gives_the_eager_features() -> None:
    from evaluation.embedders import TorchEmbedder
    from evaluation.extract import extract
    from tests.conftest import assert_close_scaled

    torch._dynamo.reset()
    backbone = tiny_backbone()
    training_images, _ = compile_batch(1)
    backbone.train()(normalize(training_images))  # BN statistics away from their start
    images = compile_batch(2)[0].numpy()
    eager = extract(TorchEmbedder(backbone), images, batch_size=4)
    compiled = extract(TorchEmbedder(torch.compile(backbone)), images, batch_size=4)
    for got, want in zip(compiled, eager, strict=True):
        assert_close_scaled(got, want, 1e-4)
    assert not np.allclose(eager[0], eager[1])  # flips give other features: both passes ran


def normalize(images: torch.Tensor) -> torch.Tensor:
    from data.transforms import normalize_batch

    return normalize_batch(images)
