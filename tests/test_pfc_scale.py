"""Partial FC checkpoints at scale: rank 0 alone assembles the unsharded centres and their momentum, the
other ranks send their shard and receive nothing of the others', and the file resumes at another world size
reading only the rows it needs (``scripts/bench_pfc_scale.py`` measures the same code path at 2,059,906
classes). Large gathered tensors live in pages of unlinked files of the run's folder (``core.spill``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from core import spill
from core.checkpoint import load_checkpoint, save_checkpoint
from heads.partial_fc import PartialFC, shard_range
from tests.conftest import rendezvous

E, C, B, WORLD = 64, 3001, 8, 2  # 3001 classes over 2 ranks: shards of 1501 and 1500 rows


def batch(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(B, E, generator=g), torch.randint(0, C, (B,), generator=g)


def _traffic(log: list[tuple[str, int]]) -> dict[str, object]:
    """Wrap the point-to-point and collective calls of ``torch.distributed`` to log the bytes each one
    lands in this process (receive buffers, all-gather outputs) or sends."""
    size = lambda t: t.numel() * t.element_size()  # noqa: E731
    real = {name: getattr(dist, name) for name in ("send", "recv", "all_gather", "broadcast", "all_reduce")}

    def send(tensor, *args, **kwargs):
        log.append(("sent", size(tensor)))
        return real["send"](tensor, *args, **kwargs)

    def recv(tensor, *args, **kwargs):
        log.append(("received", size(tensor)))
        return real["recv"](tensor, *args, **kwargs)

    def all_gather(outputs, tensor, *args, **kwargs):
        log.append(("received", sum(size(t) for t in outputs)))
        return real["all_gather"](outputs, tensor, *args, **kwargs)

    def broadcast(tensor, *args, **kwargs):
        log.append(("received", size(tensor)))
        return real["broadcast"](tensor, *args, **kwargs)

    def all_reduce(tensor, *args, **kwargs):
        log.append(("received", size(tensor)))
        return real["all_reduce"](tensor, *args, **kwargs)

    for name, fn in (("send", send), ("recv", recv), ("all_gather", all_gather), ("broadcast", broadcast),
                     ("all_reduce", all_reduce)):  # fmt: skip
        setattr(dist, name, fn)
    return real


def _worker(rank: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=rendezvous(out), rank=rank, world_size=WORLD)
    try:
        pfc = PartialFC("arcface", E, C, sample_rate=0.5, init_seed=11).train()
        optimizer = torch.optim.SGD(pfc.parameters(), lr=0.1, momentum=0.9)
        x, y = batch(rank)
        pfc(x, y).backward()
        optimizer.step()
        shard = {"weight": pfc.head.weight.detach().clone(),
                 "momentum": optimizer.state[pfc.head.weight]["momentum_buffer"].clone()}  # fmt: skip
        log: list[tuple[str, int]] = []
        real = _traffic(log)
        spill_dir = Path(out) / f"spill{rank}"
        spill.use_directory(spill_dir)  # as train.py does, with every gathered tensor large enough to spill
        spill.MIN_BYTES = 1
        try:
            state = {"head": pfc.state_dict(), "optimizer": pfc.optimizer_state_dict(optimizer)}
        finally:
            spill.use_directory(None)
            for name, fn in real.items():
                setattr(dist, name, fn)
        if rank == 0:
            # rank 0 assembled both in pages of files of the run's folder, whose names are already gone
            for full in (state["head"]["weight"], state["optimizer"]["state"][0]["momentum_buffer"]):
                name = full.untyped_storage().filename
                assert name is not None and Path(name).parent == spill_dir, name
            assert list(spill_dir.iterdir()) == []
            save_checkpoint(Path(out) / "head.pt", state)
        else:
            weight, momentum = state["head"]["weight"], state["optimizer"]["state"][0]["momentum_buffer"]
            assert weight.is_meta and momentum.is_meta and weight.shape == momentum.shape == (C, E)
        torch.save({"shard": shard, "log": log}, Path(out) / f"rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # 2 gloo processes, 10-30 s on 2 busy cores; test_partial_fc checks the rank-0 gather too
def test_checkpoint_gathered_on_rank0_alone_and_resumed_at_another_world_size(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path),), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    shard_bytes = [shard_range(C, r, WORLD)[1] * E * 4 for r in range(WORLD)]

    # the file holds every rank's rows in class order, bit for bit what concatenating the shards gives
    saved = load_checkpoint(tmp_path / "head.pt", mmap=True)
    weight = torch.cat([r["shard"]["weight"] for r in ranks])
    momentum = torch.cat([r["shard"]["momentum"] for r in ranks])
    assert torch.equal(saved["head"]["weight"], weight)
    assert torch.equal(saved["optimizer"]["state"][0]["momentum_buffer"], momentum)
    assert momentum.abs().sum() > 0  # the step moved centres on every rank (positives and sampled ones)
    for r in range(WORLD):
        start, n = shard_range(C, r, WORLD)
        assert momentum[start : start + n].abs().sum() > 0

    # traffic of the two gathers (centres, momentum): rank 0 receives the other ranks' rows once, straight
    # into the result; every other rank sends its shard and receives only the row counts (8 bytes a rank)
    counts = 2 * WORLD * 8
    for r, result in enumerate(ranks):
        received = sum(n for kind, n in result["log"] if kind == "received")
        sent = sum(n for kind, n in result["log"] if kind == "sent")
        if r == 0:
            assert received == counts + 2 * sum(shard_bytes[1:])
            assert sent == 0
        else:
            assert received == counts, f"rank {r} received {received} bytes"
            assert sent == 2 * shard_bytes[r]

    # resumed by one process: all classes, momentum in its own memory (not a view of the mapped file)
    one = PartialFC("arcface", E, C, sample_rate=0.5).train()
    optimizer = torch.optim.SGD(one.parameters(), lr=0.1, momentum=0.9)
    one.load_state_dict(saved["head"])
    one.load_optimizer_state_dict(optimizer, saved["optimizer"])
    assert torch.equal(one.head.weight.detach(), weight)
    loaded = optimizer.state[one.head.weight]["momentum_buffer"]
    assert torch.equal(loaded, momentum)
    file_rows = saved["optimizer"]["state"][0]["momentum_buffer"]
    assert loaded.untyped_storage().data_ptr() != file_rows.untyped_storage().data_ptr()


def test_a_rank_of_another_world_size_takes_its_rows(tmp_path, monkeypatch):
    """A rank of 4 loading a checkpoint of all classes (mmap) holds exactly its block of centres and
    momentum."""
    import heads.partial_fc as partial_fc

    full = PartialFC("cosface", E, C, init_seed=3)
    optimizer = torch.optim.SGD(full.parameters(), lr=0.1, momentum=0.9)
    x, y = batch(0)
    full(x, y).backward()
    optimizer.step()
    save_checkpoint(
        tmp_path / "one.pt", {"head": full.state_dict(), "optimizer": full.optimizer_state_dict(optimizer)}
    )
    saved = load_checkpoint(tmp_path / "one.pt", mmap=True)
    for rank in range(4):
        monkeypatch.setattr(partial_fc, "get_rank", lambda r=rank: r)
        monkeypatch.setattr(partial_fc, "get_world_size", lambda: 4)
        part = PartialFC("cosface", E, C)
        opt = torch.optim.SGD(part.parameters(), lr=0.1, momentum=0.9)
        part.load_state_dict(saved["head"])
        part.load_optimizer_state_dict(opt, saved["optimizer"])
        start, n = shard_range(C, rank, 4)
        assert part.head.weight.shape == (n, E)
        assert torch.equal(part.head.weight.detach(), full.head.weight.detach()[start : start + n])
        expected = optimizer.state[full.head.weight]["momentum_buffer"][start : start + n]
        assert torch.equal(opt.state[part.head.weight]["momentum_buffer"], expected)
