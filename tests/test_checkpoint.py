from __future__ import annotations

import errno
import json
import os
import pickle
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from core.checkpoint import (
    CheckpointError,
    keep_last,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    save_step_checkpoint,
)
from core.fileio import WriteError, atomic_write, describe_os_error, remove_stale_temp_files, write_json

ROOT = Path(__file__).resolve().parent.parent


def test_round_trip_of_model_and_optimizer(tmp_path):
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    state = {"backbone": model.state_dict(), "optimizer": opt.state_dict(), "step": 7,
             "config": {"optim": {"lr": 0.1}}, "meta": {"color": "rgb"}}  # fmt: skip
    path = save_checkpoint(tmp_path / "step_7.pt", state)
    loaded = load_checkpoint(path)
    assert loaded["format_version"] == 1 and loaded["step"] == 7 and loaded["meta"] == {"color": "rgb"}
    for key, value in model.state_dict().items():
        assert torch.equal(loaded["backbone"][key], value)
    opt2 = torch.optim.SGD(nn.Linear(4, 3).parameters(), lr=0.1, momentum=0.9)
    opt2.load_state_dict(loaded["optimizer"])
    assert torch.equal(
        opt2.state_dict()["state"][0]["momentum_buffer"], opt.state_dict()["state"][0]["momentum_buffer"]
    )


def test_atomic_save_keeps_the_old_file(tmp_path, monkeypatch):
    path = save_checkpoint(tmp_path / "ckpt.pt", {"step": 1})

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"step": 2})
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1
    assert os.listdir(tmp_path) == ["ckpt.pt"]


def test_write_json_replaces_whole_or_not_at_all(tmp_path):
    """The evaluators' result files: the new JSON whole, or (a value JSON cannot hold, met after part of the
    file was written) the old file as it was and no temporary file."""
    path = write_json(tmp_path / "results.json", {"lfw": {"accuracy": 0.9965}, "pairs": [1, 2]})
    assert json.loads(path.read_text()) == {"lfw": {"accuracy": 0.9965}, "pairs": [1, 2]}
    with pytest.raises(TypeError, match="not JSON serializable"):
        write_json(path, {"lfw": {"accuracy": 0.5}, "model": object()})
    assert json.loads(path.read_text()) == {"lfw": {"accuracy": 0.9965}, "pairs": [1, 2]}
    assert os.listdir(tmp_path) == ["results.json"]


class FillsTheDisk:
    """A file whose writes fail with ENOSPC once ``room`` bytes were written, as on a full disk."""

    def __init__(self, fh, room: int):
        self.fh, self.room = fh, room

    def write(self, data):
        self.room -= len(data)
        if self.room < 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.fh.write(data)

    def __getattr__(self, name):
        return getattr(self.fh, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self.fh.__exit__(*exc)


def test_a_full_disk_names_the_file_and_the_reason_and_keeps_the_old_file(tmp_path, monkeypatch):
    path = save_checkpoint(tmp_path / "step_4.pt", {"step": 4})
    before = path.read_bytes()
    fdopen = os.fdopen
    monkeypatch.setattr(os, "fdopen", lambda *a, **k: FillsTheDisk(fdopen(*a, **k), room=4096))
    # torch.save meets the ENOSPC in its writer and raises "unexpected pos ..." with it only as context
    with pytest.raises(WriteError) as caught:
        save_checkpoint(path, {"step": 5, "w": torch.zeros(100_000)})
    monkeypatch.undo()
    assert str(caught.value) == f"cannot write {path}: No space left on device"
    assert caught.value.errno == errno.ENOSPC
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["step_4.pt"]  # no temporary file left
    assert pickle.loads(pickle.dumps(caught.value)).args == caught.value.args


def test_a_path_under_a_file_is_named_and_other_files_errors_pass_through(tmp_path):
    (tmp_path / "notes.txt").write_text("a file")
    under = tmp_path / "notes.txt" / "run" / "config.yaml"
    blocked = f"cannot write {under}: {tmp_path / 'notes.txt'} is a file, not a folder"
    with pytest.raises(WriteError, match=re.escape(blocked)), atomic_write(under, "w") as fh:
        fh.write("x")
    # a read inside the block keeps its own file
    with pytest.raises(FileNotFoundError) as caught, atomic_write(tmp_path / "out.txt", "w") as fh:
        fh.write((tmp_path / "missing.txt").read_text())
    assert not isinstance(caught.value, WriteError) and caught.value.filename == str(tmp_path / "missing.txt")
    assert describe_os_error(caught.value) == f"{tmp_path / 'missing.txt'}: No such file or directory"
    assert sorted(os.listdir(tmp_path)) == ["notes.txt"]


class Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_bad_files_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match=r"garbage\.pt: not a readable checkpoint"):
        load_checkpoint(tmp_path / "garbage.pt")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="no format_version"):
        load_checkpoint(tmp_path / "plain.pt")
    torch.save({"format_version": 99}, tmp_path / "future.pt")
    with pytest.raises(CheckpointError, match="format version 99 is newer"):
        load_checkpoint(tmp_path / "future.pt")
    with open(tmp_path / "evil.pt", "wb") as fh:
        pickle.dump({"format_version": 1, "x": Payload()}, fh)
    with pytest.raises(CheckpointError, match=r"evil\.pt: not a readable checkpoint"):
        load_checkpoint(tmp_path / "evil.pt")


def test_keep_last_and_latest(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    for step in (5, 100, 20, 7):
        save_checkpoint(tmp_path / f"step_{step}.pt", {"step": step})
    (tmp_path / "best.pt").write_bytes(b"x")
    assert latest_checkpoint(tmp_path).name == "step_100.pt"
    removed = keep_last(tmp_path, 2)
    assert sorted(p.name for p in removed) == ["step_5.pt", "step_7.pt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "step_100.pt", "step_20.pt"]


KILLED_WRITER = """
import os, signal, sys
from core.fileio import atomic_write
with atomic_write(sys.argv[1], "wb") as fh:
    fh.write(b"half a checkpoint")
    fh.flush()
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_stale_temp_files_of_killed_writes_are_removed_and_nothing_else(tmp_path):
    # a save killed mid-write leaves its temporary file (the except clause never runs)
    proc = subprocess.run(
        [sys.executable, "-c", KILLED_WRITER, str(tmp_path / "step_4.pt")],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, check=False, capture_output=True,
    )  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    [partial] = [p for p in tmp_path.iterdir()]
    assert partial.name.startswith(".step_4.pt.") and partial.read_bytes() == b"half a checkpoint"
    # a last.pt link killed before its rename, by the same pattern
    save_step_checkpoint(tmp_path, 8, {"step": 8}, keep=5)
    link = tmp_path / ".last.pt.0123abcd.tmp"
    os.link(tmp_path / "step_8.pt", link)
    keep = ["step_8.pt", "last.pt", "notes.tmp", ".hidden.tmp", ".step_4.pt.tmp", ".step_4.pt.abc.tmp",
            "step_4.pt.abcdefgh.tmp", ".step_4.pt.ABCDEFGH.tmp", ".step_4.pt.abcdefgh.tmp.keep"]  # fmt: skip
    for name in keep[2:]:
        (tmp_path / name).write_bytes(b"user data")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / ".step_1.pt.abcdefgh.tmp").write_bytes(b"x")  # only the folder itself is cleaned

    removed = remove_stale_temp_files(tmp_path)
    assert sorted(removed) == sorted([partial, link])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*keep, "sub"])
    assert (tmp_path / "sub" / ".step_1.pt.abcdefgh.tmp").exists()
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 8
    assert remove_stale_temp_files(tmp_path) == [] and remove_stale_temp_files(tmp_path / "none") == []


def test_a_failed_copy_of_last_pt_leaves_no_temporary_file(tmp_path, monkeypatch):
    save_step_checkpoint(tmp_path, 1, {"step": 1}, keep=5)

    def no_links(*args, **kwargs):
        raise OSError("hard links not supported")

    def copy_until_full(src, dst):
        Path(dst).write_bytes(Path(src).read_bytes()[:10])
        raise OSError("disk full")

    monkeypatch.setattr(os, "link", no_links)
    monkeypatch.setattr("shutil.copyfile", copy_until_full)
    with pytest.raises(OSError, match="disk full"):
        save_step_checkpoint(tmp_path, 2, {"step": 2}, keep=5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "step_1.pt", "step_2.pt"]

    def copy_onto_a_full_disk(src, dst):
        Path(dst).write_bytes(b"")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("shutil.copyfile", copy_onto_a_full_disk)
    with pytest.raises(WriteError, match=re.escape(f"cannot write {tmp_path / 'last.pt'}: No space left")):
        save_step_checkpoint(tmp_path, 3, {"step": 3}, keep=5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "step_1.pt", "step_2.pt", "step_3.pt"]
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 1
