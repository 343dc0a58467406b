"""Partial FC at WebFace42M scale on CPUs: gloo processes, memory per rank, step time, checkpoint save and
load, and the sharded loss and gradients against an unsharded computation.

    python -m scripts.bench_pfc_scale --classes 2059906 --world 4               # steps, save, load
    python -m scripts.bench_pfc_scale --classes 262144 --world 4 --gather all   # the all-ranks gather
    python -m scripts.bench_pfc_scale --check --classes 2059906 --dim 16        # sharded == unsharded

Memory is each process's peak resident set (``VmHWM``, reset before every phase through
``/proc/self/clear_refs``) minus its resident set when the phase began, and the phase's absolute peak;
``anon_extra_gb`` is the rise of the anonymous part alone, which the kernel cannot page out. The save
gathers the head into file-backed pages of the output folder (:mod:`core.spill`), as train.py does;
``--no-spill`` gathers into anonymous memory.
``--gather all`` saves the way every rank once gathered the whole head (``all_gather`` of every shard) and
loads the file whole on every rank; the default is :func:`core.distributed.gather_rows_to_rank0` and a
memory-mapped load. ``--check`` runs a training step at ``--dim`` in float64 and compares, in this process,
the loss, the embeddings' gradients and the gradients of every scored centre with one softmax over the
same classes (the classes every rank scored: all of them at sample rate 1).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from core import spill
from core.checkpoint import load_checkpoint, save_checkpoint
from core.distributed import all_gather_padded, barrier
from heads import build_head
from heads.partial_fc import PartialFC, shard_range
from scripts.bench_support import Peak

WEBFACE42M_CLASSES = 2_059_906


def _old_gather(pfc: PartialFC, optimizer: torch.optim.Optimizer) -> dict:
    """The checkpoint entries as every rank once assembled them: an all-gather of every shard."""
    head = {k: v.detach().clone() for k, v in pfc.head.state_dict().items() if k != "weight"}
    head["weight"] = torch.cat(all_gather_padded(pfc.head.weight.detach()))
    opt = optimizer.state_dict()
    opt["state"] = {k: dict(v) for k, v in opt["state"].items()}
    for key, value in opt["state"][0].items():
        if torch.is_tensor(value) and value.shape[:1] == (pfc.num_local,):
            opt["state"][0][key] = torch.cat(all_gather_padded(value.detach()))
    return {"head": head, "optimizer": opt}


def _worker(rank: int, port: int, args: argparse.Namespace, out: str) -> None:
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=args.world)
    result: dict = {"rank": rank}
    try:
        with Peak() as built:
            pfc = PartialFC("arcface", args.dim, args.classes, init_seed=0).train()
        result["build"] = built.row()
        optimizer = torch.optim.SGD(pfc.parameters(), lr=0.1, momentum=0.9)
        g = torch.Generator().manual_seed(rank)
        x = torch.randn(args.batch, args.dim, generator=g).requires_grad_()
        y = torch.randint(0, args.classes, (args.batch,), generator=g)
        for rate in args.rates:
            pfc.sample_rate = rate
            times = []
            with Peak() as step:
                for _ in range(args.steps):
                    barrier()
                    t0 = time.perf_counter()
                    loss = pfc(x, y)
                    loss.backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    barrier()
                    times.append(time.perf_counter() - t0)
            result[f"step_{rate}"] = {
                **step.row(),
                "step_s": [round(t, 3) for t in times],
                "loss": float(loss.detach()),
            }
        x.grad = None
        shard = pfc.head.weight.detach().clone(), optimizer.state[pfc.head.weight]["momentum_buffer"].clone()
        path = Path(out) / "head.pt"
        barrier()
        spill.use_directory(Path(out) if args.spill else None)  # as train.py does for its run folder
        with Peak() as save:
            state = _old_gather(pfc, optimizer) if args.gather == "all" else {
                "head": pfc.state_dict(), "optimizer": pfc.optimizer_state_dict(optimizer)}  # fmt: skip
            if rank == 0:
                save_checkpoint(path, state)
            del state
            barrier()
        result["save"] = {**save.row(), "file_gb": round(path.stat().st_size / 2**30, 3)}
        with torch.no_grad():
            pfc.head.weight.zero_()
            optimizer.state[pfc.head.weight]["momentum_buffer"].zero_()
        barrier()
        with Peak() as load:
            state = load_checkpoint(path, mmap=args.gather != "all")
            pfc.load_state_dict(state["head"])
            pfc.load_optimizer_state_dict(optimizer, state["optimizer"])
            del state
            barrier()
        result["load"] = load.row()
        result["load"]["equal"] = bool(
            torch.equal(pfc.head.weight.detach(), shard[0])
            and torch.equal(optimizer.state[pfc.head.weight]["momentum_buffer"], shard[1])
        )
        barrier()
    finally:
        (Path(out) / f"rank{rank}.json").write_text(json.dumps(result))
        dist.destroy_process_group()


def _check_worker(rank: int, port: int, args: argparse.Namespace, out: str) -> None:
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=args.world)
    try:
        pfc = PartialFC("arcface", args.dim, args.classes, init_seed=0).double().train()
        results = {}
        for rate in args.rates:
            pfc.sample_rate = rate
            torch.manual_seed(1000 + rank)  # the negatives each rank samples
            x, y = _check_batch(args, rank)
            x.requires_grad_()
            out_ = pfc.scores(x, y)
            loss = out_.ce.mean()
            loss.backward()
            index = out_.index if out_.index is not None else torch.arange(pfc.num_local)
            results[rate] = {"loss": loss.detach(), "x_grad": x.grad, "index": index + pfc.class_start,
                             "w_grad": pfc.head.weight.grad[index].clone()}  # fmt: skip
            pfc.zero_grad(set_to_none=True)
        torch.save(results, Path(out) / f"check{rank}.pt")
        barrier()
    finally:
        dist.destroy_process_group()


def _check_batch(args: argparse.Namespace, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(500 + rank)
    x = torch.randn(args.batch, args.dim, generator=g, dtype=torch.float64) * 10
    return x, torch.randint(0, args.classes, (args.batch,), generator=g)


def _check(args: argparse.Namespace, out: str) -> dict:
    """Every rank's loss and gradients against one softmax over the scored classes, in this process."""
    ranks = [torch.load(Path(out) / f"check{r}.pt", weights_only=True) for r in range(args.world)]
    weight = PartialFC("arcface", args.dim, args.classes, init_seed=0).head.weight.detach().double()
    x = torch.cat([_check_batch(args, r)[0] for r in range(args.world)])
    y = torch.cat([_check_batch(args, r)[1] for r in range(args.world)])
    report = {}
    for rate in args.rates:
        ids = torch.cat([res[rate]["index"] for res in ranks])  # global classes scored, in order
        column = torch.full((args.classes,), -1, dtype=torch.long)
        column[ids] = torch.arange(len(ids))
        head = build_head("arcface", embedding_size=args.dim, num_classes=len(ids)).double().train()
        head.weight.data = weight[ids]
        xr = x.clone().requires_grad_()
        loss = F.cross_entropy(head(xr, column[y]), column[y])
        loss.backward()
        w_grad = head.weight.grad
        x_err = max(float((res[rate]["x_grad"] - xr.grad[r * args.batch : (r + 1) * args.batch]).abs().max())
                    for r, res in enumerate(ranks))  # fmt: skip
        w_err, start = 0.0, 0
        for res in ranks:
            n = len(res[rate]["index"])
            w_err = max(w_err, float((res[rate]["w_grad"] - w_grad[start : start + n]).abs().max()))
            start += n
        report[str(rate)] = {
            "classes_scored": len(ids), "loss": float(loss),
            "loss_abs_diff": max(abs(float(res[rate]["loss"]) - float(loss)) for res in ranks),
            "x_grad_max_abs_diff": x_err, "x_grad_max_abs": float(xr.grad.abs().max()),
            "w_grad_max_abs_diff": w_err, "w_grad_max_abs": float(w_grad.abs().max()),
        }  # fmt: skip
    return report


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--classes", type=int, default=WEBFACE42M_CLASSES)
    p.add_argument("--world", type=int, default=4, help="gloo processes")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--batch", type=int, default=32, help="embeddings per rank and step")
    p.add_argument("--steps", type=int, default=2, help="steps per sample rate")
    p.add_argument("--rates", type=float, nargs="+", default=[0.2, 1.0])
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--gather", choices=["rank0", "all"], default="rank0")
    p.add_argument(
        "--no-spill", dest="spill", action="store_false",
        help="gather into anonymous memory, not into file-backed pages of the output folder (core.spill)",
    )  # fmt: skip
    p.add_argument("--check", action="store_true", help="sharded vs unsharded loss and gradients (float64)")
    p.add_argument("--out", default="", help="folder for the checkpoint (default: a temporary one)")
    p.add_argument("--json", default="", help="write the results here")
    args = p.parse_args(argv)
    if args.check and args.batch == 32:
        args.batch = 8
    with tempfile.TemporaryDirectory(dir=args.out or None) as out:
        worker = _check_worker if args.check else _worker
        mp.spawn(worker, args=(_port(), args, out), nprocs=args.world, join=True)
        if args.check:
            report = {"check": _check(args, out)}
        else:
            report = {
                "ranks": [json.loads((Path(out) / f"rank{r}.json").read_text()) for r in range(args.world)]
            }
    shards = [shard_range(args.classes, r, args.world)[1] for r in range(args.world)]
    report["settings"] = {**vars(args), "shard_rows": shards, "load_average": os.getloadavg()}
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text)
    return report


if __name__ == "__main__":
    main()
