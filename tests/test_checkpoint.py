from __future__ import annotations

import os
import pickle
import random

import numpy as np
import pytest
import torch
from torch import nn

from core.checkpoint import (
    CheckpointError,
    keep_last,
    latest_checkpoint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)


def test_round_trip_of_model_optimizer_and_rng(tmp_path):
    model = nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    state = {"backbone": model.state_dict(), "optimizer": opt.state_dict(), "step": 7, "rng": rng_state(),
             "config": {"optim": {"lr": 0.1}}, "meta": {"color": "rgb"}}  # fmt: skip
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
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
    set_rng_state(loaded["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


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
