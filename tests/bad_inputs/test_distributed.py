"""What a distributed ``train.py`` run does when a rank stops answering, and the settings that govern it.

A rank that stops (SIGSTOP, as a hung NFS mount stops it) or dies leaves the others waiting in a
collective. Each surviving rank must end within ``train.collective_timeout_s`` (or
``$FACEREC_COLLECTIVE_TIMEOUT_S``) plus a few seconds, with one line on stderr naming itself, the
collective and where it was called, the rank it waited for and the step, exit status 3, no traceback, and
(on rank 0) the same line at the end of ``train.log``. A rank whose launcher is gone stops by itself.

The ranks are started as torchrun starts them (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``/``MASTER_PORT``),
without the agent, whose own report would hide theirs; the fault is injected by the small script below,
which runs the real ``train.main`` on 4 real CelebA identities (MobileFaceNet at a 32x32 network input).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import train
from core import distributed
from core.checkpoint import load_checkpoint
from tests.bad_inputs.conftest import ROOT, Outcome, assert_refused, call_main
from tests.conftest import free_tcp_port

CONFIG = str(ROOT / "configs" / "cpu_tiny.yaml")
TIMEOUT_S = 5

# The test's own fault: the rank FAULT_RANK sends itself FAULT_SIGNAL when it reaches FAULT_AT (train_step:
# the start of a step; any_rank: the loss check after the backward pass) of step FAULT_STEP, after
# writing the time to FAULT_MARK. The timeout counts from the start of the process group, so both ranks
# wait for each other after their imports (whose time varies most on a busy machine) and then start.
FAULT = textwrap.dedent(
    """
    import os, signal, sys, time
    from pathlib import Path

    import train

    rank, step = int(os.environ["RANK"]), [0]
    fault_rank, fault_step = int(os.environ["FAULT_RANK"]), int(os.environ["FAULT_STEP"])
    real_step, real_any_rank = train.train_step, train.any_rank

    def fault(where):
        if where == os.environ["FAULT_AT"] and step[0] == fault_step:
            Path(os.environ["FAULT_MARK"]).write_text(repr(time.time()))
            os.kill(os.getpid(), getattr(signal, os.environ["FAULT_SIGNAL"]))

    def train_step(run, micro_batches):
        step[0] = run.state.step + 1
        fault("train_step")
        return real_step(run, micro_batches)

    def any_rank(flag):
        fault("any_rank")
        return real_any_rank(flag)

    if rank == fault_rank:  # the other rank runs train.py as it is, so its messages name train.py's lines
        train.train_step, train.any_rank = train_step, any_rank
    # both ranks start together: on a busy machine one may take seconds longer to import than the timeout
    Path(os.environ["FAULT_MARK"] + f".ready{rank}").touch()
    while not Path(os.environ["FAULT_MARK"] + f".ready{1 - rank}").exists():
        time.sleep(0.01)
    sys.exit(train.main(sys.argv[1:]))
    """
)


@pytest.fixture(scope="module")
def faces(shared_data, tmp_path_factory) -> Path:
    """4 real identities (about 90 aligned 112x112 crops) as an image folder."""
    root = tmp_path_factory.mktemp("faces")
    for person in sorted(p for p in (shared_data / "celeba_aligned112").iterdir() if p.is_dir())[:4]:
        shutil.copytree(person, root / person.name)
    return root


def settings(data: Path, out: Path, *extra: str) -> list[str]:
    return ["--config", CONFIG, "--set", f"data.root={data}", f"output_dir={out}", "data.val_root=''",
            "data.batch_size=8", "data.num_workers=0", "model.input_size=32", "model.embedding_size=64",
            "train.epochs=2", "train.save_every=1", "train.log_every=1", *extra]  # fmt: skip


def stopped(pid: int) -> bool:
    """The process exists and is stopped (state T), not merely slow."""
    state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    return state in ("T", "t")


def run_two_ranks(tmp_path: Path, argv: list[str], fault: dict[str, str], env: dict[str, str] | None = None):
    """Start ranks 0 and 1 of ``train.py`` with ``fault``; wait for the rank that is not at fault. Returns its
    outcome, the seconds from the fault to its exit, and whether the faulty rank was then still stopped."""
    script = tmp_path / "fault.py"
    script.write_text(FAULT)
    mark = tmp_path / "fault_time"
    common = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1",
              "MASTER_PORT": str(free_tcp_port()), "WORLD_SIZE": "2", "FAULT_MARK": str(mark), **fault,
              **(env or {})}  # fmt: skip
    procs = []
    for r in (0, 1):
        with (tmp_path / f"out{r}").open("w") as out, (tmp_path / f"err{r}").open("w") as err:
            procs.append(
                subprocess.Popen(
                    [sys.executable, str(script), *argv],
                    cwd=ROOT,
                    stdout=out,
                    stderr=err,
                    env={**common, "RANK": str(r), "LOCAL_RANK": str(r)},
                )
            )
    survivor, faulty = procs[1 - int(fault["FAULT_RANK"])], procs[int(fault["FAULT_RANK"])]
    try:
        code = survivor.wait(timeout=240)
        exited = time.time()
        still_stopped = faulty.poll() is None and stopped(faulty.pid)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    r = 1 - int(fault["FAULT_RANK"])
    outcome = Outcome(code, (tmp_path / f"out{r}").read_text(), (tmp_path / f"err{r}").read_text())
    assert mark.exists(), f"the fault was never injected:\n{outcome.err[-3000:]}"
    return outcome, exited - float(mark.read_text()), still_stopped


# ----------------------------------------------------------------------- a rank stops or dies mid-run

STALLS = {
    # rank 1 stops before its 3rd forward pass: rank 0 waits in DDP's forward
    "train-rank-1-stopped-before-step-3": (
        {"FAULT_RANK": "1", "FAULT_STEP": "3", "FAULT_AT": "train_step", "FAULT_SIGNAL": "SIGSTOP"},
        {}, [f"train.collective_timeout_s={TIMEOUT_S}"],
        ["rank 0: collective of DDP's forward pass in forward_loss (train.py:",
         f"timed out after {TIMEOUT_S} s", "waiting for rank 1", "after step 2",
         "limit: train.collective_timeout_s"],
    ),
    # rank 0 stops at the loss check of step 2; the limit comes from the environment (config: 30 minutes)
    "train-rank-0-stopped-at-the-loss-check-env-timeout": (
        {"FAULT_RANK": "0", "FAULT_STEP": "2", "FAULT_AT": "any_rank", "FAULT_SIGNAL": "SIGSTOP"},
        {distributed.TIMEOUT_ENV: str(TIMEOUT_S)}, [],
        ["rank 1: all_reduce (any_rank) in train_step (train.py:", f"timed out after {TIMEOUT_S} s",
         "waiting for rank 0", "after step 1", f"limit: ${distributed.TIMEOUT_ENV}"],
    ),
    # rank 1 dies (kill -9) before step 3: rank 0 learns it at once from the closed connection
    "train-rank-1-killed-before-step-3": (
        {"FAULT_RANK": "1", "FAULT_STEP": "3", "FAULT_AT": "train_step", "FAULT_SIGNAL": "SIGKILL"},
        {}, [f"train.collective_timeout_s={TIMEOUT_S * 100}"],
        ["rank 0: collective of DDP's forward pass in forward_loss",
         "failed: the connection to rank 1 closed", "after step 2"],
    ),
}  # fmt: skip


# each case starts two interpreters (about 25 s on 2 busy cores): the first runs by default, all in CI
SLOW = {"train-rank-0-stopped-at-the-loss-check-env-timeout", "train-rank-1-killed-before-step-3"}


@pytest.mark.parametrize(
    ("fault", "env", "extra", "fragments"),
    [
        pytest.param(*case, id=name, marks=[pytest.mark.slow] if name in SLOW else [])
        for name, case in STALLS.items()
    ],
)
def test_a_stopped_or_dead_rank_is_named_within_the_timeout(
    faces, tmp_path, unchanged, fault, env, extra, fragments
):
    out = tmp_path / "run"
    with unchanged(faces):
        outcome, seconds, still_stopped = run_two_ranks(tmp_path, settings(faces, out, *extra), fault, env)
    assert_refused(outcome, *fragments)
    assert outcome.code == distributed.FAULT_EXIT_STATUS
    assert outcome.last_error_line.startswith("train.py: rank ")
    # it did not wait for the stopped rank: within the timeout and a margin for a busy machine
    assert seconds < TIMEOUT_S + 15, seconds
    if fault["FAULT_SIGNAL"] == "SIGSTOP":
        assert still_stopped  # ... which was still stopped when it left
    if fault["FAULT_RANK"] == "1":  # rank 0 keeps the log: it says why the run stopped
        last = (out / "train.log").read_text().splitlines()[-1]
        assert last.endswith(f"stopped: {outcome.last_error_line[len('train.py: ') :]}")
    # what was written before the fault is whole: the checkpoints of the steps done load
    step = int(fault["FAULT_STEP"]) - 1
    assert load_checkpoint(out / f"step_{step}.pt")["step"] == step
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


# ------------------------------------------------------------------------------------- the settings

SETTINGS = {
    "train-collective-timeout-zero": (
        ["train.collective_timeout_s=0"], {}, ["train.collective_timeout_s", "> 0", "got 0"],
    ),
    "train-collective-timeout-negative": (
        ["train.collective_timeout_s=-5"], {}, ["train.collective_timeout_s", "> 0", "got -5"],
    ),
    "train-collective-timeout-env-not-a-number": (
        [], {distributed.TIMEOUT_ENV: "20s"}, [f"${distributed.TIMEOUT_ENV}", "> 0", "'20s'"],
    ),
    "train-collective-timeout-env-zero": (
        [], {distributed.TIMEOUT_ENV: "0"}, [f"${distributed.TIMEOUT_ENV}", "> 0", "'0'"],
    ),
    "train-collective-timeout-env-infinite": (
        [], {distributed.TIMEOUT_ENV: "inf"}, [f"${distributed.TIMEOUT_ENV}", "> 0", "'inf'"],
    ),
    "train-launcher-watch-negative": (
        ["train.launcher_watch_s=-1"], {}, ["train.launcher_watch_s", ">= 0", "got -1"],
    ),
}  # fmt: skip


@pytest.mark.parametrize(("extra", "env", "fragments"), list(SETTINGS.values()), ids=list(SETTINGS))
def test_bad_distributed_settings_are_refused_before_anything_runs(
    faces, tmp_path, capsys, monkeypatch, unchanged, extra, env, fragments
):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with unchanged(faces):
        outcome = call_main(train.main, [*settings(faces, tmp_path / "out", *extra), "--dry-run"], capsys)
    assert_refused(outcome, *fragments)
    assert outcome.code == 2


def test_the_timeout_reaches_the_process_group_and_the_environment_overrides_it(monkeypatch):
    seen = []
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda **kw: seen.append(kw))
    monkeypatch.setattr(distributed, "is_distributed", lambda: False)
    monkeypatch.setattr(distributed.torch.cuda, "is_available", lambda: False)  # gloo, also on a GPU machine
    monkeypatch.setattr(distributed, "_limit", {})
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv(distributed.TIMEOUT_ENV, raising=False)
    distributed.init_distributed(timeout_s=42.0)
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "7.5")
    distributed.init_distributed(timeout_s=42.0)
    assert [kw["timeout"].total_seconds() for kw in seen] == [42.0, 7.5]
    assert [kw["backend"] for kw in seen] == ["gloo", "gloo"]
    assert distributed._limit == {"seconds": 7.5, "source": f"${distributed.TIMEOUT_ENV}"}


# ---------------------------------------------------------------- which ranks: 3 processes, one stopped

CENSUS = textwrap.dedent(
    """
    import datetime, os, signal, sys
    import torch, torch.distributed as dist
    from core import distributed

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=float(sys.argv[1])))
    rank = dist.get_rank()
    distributed.all_reduce(torch.ones(1))  # all three answer once
    if rank == 2:
        os.kill(os.getpid(), signal.SIGSTOP)
    try:
        distributed.all_reduce(torch.ones(1))
    except distributed.CollectiveError as err:
        print(err, file=sys.stderr)
        sys.exit(3)
    """
)


@pytest.mark.slow  # three interpreters start (about 20 s on 2 busy cores)
def test_every_waiting_rank_names_the_stopped_one_and_only_it(tmp_path):
    script = tmp_path / "census.py"
    script.write_text(CENSUS)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_tcp_port()), "WORLD_SIZE": "3"}  # fmt: skip
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), "2"],
            cwd=ROOT,
            env={**env, "RANK": str(r)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(3)
    ]
    try:
        results = [p.communicate(timeout=120) for p in procs[:2]]
        assert stopped(procs[2].pid)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    for rank, (proc, (_, err)) in enumerate(zip(procs[:2], results, strict=True)):
        assert proc.returncode == 3, err
        line = err.strip().splitlines()[-1]
        assert line.startswith(f"rank {rank}: all_reduce in <module> (census.py:"), line
        assert "timed out after 2 s waiting for rank 2" in line, line  # not "ranks 1, 2" nor "0, 2"


# --------------------------------------------------------------------------------- the launcher dies

LAUNCHER = textwrap.dedent(
    """
    import subprocess, sys
    child = subprocess.Popen([sys.executable, "-c", sys.argv[1]], stdout=open(sys.argv[2], "w"),
                             stderr=open(sys.argv[3], "w"))
    print(child.pid, flush=True)
    child.wait()
    """
)
RANK_PROCESS = textwrap.dedent(
    """
    import time
    from core.distributed import watch_launcher

    watch_launcher(0.2, rank=5)
    print("training", flush=True)
    time.sleep(120)
    """
)


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_rank_whose_launcher_is_killed_stops_with_one_line(tmp_path):
    out, err = tmp_path / "out", tmp_path / "err"
    launcher = subprocess.Popen(
        [sys.executable, "-c", LAUNCHER, RANK_PROCESS, str(out), str(err)],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    pid = int(launcher.stdout.readline())
    try:
        deadline = time.monotonic() + 60
        while "training" not in out.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.0)  # five checks while the launcher lives: no false alarm
        assert alive(pid) and launcher.poll() is None, err.read_text()
        launcher.kill()
        launcher.wait()
        deadline = time.monotonic() + 20
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(pid), "the rank trains on without its launcher"
    finally:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)
    line = err.read_text().strip().splitlines()[-1]
    assert line.startswith("rank 5: its launcher (pid ") and "is gone; stopping" in line, line
    assert "Traceback" not in err.read_text()


def test_only_a_torchrun_worker_watches_its_launcher(monkeypatch):
    started = []
    monkeypatch.setattr(
        distributed, "watch_launcher", lambda interval, rank: started.append((interval, rank))
    )
    monkeypatch.setattr(distributed, "_watcher", [])
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    distributed.init_distributed(launcher_watch_s=5.0)  # a plain process: its parent is a shell
    assert started == []
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job")
    distributed.init_distributed(launcher_watch_s=0.0)  # switched off
    assert started == []
    distributed.init_distributed(launcher_watch_s=5.0)
    distributed.init_distributed(launcher_watch_s=5.0)  # one watcher per process
    assert started == [(5.0, 3)]
