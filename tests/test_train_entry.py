"""train.py through its real entry point on a tiny RecordIO packed from real faces."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import train
from data.recordio import pack_folder

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny_rec(shared_data, tmp_path_factory) -> tuple[Path, int]:
    """Four real CelebA identities (aligned 112x112) packed into a RecordIO; its folder and image count."""
    src = shared_data / "celeba_aligned112"
    folder = tmp_path_factory.mktemp("faces")
    for identity in sorted(p for p in src.iterdir() if p.is_dir())[:4]:
        shutil.copytree(identity, folder / identity.name)
    out = tmp_path_factory.mktemp("rec")
    pack_folder(folder, out / "train")
    return out, sum(1 for p in folder.glob("*/*.jpg"))


def test_dry_run_reports_model_and_data(tiny_rec, capsys):
    rec_dir, num_images = tiny_rec
    status = train.main(
        [
            "--config", str(ROOT / "configs" / "demo_cpu.yaml"),
            "--set", f"data.root={rec_dir}", "data.batch_size=8", "data.num_workers=0", "model.backbone=mbf",
            "--dry-run",
        ]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert status == 0
    lines = dict(
        line.split(": ", 1) for line in out.splitlines() if ": " in line and not line.startswith(" ")
    )
    assert lines["backbone"] == "mbf"
    assert lines["classes"] == "4"
    assert lines["images"] == str(num_images)
    assert lines["embedding"] == "[8, 512]"
    assert lines["steps"] == "2"


def test_dry_run_refuses_mismatched_class_count(tiny_rec, capsys):
    rec_dir, _ = tiny_rec
    status = train.main(
        ["--config", str(ROOT / "configs" / "demo_cpu.yaml"), "--set", f"data.root={rec_dir}",
         "data.num_classes=5", "--dry-run"]
    )  # fmt: skip
    assert status == 2
    assert "data.num_classes is 5 in the config, but" in capsys.readouterr().err


def test_config_errors_reach_the_command_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "train.py", "--config", "configs/base.yaml", "--set", "optim.lrr=1", "--dry-run"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode != 0
    assert "unknown key optim.lrr; did you mean optim.lr?" in proc.stderr
