"""Metric learning through train.py: no classifier, a triplet loss with online mining on PK batches
(generated identities at 32x32, MobileFaceNet, CPU, one thread)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import train
from core.checkpoint import load_checkpoint
from core.config import ConfigError, load_config
from data.image_folder import ImageFolderFaces
from data.sampler import PKBatchSampler
from objectives.metric import build_criterion
from tests.synthetic_faces import write_identity_folder, write_pairs_bin

ROOT = Path(__file__).resolve().parent.parent
CONFIG = str(ROOT / "configs" / "cpu_tiny.yaml")
TRIPLET = (
    "head.name=none", "loss.name=triplet", "loss.params={margin: 0.3, mining: semi_hard}", "data.sampler=pk",
    "data.pk_k=4",
)  # fmt: skip


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """In-process runs on one thread: tiny convolutions gain nothing from two, and a busy machine's spinning
    threads cost several times the work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def faces(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("metric")
    return {
        "train": write_identity_folder(root / "train", identities=12, per_identity=8, seed=5),
        "val": write_pairs_bin(root / "val" / "lfw.bin", pairs=40).parent,
    }


def overrides(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        f"data.root={data}", f"output_dir={out}", "data.image_size=32", "data.num_workers=0",
        "model.embedding_size=32", "data.batch_size=16", "train.log_every=1", *TRIPLET, *extra,
    ]  # fmt: skip


def logged(out: Path, key: str) -> list[float]:
    lines = (out / "train.log").read_text().splitlines()
    return [float(line.split(f" {key} ")[1].split()[0]) for line in lines if f" {key} " in line]


# ------------------------------------------------------------------------------------------- sampler


def test_pk_batches_hold_whole_identities_and_split_across_ranks(faces):
    positions = ImageFolderFaces(faces["train"]).indices_per_identity()
    positions[11] = positions[11][:2]  # an identity with fewer than k images repeats them
    labels = np.empty(96, dtype=np.int64)
    for c, p in positions.items():
        labels[p] = c
    one = PKBatchSampler(positions, batch_size=8, k=4, grad_accum=2, seed=3)
    ranks = [PKBatchSampler(positions, 8, 4, world_size=2, rank=r, seed=3) for r in (0, 1)]
    assert one.global_batch == 16 and one.steps_per_epoch == 12 // 4 == ranks[0].steps_per_epoch
    for epoch in (0, 1):
        one.set_epoch(epoch)
        micro = list(one)
        for sampler in ranks:
            sampler.set_epoch(epoch)
        split = [list(sampler) for sampler in ranks]
        # 2 ranks x 1 micro-batch = 1 rank x 2 accumulated micro-batches, step by step
        assert [b for step in zip(*split, strict=True) for b in step] == micro
        seen = []
        for batch in micro:
            assert all(e == epoch for e, _ in batch)
            ids = labels[[i for _, i in batch]].reshape(2, 4)  # P = 2 identities x K = 4 images
            assert (ids == ids[:, :1]).all() and ids[0, 0] != ids[1, 0]
            seen += ids[:, 0].tolist()
        assert len(seen) == len(set(seen)) == 12  # every identity once per epoch
    one.set_epoch(1, start_step=2)  # mid-epoch resume: the rest of the epoch
    assert list(one) == micro[4:]


@pytest.mark.parametrize(
    ("batch", "k", "world", "message"),
    [
        (10, 4, 1, "data.batch_size 10 must be a multiple of data.pk_k 4"),
        (4, 4, 1, "holding at least 2 identities"),
        (8, 4, 8, "a global batch holds 16 identities (2 per micro-batch x 8 processes x 1 accumulated), "
                  "the data has 12"),
    ],
)  # fmt: skip
def test_bad_pk_geometry_is_refused(faces, batch, k, world, message):
    positions = ImageFolderFaces(faces["train"]).indices_per_identity()
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        PKBatchSampler(positions, batch, k, world_size=world)


# -------------------------------------------------------------------------------------------- train


def test_triplet_training_learns_validates_and_resumes_exactly(faces, tmp_path):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    settings = overrides(faces["train"], full, f"data.val_root={faces['val']}", "train.epochs=8",
                         "train.save_every=20", "train.val_every=0")  # fmt: skip
    assert train.main(["--config", CONFIG, "--set", *settings]) == 0
    losses = logged(full, "loss")
    assert len(losses) == 24 and np.mean(losses[-4:]) < 0.75 * np.mean(losses[:4]), losses
    assert logged(full, "active_fraction")  # the miner's statistics reach the log
    state = load_checkpoint(full / "last.pt")
    assert state["head"] == {} and state["meta"]["head"] == "none" and state["meta"]["num_classes"] == 12
    assert state["uncertainty"] is None and state["optimizer"]["state"]  # momentum buffers kept
    assert state["validation"]["lfw"]["pairs"] == 40  # validation runs on the backbone as usual

    # resume from the mid-epoch checkpoint (step 20 of 24): the same weights as without the interruption
    again = overrides(faces["train"], resumed, "train.epochs=8", "train.save_every=0", "train.val_every=0")
    status = train.main(["--config", CONFIG, "--set", *again, "--resume", str(full / "step_20.pt")])
    assert status == 0
    a, b = load_checkpoint(full / "last.pt"), load_checkpoint(resumed / "last.pt")
    assert a["step"] == b["step"] == 24
    for key, value in a["backbone"].items():
        assert torch.equal(value, b["backbone"][key]), key
    assert "resumed" in (resumed / "train.log").read_text()


def test_a_classifier_run_and_a_triplet_run_do_not_resume_one_another(faces, tmp_path, capsys):
    out = tmp_path / "o"
    assert (
        train.main(["--config", CONFIG, "--set", *overrides(faces["train"], out, "train.max_steps=1")]) == 0
    )
    plain = [s for s in overrides(faces["train"], out, "train.max_steps=2") if s not in TRIPLET]
    assert train.main(["--config", CONFIG, "--set", *plain, "--resume", "auto"]) == 2
    assert "trained with head 'none', this run has head.name 'arcface'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("data.sampler=random",), "head.name none trains on the embeddings"),
        (("loss.name=cross_entropy", "loss.params={}"), "head.name none needs a loss on the embeddings"),
        (("head.name=arcface",), "loss.name 'triplet' is not a loss on the head's cross-entropy"),
        (("model.freeze_backbone=true",), "model.freeze_backbone leaves nothing to train"),
        (("mining.difficulty=true",), "mining.difficulty tracks a head's target cosines"),
        (("loss.name=probface", "loss.params={}"), "loss.name probface and model.uncertainty"),
    ],
)  # fmt: skip
def test_inconsistent_metric_settings_fail_before_the_first_step(faces, tmp_path, capsys, extra, message):
    status = train.main(
        ["--config", CONFIG, "--set", *overrides(faces["train"], tmp_path, *extra), "--dry-run"]
    )
    assert status == 2
    assert message in capsys.readouterr().err


def test_a_margin_that_keeps_every_triplet_active_is_warned_about(faces, tmp_path):
    cfg = load_config(CONFIG, overrides(faces["train"], tmp_path, "loss.params.margin=2.5"))
    with pytest.warns(UserWarning, match="every triplet stays active"):
        build_criterion(cfg)


def test_the_masked_triplet_recipe_builds_and_steps(faces, capsys):
    # the recipe's own PK geometry and loss; a small backbone and input for the CPU
    recipe = ROOT / "configs" / "recipes" / "masked_triplet.yaml"
    small = [f"data.root={faces['train']}", "model.backbone=mbf", "model.precision=fp32", "data.val_root="]
    small += ["data.image_size=32", "model.input_size=16", "data.num_workers=0", "model.embedding_size=32"]
    assert train.main(["--config", str(recipe), "--set", *small, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "global_batch: 128" in out and "objective_parameters_M: 0.0" in out
    from tests.test_recipes import dry_run_losses  # finite losses within [0, 2 + margin]

    dry_run_losses(out, load_config(recipe, small), steps=1)  # 96 images: one batch of 128 per epoch


@pytest.mark.slow  # three interpreters start (about 10 s of CPU)
def test_two_processes_equal_one_with_accumulation(faces, tmp_path):
    """Each rank's micro-batch is its own PK batch and its loss its share of the mean over ranks, so 2 gloo
    processes step like 1 process accumulating the same 2 micro-batches."""
    common = ("train.max_steps=1", "data.batch_size=8", "optim.grad_clip=0", "train.save_every=1",
              "train.val_every=0")  # fmt: skip
    one, two = tmp_path / "one", tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for out, launcher, extra in (
        (one, [sys.executable], ("optim.grad_accum=2",)),
        (two, [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"], ()),
    ):
        command = [*launcher, "train.py", "--config", CONFIG, "--set",
                   *overrides(faces["train"], out, *common, *extra)]  # fmt: skip
        proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    start = train.build(load_config(CONFIG, overrides(faces["train"], one)), torch.device("cpu")).backbone
    a, b = load_checkpoint(one / "step_1.pt")["backbone"], load_checkpoint(two / "step_1.pt")["backbone"]
    for key, initial in start.state_dict().items():
        if "running" in key or "num_batches" in key:
            continue  # BN statistics: rank 0's micro-batch vs both
        update = (a[key] - initial).abs().max()
        assert (a[key] - b[key]).abs().max() <= 1e-4 * max(float(update), 1e-6), key
