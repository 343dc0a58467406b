"""Partial FC: 2 gloo processes on CPU against a single process holding every class."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from heads import build_head
from heads.partial_fc import PartialFC, shard_range
from losses import build_loss
from tests.conftest import rendezvous

E, C, B, WORLD = 8, 11, 6, 2  # 11 classes: uneven shards of 6 and 5


def problem(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(C, E, generator=g, dtype=torch.float64)
    x = torch.randn(WORLD * B, E, generator=g, dtype=torch.float64) * 15
    y = torch.randint(0, C, (WORLD * B,), generator=g)
    return weight, x, y


HEADS = [("arcface", {}), ("cosface", {}), ("adaface", {}), ("curricularface", {})]


def reference(name: str, params: dict) -> dict[str, torch.Tensor]:
    weight, x, y = problem()
    head = build_head(name, embedding_size=E, num_classes=C, **params).double().train()
    if name == "curricularface":
        head.t.fill_(0.2)
    head.weight.data.copy_(weight)
    x = x.clone().requires_grad_()
    loss = F.cross_entropy(head(x, y), y)
    loss.backward()
    return {"loss": loss.detach(), "x_grad": x.grad, "w_grad": head.weight.grad, "state": head.state_dict()}


def _worker(rank: int, out: str, name: str, params: dict, sample_rate: float, filtering: float) -> None:
    dist.init_process_group("gloo", init_method=rendezvous(out), rank=rank, world_size=WORLD)
    try:
        weight, x, y = problem()
        pfc = PartialFC(name, E, C, sample_rate, interclass_filtering_threshold=filtering, **params)
        pfc = pfc.double().train()
        state = {"weight": weight}
        if name == "curricularface":
            state["t"] = torch.tensor(0.2, dtype=torch.float64)
        if name == "adaface":
            state.update(batch_mean=torch.tensor(20.0).double(), batch_std=torch.tensor(100.0).double())
        pfc.load_state_dict(state)
        x_local = x[rank * B : (rank + 1) * B].clone().requires_grad_()
        scores = pfc.scores(x_local, y[rank * B : (rank + 1) * B])
        loss = scores.ce.mean()  # = pfc(x_local, labels)
        loss.backward()
        full_state = pfc.state_dict()  # collective: every rank calls it
        torch.save(
            {
                "loss": loss.detach(),
                "x_grad": x_local.grad,
                "w_grad": pfc.head.weight.grad,
                "index": scores.index,
                "state": full_state,
            },
            Path(out) / f"rank{rank}.pt",
        )
        dist.barrier()  # nobody tears the group down while another rank still uses it
    finally:
        dist.destroy_process_group()


def run_two_ranks(
    tmp_path: Path, name: str, params: dict, sample_rate: float = 1.0, filtering: float = 0.0
) -> list[dict]:
    args = (str(tmp_path), name, params, sample_rate, filtering)
    mp.spawn(_worker, args=args, nprocs=WORLD, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def test_shard_ranges_cover_all_classes():
    for num, world in ((11, 2), (10, 3), (5, 5), (1000, 8)):
        ranges = [shard_range(num, r, world) for r in range(world)]
        assert ranges[0][0] == 0
        assert all(a[0] + a[1] == b[0] for a, b in itertools.pairwise(ranges))
        assert sum(n for _, n in ranges) == num and max(n for _, n in ranges) - min(n for _, n in ranges) <= 1


@pytest.mark.parametrize(("name", "params"), HEADS)
def test_single_process_partial_fc_equals_full_softmax(name, params):
    ref = reference(name, params)
    weight, x, y = problem()
    pfc = PartialFC(name, E, C, **params).double().train()
    state = {**ref["state"], "weight": weight}
    if name == "curricularface":
        state["t"] = torch.tensor(0.2, dtype=torch.float64)
    if name == "adaface":
        state.update(batch_mean=torch.tensor(20.0).double(), batch_std=torch.tensor(100.0).double())
    pfc.load_state_dict(state)
    x = x.clone().requires_grad_()
    loss = pfc(x, y)
    loss.backward()
    torch.testing.assert_close(loss, ref["loss"], atol=1e-10, rtol=0)
    torch.testing.assert_close(x.grad, ref["x_grad"], atol=1e-10, rtol=0)
    torch.testing.assert_close(pfc.head.weight.grad, ref["w_grad"], atol=1e-10, rtol=0)


@pytest.mark.parametrize(("name", "params"), HEADS)
def test_two_gloo_ranks_equal_single_process(tmp_path, name, params):
    ref = reference(name, params)
    results = run_two_ranks(tmp_path, name, params)
    for rank, res in enumerate(results):
        torch.testing.assert_close(res["loss"], ref["loss"], atol=1e-5, rtol=0)
        torch.testing.assert_close(res["x_grad"], ref["x_grad"][rank * B : (rank + 1) * B], atol=1e-5, rtol=0)
        start, n = shard_range(C, rank, WORLD)
        torch.testing.assert_close(res["w_grad"], ref["w_grad"][start : start + n], atol=1e-5, rtol=0)
        # head statistics come from the global batch, so they match the single process after the step
        for key, value in ref["state"].items():
            if key != "weight":
                torch.testing.assert_close(res["state"][key], value, atol=1e-10, rtol=0)


def test_sampling_keeps_every_positive_and_loss_is_finite(tmp_path):
    results = run_two_ranks(tmp_path, "arcface", {}, sample_rate=0.3)
    _, _, y = problem()
    for rank, res in enumerate(results):
        start, n = shard_range(C, rank, WORLD)
        positives = {int(c) - start for c in y if start <= c < start + n}
        assert positives <= set(res["index"].tolist())
        assert len(res["index"]) == max(int(0.3 * n), len(positives))
        assert torch.isfinite(res["loss"])


def test_unsharded_checkpoint_moves_from_two_ranks_to_one(tmp_path):
    results = run_two_ranks(tmp_path, "adaface", {})
    saved = results[0]["state"]
    assert saved["weight"].shape == (C, E)
    other = results[1]["state"]["weight"]  # rank 0 alone assembles the centres, the others hold no copy
    assert other.is_meta and other.shape == (C, E)
    weight, x, y = problem()
    torch.testing.assert_close(saved["weight"], weight)  # gathered back in class order
    one = PartialFC("adaface", E, C).double().eval()
    one.load_state_dict(saved)
    full = build_head("adaface", embedding_size=E, num_classes=C).double().eval()
    full.load_state_dict(saved)
    with torch.no_grad():
        torch.testing.assert_close(one.head(x, y), full(x, y))


def test_bad_inputs():
    pfc = PartialFC("arcface", E, C)
    with pytest.raises(ValueError, match=r"PartialFC: label 11 outside \[0, 11\)"):
        pfc(torch.zeros(2, E), torch.tensor([0, 11]))
    with pytest.raises(ValueError, match="sample_rate must be in"):
        PartialFC("arcface", E, C, sample_rate=0.0)
    for bad in (-0.1, 1.0):
        with pytest.raises(
            ValueError, match=rf"interclass_filtering_threshold must be in \[0, 1\).*got {bad}"
        ):
            PartialFC("arcface", E, C, interclass_filtering_threshold=bad)
    with pytest.raises(ValueError, match=r"checkpoint weight of shape \(3, 8\)"):
        pfc.load_state_dict({"weight": torch.zeros(3, E)})


LOSSES_ON_CE = [
    ("focal", {"gamma": 2.0}),
    ("frabsm_weight", {"alpha": 1.0, "p0": 0.6, "reduction": "sample"}),
]


def _loss_worker(rank: int, out: str, loss_name: str, loss_params: dict) -> None:
    dist.init_process_group("gloo", init_method=rendezvous(out), rank=rank, world_size=WORLD)
    try:
        weight, x, y = problem()
        pfc = PartialFC("arcface", E, C, init_seed=5).double().train()
        init = pfc.state_dict()["weight"]  # collective
        pfc.load_state_dict({"weight": weight})
        optimizer = torch.optim.SGD(pfc.parameters(), lr=0.1, momentum=0.9)
        x_local = x[rank * B : (rank + 1) * B].clone().requires_grad_()
        ce, all_labels, _, _, cosines = pfc.scores(x_local, y[rank * B : (rank + 1) * B], keep_cosines=True)
        negatives = pfc.top_negatives(cosines, 4)  # ranked across both shards
        wanted = torch.tensor([rank, C - 1 - rank, 5])  # centres living on either rank
        centres = pfc.gather_centres(wanted)
        loss = build_loss(loss_name, **loss_params).reduce(ce, all_labels)
        loss.backward()
        optimizer.step()
        torch.save(
            {"loss": loss.detach(), "x_grad": x_local.grad, "labels": all_labels, "init": init,
             "optimizer": pfc.optimizer_state_dict(optimizer), "negatives": negatives, "wanted": wanted,
             "centres": centres},
            Path(out) / f"rank{rank}.pt",
        )  # fmt: skip
        dist.barrier()  # nobody tears the group down while another rank still uses it
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(("loss_name", "loss_params"), LOSSES_ON_CE)
def test_losses_on_sharded_cross_entropy_equal_full_logits(tmp_path, loss_name, loss_params):
    weight, x, y = problem()
    head = build_head("arcface", embedding_size=E, num_classes=C).double().train()
    head.weight.data.copy_(weight)
    xr = x.clone().requires_grad_()
    ref_loss = build_loss(loss_name, **loss_params)(head(xr, y), y)
    ref_loss.backward()
    ref_opt = torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9)
    ref_opt.step()

    mp.spawn(_loss_worker, args=(str(tmp_path), loss_name, loss_params), nprocs=WORLD, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    for rank, res in enumerate(results):
        torch.testing.assert_close(res["labels"], y)  # rank r's samples come r-th
        torch.testing.assert_close(res["loss"], ref_loss.detach(), atol=1e-6, rtol=0)
        torch.testing.assert_close(res["x_grad"], xr.grad[rank * B : (rank + 1) * B], atol=1e-6, rtol=0)
        # the momentum of every class centre, gathered from both shards, equals the single process's
        # (assembled on rank 0; the other ranks get shape-only meta tensors)
        momentum = res["optimizer"]["state"][0]["momentum_buffer"]
        if rank > 0:
            assert momentum.is_meta and res["init"].is_meta and momentum.shape == res["init"].shape == (C, E)
            continue
        torch.testing.assert_close(momentum, ref_opt.state[head.weight]["momentum_buffer"], atol=1e-6, rtol=0)
        # centres drawn per block of classes from the seed: the same start at any world size
        torch.testing.assert_close(res["init"], PartialFC("arcface", E, C, init_seed=5).head.weight.double())

    # hard negatives ranked across shards and centres fetched from their owners equal the full classifier's
    cos = F.normalize(x, dim=1) @ F.normalize(weight, dim=1).T
    cos[torch.arange(len(y)), y] = float("-inf")
    expected = cos.topk(4, dim=1).indices
    for res in results:
        assert torch.equal(res["negatives"], expected)
        torch.testing.assert_close(res["centres"], weight[res["wanted"]].float())

    # the gathered optimizer state loads into one process holding all classes
    one = PartialFC("arcface", E, C).double()
    opt = torch.optim.SGD(one.parameters(), lr=0.1, momentum=0.9)
    one.load_optimizer_state_dict(opt, results[0]["optimizer"])
    torch.testing.assert_close(
        opt.state[one.head.weight]["momentum_buffer"], ref_opt.state[head.weight]["momentum_buffer"]
    )


@pytest.mark.parametrize(
    ("name", "init"), [("arcface", "normal_0.01"), ("adaface", "unit"), ("adaface", "normal_0.01")]
)
def test_seeded_centres_follow_the_head_init_at_any_world_size(monkeypatch, name, init):
    import heads.partial_fc as partial_fc

    monkeypatch.setattr(PartialFC, "INIT_BLOCK", 4)  # several seeded blocks, cut differently by the shards

    def all_shards(world: int) -> torch.Tensor:
        parts = []
        for rank in range(world):
            monkeypatch.setattr(partial_fc, "get_rank", lambda r=rank: r)
            monkeypatch.setattr(partial_fc, "get_world_size", lambda w=world: w)
            parts.append(PartialFC(name, 256, C, init_seed=7, init=init).head.weight.detach())
        return torch.cat(parts)

    one = all_shards(1)
    torch.testing.assert_close(all_shards(3), one, rtol=0, atol=0)
    norms = one.double().norm(dim=1)
    if init == "unit":
        torch.testing.assert_close(norms, torch.ones_like(norms), rtol=1e-6, atol=1e-6)
    else:
        assert one.double().std().item() == pytest.approx(0.01, rel=0.05)
        assert norms.mean().item() == pytest.approx(0.01 * math.sqrt(256), rel=0.05)


# -- inter-class filtering (arcface_torch) ------------------------------------------------------------------

FILTER = 0.2  # on problem(): about a quarter of the non-target cosines lie above it, and two targets


def arcface_torch_filtered_loss(
    weight: torch.Tensor, x: torch.Tensor, y: torch.Tensor, threshold: float, margin: str, s: float = 64.0
) -> torch.Tensor:
    """arcface_torch's CombinedMarginLoss (losses.py) with ``interclass_filtering_threshold`` and the mean
    softmax cross-entropy of PartialFC_V2, written from their definitions for one process holding every
    class: non-target cosines above the threshold are multiplied by a no-grad 0; then ArcFace (m1 1,
    m2 0.5, m3 0: arccos, + m at the target, cos, all without gradient) or CosFace (m3 0.4 subtracted at
    the target)."""
    cos = (F.normalize(x, dim=1) @ F.normalize(weight, dim=1).T).clamp(-1, 1)
    rows = torch.arange(len(y))
    if threshold > 0:
        with torch.no_grad():
            dirty = (cos > threshold).to(cos.dtype)
            dirty[rows, y] = 0.0  # every label is on this one process
        cos = (1.0 - dirty) * cos
    if margin == "arcface":
        with torch.no_grad():
            theta = cos.acos()
            theta[rows, y] += 0.5
            shift = theta.cos() - cos  # the in-place rewrite changes the values, not the gradient
        logits = cos + shift
    else:
        logits = cos - 0.4 * F.one_hot(y, cos.shape[1]).to(cos.dtype)
    return F.cross_entropy(s * logits, y)


FILTER_HEADS = [("arcface", {"variant": "straight_through"}, "arcface"), ("cosface", {"m": 0.4}, "cosface")]


def filtered_reference(margin: str) -> dict[str, torch.Tensor]:
    weight, x, y = problem()
    weight, x = weight.clone().requires_grad_(), x.clone().requires_grad_()
    loss = arcface_torch_filtered_loss(weight, x, y, FILTER, margin)
    loss.backward()
    unfiltered = arcface_torch_filtered_loss(weight.detach(), x.detach(), y, 0.0, margin)
    assert abs(loss.item() - unfiltered.item()) > 0.1 * abs(unfiltered.item())  # the filter matters here
    return {"loss": loss.detach(), "x_grad": x.grad, "w_grad": weight.grad}


def test_filter_threshold_splits_the_test_problem():
    weight, x, y = problem()
    cos = F.normalize(x, dim=1) @ F.normalize(weight, dim=1).T
    target = F.one_hot(y, C).bool()
    assert (cos[~target] > FILTER).sum() >= 10 and (cos[~target] <= FILTER).sum() >= 10
    assert (cos[target] > FILTER).sum() >= 2  # targets above the threshold must stay untouched


@pytest.mark.parametrize(("name", "params", "margin"), FILTER_HEADS)
def test_interclass_filtering_equals_arcface_torch_single_process(name, params, margin):
    ref = filtered_reference(margin)
    weight, x, y = problem()
    pfc = PartialFC(name, E, C, interclass_filtering_threshold=FILTER, **params).double().train()
    pfc.load_state_dict({"weight": weight})
    x = x.clone().requires_grad_()
    loss = pfc(x, y)
    loss.backward()
    scale = ref["loss"].abs().item()
    torch.testing.assert_close(loss, ref["loss"], rtol=1e-9, atol=1e-9 * scale)
    for ours, theirs in ((x.grad, ref["x_grad"]), (pfc.head.weight.grad, ref["w_grad"])):
        torch.testing.assert_close(ours, theirs, rtol=1e-7, atol=1e-9 * theirs.abs().max().item())


@pytest.mark.parametrize(("name", "params", "margin"), FILTER_HEADS)
def test_interclass_filtering_two_gloo_ranks_equal_arcface_torch(tmp_path, name, params, margin):
    ref = filtered_reference(margin)
    results = run_two_ranks(tmp_path, name, params, filtering=FILTER)
    for rank, res in enumerate(results):
        torch.testing.assert_close(res["loss"], ref["loss"], rtol=1e-6, atol=1e-6 * ref["loss"].abs().item())
        x_grad = ref["x_grad"][rank * B : (rank + 1) * B]
        torch.testing.assert_close(res["x_grad"], x_grad, rtol=1e-5, atol=1e-6 * x_grad.abs().max().item())
        start, n = shard_range(C, rank, WORLD)
        w_grad = ref["w_grad"][start : start + n]
        torch.testing.assert_close(res["w_grad"], w_grad, rtol=1e-5, atol=1e-6 * w_grad.abs().max().item())


def test_interclass_filtering_key_reaches_partial_fc():
    from core.config import load_config
    from objectives.classification import build_classifier

    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / "configs" / "base.yaml", ["head.interclass_filtering_threshold=0.4"])
    assert build_classifier(cfg, num_classes=C).interclass_filtering_threshold == 0.4
    assert load_config(root / "configs" / "base.yaml").head.interclass_filtering_threshold == 0.0
