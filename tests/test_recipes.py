"""The shipped recipes build and step through train.py, and the launchers start real runs."""

from __future__ import annotations

import inspect
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

import train
from core.checkpoint import load_checkpoint
from core.config import Config, load_config
from heads import list_heads
from heads.registry import HEADS
from tests.synthetic_faces import write_identity_folder

ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted(p.stem for p in (ROOT / "configs" / "recipes").glob("*.yaml"))
# optim.grad_accum=1: a recipe's accumulation (vit_b_wf42m_8gpu: 12) would ask for more than the 24 images
SMALL = ("model.backbone=mbf", "model.precision=fp32", "data.image_size=32", "data.batch_size=8",
         "data.num_workers=0", "data.val_root=", "model.embedding_size=32", "optim.grad_accum=1")  # fmt: skip


@pytest.fixture(scope="module")
def faces(tmp_path_factory) -> Path:
    return write_identity_folder(tmp_path_factory.mktemp("faces"), identities=6, per_identity=4)


def loss_range(cfg: Config, classes: int) -> tuple[float, float]:
    """Bounds the loss of either step of a ``--dry-run`` must respect under ``cfg``.

    CE = logsumexp(z) - z_y <= log C + max_j z_j - z_y. A non-target logit is at most s (CurricularFace's
    hard negatives s cos (t + cos): t, an EMA of the target cosine from 0 at rate 0.01, is below 0.02 after
    two steps); a target logit is at least -2s for the shipped margins (AdaFace's s (-1 - 2m add_scale),
    ArcFace's fallback s (-1 - m sin m), CosFace's s (-1 - m)). So a margin head's CE lies in
    (0, log C + 3.02 s]; FRABSM's mining weight is at most 1.5 and MagFace adds
    lambda_g g(a) <= lambda_g (1/l_a + l_a/u_a^2). A triplet loss on unit embeddings lies in [0, 2 + margin];
    ProbFace's MLS term has no fixed sign.
    """
    if cfg.head.name == "none":
        if cfg.loss.name == "triplet":
            return 0.0, 2.0 + cfg.loss.params.get("margin", 0.3)
        return -math.inf, math.inf
    defaults = inspect.signature(HEADS.get(cfg.head.name)).parameters

    def param(key: str) -> float:
        return cfg.head.params.get(key, defaults[key].default)

    high = math.log(classes) + 3.02 * param("s")
    if cfg.loss.name == "frabsm_weight":
        high *= 1.5
    if cfg.head.name == "magface":
        high += param("lambda_g") * (1.0 / param("l_a") + param("l_a") / param("u_a") ** 2)
    return 0.0, high


def dry_run_losses(printed: str, cfg: Config, steps: int = 2) -> list[float]:
    """The losses a ``--dry-run`` printed: one per step (``steps`` of them: two unless an epoch is
    shorter), finite numbers within :func:`loss_range`."""
    report = dict(line.split(": ", 1) for line in printed.splitlines() if ": " in line)
    losses = [float(v) for v in report["losses"].strip("[]").split(",")]
    assert len(losses) == int(report["steps"]) == steps, printed
    assert all(math.isfinite(v) for v in losses), f"losses {losses}"
    low, high = loss_range(cfg, int(report["classes"]))
    where = f"losses {losses}, {cfg.head.name} + {cfg.loss.name}"
    assert all(low <= v <= high for v in losses), f"{where}: outside [{low}, {high:.4g}]"
    assert cfg.head.name == "none" or min(losses) > 0, f"{where}: a cross-entropy is positive"
    return losses


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_builds_and_steps(recipe, faces, capsys):
    config = ROOT / "configs" / "recipes" / f"{recipe}.yaml"
    fmt = ("data.format=folder", "data.pk_k=4")  # PK recipes: 2 identities x 4 images per batch of 8
    sets = [f"data.root={faces}", *SMALL, *fmt]
    status = train.main(["--config", str(config), "--set", *sets, "--dry-run"])
    out = capsys.readouterr()
    assert status == 0, out.err
    dry_run_losses(out.out, load_config(config, sets))


@pytest.mark.parametrize("head", list_heads())
@pytest.mark.parametrize("loss", ["cross_entropy", "focal", "frabsm_weight"])
def test_every_head_and_loss_train_through_the_entry_point(head, loss, faces, capsys):
    config = ROOT / "configs" / "cpu_tiny.yaml"
    sets = [f"data.root={faces}", *SMALL, f"head.name={head}", f"loss.name={loss}"]
    status = train.main(["--config", str(config), "--set", *sets, "--dry-run"])
    out = capsys.readouterr()
    assert status == 0, out.err
    dry_run_losses(out.out, load_config(config, sets))


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_steps_are_finite(precision, faces, capsys):
    # CPU autocast; fp16 also runs the GradScaler path (unscale, clip, step, update)
    sets = [f"data.root={faces}", *SMALL, f"model.precision={precision}", "model.backbone=r18"]
    config = ROOT / "configs" / "cpu_tiny.yaml"
    status = train.main(["--config", str(config), "--set", *sets, "--dry-run"])
    out = capsys.readouterr()
    assert status == 0, out.err
    dry_run_losses(out.out, load_config(config, sets))


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
