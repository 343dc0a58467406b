"""The shipped recipes build and step through train.py, and the launchers start real runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import train
from core.checkpoint import load_checkpoint
from heads import list_heads
from tests.synthetic_faces import write_identity_folder

ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted(p.stem for p in (ROOT / "configs" / "recipes").glob("*.yaml"))
SMALL = ("model.backbone=mbf", "model.precision=fp32", "data.image_size=32", "data.batch_size=8",
         "data.num_workers=0", "data.val_root=", "model.embedding_size=32")  # fmt: skip


@pytest.fixture(scope="module")
def faces(tmp_path_factory) -> Path:
    return write_identity_folder(tmp_path_factory.mktemp("faces"), identities=6, per_identity=4)


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_builds_and_steps(recipe, faces, capsys):
    config = ROOT / "configs" / "recipes" / f"{recipe}.yaml"
    fmt = ("data.format=folder", "data.pk_k=4")  # PK recipes: 2 identities x 4 images per batch of 8
    status = train.main(["--config", str(config), "--set", f"data.root={faces}", *SMALL, *fmt, "--dry-run"])
    out = capsys.readouterr()
    assert status == 0, out.err
    assert "losses: [" in out.out and "nan" not in out.out


@pytest.mark.parametrize("head", list_heads())
@pytest.mark.parametrize("loss", ["cross_entropy", "focal", "frabsm_weight"])
def test_every_head_and_loss_train_through_the_entry_point(head, loss, faces, capsys):
    config = ROOT / "configs" / "cpu_tiny.yaml"
    sets = [f"data.root={faces}", *SMALL, f"head.name={head}", f"loss.name={loss}"]
    status = train.main(["--config", str(config), "--set", *sets, "--dry-run"])
    out = capsys.readouterr()
    assert status == 0, out.err
    assert "nan" not in out.out


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_steps_are_finite(precision, faces, capsys):
    # CPU autocast; fp16 also runs the GradScaler path (unscale, clip, step, update)
    sets = [f"data.root={faces}", *SMALL, f"model.precision={precision}", "model.backbone=r18"]
    status = train.main(["--config", str(ROOT / "configs" / "cpu_tiny.yaml"), "--set", *sets, "--dry-run"])
    out = capsys.readouterr()
    assert status == 0, out.err
    assert "nan" not in out.out and "losses: [" in out.out


def test_launchers_are_valid_bash():
    for script in sorted([*(ROOT / "scripts").glob("*.sh"), *ROOT.glob("validation_*/*.sh")]):
        subprocess.run(["bash", "-n", str(script)], check=True)


def test_recipe_launcher_runs_torchrun_on_cpu(faces, tmp_path):
    env = {**os.environ, "NPROC": "2", "DATA_ROOT": str(faces), "BACKBONE": "mbf",
           "OUTPUT": str(tmp_path / "run"), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}  # fmt: skip
    proc = subprocess.run(
        ["bash", "scripts/train_arcface.sh", "--set", *SMALL[1:], "data.format=folder", "train.max_steps=2"],
        cwd=ROOT, env=env, capture_output=True, text=True, check=False, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    state = load_checkpoint(tmp_path / "run" / "last.pt")
    assert state["step"] == 2 and state["meta"]["arch"] == "mbf" and state["meta"]["head"] == "arcface"
    assert "2 processes" in (tmp_path / "run" / "train.log").read_text()


def test_closeness_diversity_runs_both_stages(faces, tmp_path):
    # stage 1 tracks the scores, stage 2 resumes it and adds the mined terms every 5th step (2 processes)
    env = {**os.environ, "NPROC": "2", "DATA_ROOT": str(faces), "BACKBONE": "mbf", "OUTPUT": str(tmp_path),
           "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}  # fmt: skip
    small = [
        *SMALL[1:], "data.format=folder", "data.batch_size=4", "train.log_every=1", "mining.cd_classes=4",
        "mining.cd_easy=2", "mining.cd_negatives=3",
    ]  # fmt: skip
    proc = subprocess.run(
        ["bash", "scripts/train_cd.sh", "--set", *small], cwd=ROOT, env=env, capture_output=True, text=True,
        check=False, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    stage1, stage2 = (
        load_checkpoint(tmp_path / "stage1" / "last.pt"),
        load_checkpoint(tmp_path / "stage2" / "last.pt"),
    )
    assert stage1["difficulty"] is not None and stage2["step"] > stage1["step"]
    assert " closeness " not in (tmp_path / "stage1" / "train.log").read_text()  # stage 1 does not mine
    log = (tmp_path / "stage2" / "train.log").read_text()
    assert f"resumed {tmp_path / 'stage1' / 'last.pt'}" in log
    mined = [line for line in log.splitlines() if " closeness " in line]
    assert mined and all(float(line.split(" closeness ")[1].split()[0]) >= 0 for line in mined)
    assert " diversity " in mined[-1] and " threshold " in mined[-1]
