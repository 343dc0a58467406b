"""The training loop through the real train.py on generated identities (32x32, MobileFaceNet, CPU):
it learns, resumes exactly after a kill, and 2 gloo processes equal 1 process with the same global batch."""

from __future__ import annotations

import math
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import train
from backbones import build_backbone
from core.checkpoint import load_checkpoint, nonfinite_entry
from core.config import load_config
from data.sampler import GlobalBatchSampler
from data.transforms import normalize_batch
from data.verification import load_bin
from evaluation.embedders import TorchEmbedder, load_embedder
from evaluation.extract import extract
from evaluation.verification import evaluate_pairs, fuse_flip
from mining import DifficultyScores
from tests.synthetic_faces import write_identity_folder, write_pairs_bin

ROOT = Path(__file__).resolve().parent.parent
CONFIG = str(ROOT / "configs" / "cpu_tiny.yaml")


@pytest.fixture(scope="module")
def faces(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("synthetic")
    return {
        "train": write_identity_folder(root / "train", identities=40, per_identity=16),
        "small": write_identity_folder(root / "small", identities=12, per_identity=8, seed=3),
        "val": write_pairs_bin(root / "val" / "lfw.bin", pairs=200).parent,
    }


def overrides(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        f"data.root={data}", f"output_dir={out}", "data.image_size=32", "data.num_workers=0",
        "model.embedding_size=64", *extra,
    ]  # fmt: skip


def run_train(*args: str, check: bool = True, torchrun: int = 0) -> subprocess.CompletedProcess:
    launcher = [sys.executable]
    if torchrun:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}"]
    proc = subprocess.run(
        [*launcher, "train.py", "--config", CONFIG, *args],
        cwd=ROOT, capture_output=True, text=True, check=False, timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def trained_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Parameters (not BN running statistics) of the backbone and the classifier of a checkpoint."""
    state = load_checkpoint(path)
    out = {
        f"backbone.{k}": v
        for k, v in state["backbone"].items()
        if "running" not in k and "num_batches" not in k
    }
    out.update({f"head.{k}": v for k, v in state["head"].items()})
    return out


def test_a_tiny_run_learns_to_verify_unseen_identities(faces, tmp_path):
    out = tmp_path / "run"
    settings = overrides(
        faces["train"], out, f"data.val_root={faces['val']}", "train.epochs=6", "train.val_every=40"
    )
    status = train.main(["--config", CONFIG, "--set", *settings])
    assert status == 0
    val = load_bin(faces["val"] / "lfw.bin")
    torch.manual_seed(2048)
    untrained = build_backbone("mbf", embedding_size=64, input_size=32).eval()
    original, flipped = extract(TorchEmbedder(untrained), val.images, 100)
    chance = evaluate_pairs(fuse_flip(original, flipped), val.issame)["accuracy"]

    log = (out / "train.log").read_text()
    accuracies = [
        float(line.split("lfw ")[1].split("±")[0]) for line in log.splitlines() if "validation" in line
    ]
    assert len(accuracies) == 3  # steps 40, 80 and the end (120)
    assert accuracies[-1] >= 85.0, log
    assert accuracies[-1] >= chance * 100 + 15, (chance, log)
    losses = [float(line.split(" loss ")[1].split()[0]) for line in log.splitlines() if " loss " in line]
    assert losses[-1] < losses[0] / 5

    # what a finished run leaves behind
    for name in ("last.pt", "best.pt", "config.yaml", "step_120.pt"):
        assert (out / name).is_file(), name
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {
        "train/loss",
        "train/lr",
        "train/images_per_s",
        "val/lfw_accuracy",
        "val/mean_accuracy",
    } <= scalars
    assert [e.step for e in events.Scalars("val/lfw_accuracy")] == [40, 80, 120]
    assert load_config(out / "config.yaml") == load_config(CONFIG, settings)
    state = load_checkpoint(out / "last.pt")
    assert state["step"] == 120 and state["epoch"] == 6
    assert state["meta"]["color"] == "rgb" and state["meta"]["input_size"] == 32
    assert state["head"]["weight"].shape == (40, 64)
    assert state["validation"]["lfw"]["accuracy"] * 100 == pytest.approx(accuracies[-1], abs=0.01)


RESUME_SET = (
    "train.epochs=2", "data.batch_size=16", "model.dropout=0.2", "head.name=adaface", "head.params={}",
    "head.sample_rate=0.5", "data.augment.crop=0.5", "data.augment.photometric=0.5", "train.log_every=1",
    "mining.difficulty=true",
)  # fmt: skip


# The killed run: train.py in a process that writes half of step_8.pt's bytes to the atomic writer's
# temporary file, syncs them and kills itself (SIGKILL), the worst moment for a kill to come.
KILLED_MID_WRITE = """
import io, os, signal, sys
from pathlib import Path

import torch

real_save = torch.save


def save(obj, f, *args, **kwargs):
    target = Path(os.readlink(f"/proc/self/fd/{f.fileno()}")) if hasattr(f, "fileno") else Path(f)
    if target.name.startswith(".step_8.pt."):
        data = io.BytesIO()
        real_save(obj, data, *args, **kwargs)
        f.write(data.getvalue()[: len(data.getvalue()) // 2])
        f.flush()
        os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, f, *args, **kwargs)


torch.save = save
import train

sys.exit(train.main(sys.argv[1:]))
"""


def test_resume_after_a_kill_during_a_checkpoint_write_equals_an_uninterrupted_run(faces, tmp_path):
    # 96 images / 16 = 6 steps per epoch, 12 in all; the checkpoint at step 4 is mid-epoch, the kill comes
    # while step_8.pt is half written.
    full, broken = tmp_path / "full", tmp_path / "broken"
    run_train("--set", *overrides(faces["small"], full, *RESUME_SET))
    script = tmp_path / "killed_mid_write.py"
    script.write_text(KILLED_MID_WRITE)
    proc = subprocess.run(
        [sys.executable, str(script), "--config", CONFIG, "--set",
         *overrides(faces["small"], broken, *RESUME_SET, "train.save_every=4")],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    partial = [p.name for p in broken.iterdir() if p.name.startswith(".step_8.pt.")]
    assert len(partial) == 1 and not (broken / "step_8.pt").exists()  # killed mid-write indeed
    assert load_checkpoint(broken / "last.pt")["step"] == 4  # last.pt still names the last whole one

    run_train("--set", *overrides(faces["small"], broken, *RESUME_SET), "--resume", "auto")
    assert not [p.name for p in broken.iterdir() if p.name.endswith(".tmp")]  # the partial file is gone
    log = (broken / "train.log").read_text()
    assert f"removed 1 partial files of interrupted writes: {partial}" in log
    assert " at epoch 0 step 4" in log  # resumed from the last whole checkpoint

    a, b = trained_tensors(full / "last.pt"), trained_tensors(broken / "last.pt")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    sa, sb = load_checkpoint(full / "last.pt"), load_checkpoint(broken / "last.pt")
    assert sa["step"] == sb["step"] == 12
    for key in sa["optimizer"]["state"]:
        assert torch.equal(
            sa["optimizer"]["state"][key]["momentum_buffer"], sb["optimizer"]["state"][key]["momentum_buffer"]
        )
    assert torch.equal(sa["difficulty"], sb["difficulty"])  # the per-image scores survive the kill too


def test_a_resumed_run_draws_from_the_global_generators_what_an_uninterrupted_one_draws(
    faces, tmp_path, monkeypatch
):
    """Each step's draws from torch's, NumPy's and Python's global generators (dropout, Partial FC's class
    sampling, a plugged-in module's noise) follow from (seed, rank, step): resumed after 1 of 2 steps in a
    process whose generators are elsewhere, the run ends with the same weights, bit for bit."""
    real = train.forward_loss

    def forward_loss(run, *batch):  # a loss scaled by one draw of each global generator
        draws = torch.rand(()).item() + float(np.random.rand()) + random.random()
        result = real(run, *batch)
        return result._replace(loss=result.loss * (1.0 + draws))

    monkeypatch.setattr(train, "forward_loss", forward_loss)
    settings = ("data.batch_size=8", "model.input_size=16", "model.dropout=0.2", "head.sample_rate=0.5",
                "train.max_steps=2")  # fmt: skip
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    train.fit(load_config(CONFIG, overrides(faces["small"], full, *settings, "train.save_every=1")))
    torch.manual_seed(123)  # a fresh process: its generators are not where the killed one left them
    np.random.seed(123)
    random.seed(123)
    train.fit(load_config(CONFIG, overrides(faces["small"], resumed, *settings)), str(full / "step_1.pt"))
    a, b = trained_tensors(full / "last.pt"), trained_tensors(resumed / "last.pt")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # the draws matter: the same step after other draws ends elsewhere
    monkeypatch.setattr(train, "seed_step", lambda run: None)
    other = tmp_path / "other"
    train.fit(load_config(CONFIG, overrides(faces["small"], other, *settings)), str(full / "step_1.pt"))
    c = trained_tensors(other / "last.pt")
    assert any(not torch.equal(a[key], c[key]) for key in a)


def test_a_run_removes_partial_files_of_interrupted_saves_from_its_output_dir(faces, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".step_4.pt.x1y2z3w4.tmp").write_bytes(b"half a checkpoint")  # the atomic writer's temporary
    (out / ".last.pt.0123abcd.tmp").write_bytes(b"a copy of last.pt, interrupted")
    for name in ("notes.tmp", ".step_4.pt.tmp", "step_4.pt.x1y2z3w4.tmp"):  # other names stay
        (out / name).write_bytes(b"user data")
    settings = ("data.batch_size=8", "model.input_size=16", "train.max_steps=1")
    train.fit(load_config(CONFIG, overrides(faces["small"], out, *settings)))
    names = {p.name for p in out.iterdir()}
    assert {"notes.tmp", ".step_4.pt.tmp", "step_4.pt.x1y2z3w4.tmp", "step_1.pt", "last.pt"} <= names
    assert not any(name.endswith(".tmp") and name.count(".") >= 4 and name.startswith(".") for name in names)
    assert "removed 2 partial files of interrupted writes" in (out / "train.log").read_text()


def max_difference(a: Path, b: Path) -> float:
    ta, tb = trained_tensors(a), trained_tensors(b)
    assert ta.keys() == tb.keys()
    return max(float((ta[k].double() - tb[k].double()).abs().max()) for k in ta)


def test_two_processes_equal_one_and_resume_on_one(faces, tmp_path):
    # Global batch 16 either way: 1 process x 2 accumulated micro-batches of 8, or 2 processes x 8. This
    # small net at lr 0.1 is chaotic (the float noise of thread scheduling alone grows ~100x per step), so
    # step 1 is compared to 1e-6 and step 2 relative to the size of its own update: a real difference
    # (initial centres, gradient scale, sample order) is as large as the update itself. No gradient
    # clipping: it would hide a wrong gradient scale.
    common = (
        "train.epochs=2", "train.log_every=1", "data.augment.crop=0.5", "data.batch_size=8",
        "train.save_every=1", "optim.grad_clip=0", "train.max_steps=2", "mining.difficulty=true",
    )  # fmt: skip
    one, two, moved = tmp_path / "one", tmp_path / "two", tmp_path / "moved"
    run_train("--set", *overrides(faces["small"], one, *common, "optim.grad_accum=2"))
    run_train("--set", *overrides(faces["small"], two, *common), torchrun=2)
    update = max_difference(one / "step_2.pt", one / "step_1.pt")
    assert max_difference(one / "step_1.pt", two / "step_1.pt") < 1e-3 * update
    scores = [load_checkpoint(d / "step_1.pt")["difficulty"] for d in (one, two)]
    torch.testing.assert_close(scores[0], scores[1], atol=1e-5, rtol=0)  # global-batch EMA on every rank
    assert max_difference(one / "step_2.pt", two / "step_2.pt") < 0.02 * update

    # step 1 on 2 processes, step 2 on 1 process with accumulation
    run_train("--set", *overrides(faces["small"], moved, *common[:-1], "train.max_steps=1"), torchrun=2)
    run_train("--set", *overrides(faces["small"], moved, *common, "optim.grad_accum=2"), "--resume", "auto")
    assert max_difference(one / "step_2.pt", moved / "step_2.pt") < 0.02 * update
    state = load_checkpoint(moved / "last.pt")
    assert state["step"] == 2 and state["sampler"]["step_in_epoch"] == 2


def test_a_changed_global_batch_is_refused_on_resume(faces, tmp_path):
    out = tmp_path / "run"
    run_train("--set", *overrides(faces["small"], out, "data.batch_size=16", "train.max_steps=2"))
    proc = run_train(
        "--set", *overrides(faces["small"], out, "data.batch_size=8"), "--resume", "auto", check=False
    )
    assert proc.returncode == 2
    assert "global batch of 16 images, this run has 8" in proc.stderr


def test_non_finite_losses_are_skipped_then_abort(faces, tmp_path, monkeypatch):
    real = train.forward_loss
    poisoned: set[int] = {3}

    def forward_loss(run, *batch):
        result = real(run, *batch)
        return result._replace(loss=result.loss * float("nan")) if run.state.step in poisoned else result

    monkeypatch.setattr(train, "forward_loss", forward_loss)
    cfg = load_config(
        CONFIG, overrides(faces["small"], tmp_path / "a", "data.batch_size=16", "train.max_steps=6")
    )
    before: dict[str, torch.Tensor] = {}

    real_step = train.train_step

    def train_step(run, batches):
        if run.state.step == 3:
            before.update({k: v.clone() for k, v in run.backbone.state_dict().items()})
        loss = real_step(run, batches)
        if run.state.step == 3:
            after = run.backbone.state_dict()
            assert all(torch.equal(before[k], after[k]) for k in before)  # not even the BN statistics
        return loss

    monkeypatch.setattr(train, "train_step", train_step)
    run = train.fit(cfg)
    assert run.state.step == 6 and run.state.skipped_steps == 1

    poisoned.update(range(4, 100))
    cfg = load_config(
        CONFIG,
        overrides(
            faces["small"],
            tmp_path / "b",
            "data.batch_size=16",
            "train.save_every=2",
            "train.max_bad_steps=3",
        ),
    )
    with pytest.raises(train.TrainingError, match=r"step 5: loss is nan for 3 steps in a row .*/step_4\.pt"):
        train.fit(cfg)


def test_labels_outside_the_classes_are_refused_before_training():
    with pytest.raises(train.TrainingError, match=r"image 2 has label 7 outside \[0, 5\)"):
        train.check_labels(np.array([0, 1, 7, 2]), 5, "/data/x")
    with pytest.raises(train.TrainingError, match="holds no images"):
        train.check_labels(np.array([], dtype=np.int64), 5, "/data/x")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("data.batch_size=1000",),
         "global batch of 1000 images (1000 per process x 1 processes x 1 accumulated)"),
        (("head.params.varient=clip",),
         "unknown key head.params.varient: head 'arcface' takes s, m, variant, easy_margin, init; "
         "did you mean head.params.variant?"),
        (("head.name=cosfase",), "unknown head 'cosfase'; did you mean 'cosface'?"),
        (("loss.params.gama=1",), "unknown key loss.params.gama"),
        (("train.best_metric=cfp_fp",),
         "train.best_metric 'cfp_fp' is neither 'mean' nor in data.val_targets"),
    ],
)  # fmt: skip
def test_bad_settings_fail_before_the_first_step(faces, tmp_path, capsys, extra, message):
    status = train.main(
        ["--config", CONFIG, "--set", *overrides(faces["small"], tmp_path, *extra), "--dry-run"]
    )
    assert status == 2
    assert message in capsys.readouterr().err


def test_an_empty_image_folder_is_refused(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    status = train.main(
        ["--config", CONFIG, "--set", *overrides(tmp_path / "empty", tmp_path / "o"), "--dry-run"]
    )
    assert status == 2
    assert "no identity folders with images" in capsys.readouterr().err


def test_dry_run_runs_two_steps_and_reports(faces, tmp_path, capsys):
    status = train.main(
        ["--config", CONFIG, "--set", *overrides(faces["small"], tmp_path / "o"), "--dry-run"]
    )
    assert status == 0
    report = yaml.safe_load(capsys.readouterr().out)
    assert report["classes"] == 12 and report["images"] == 96 and report["steps"] == 2
    assert report["embedding"] == [32, 64] and report["global_batch"] == 32
    assert all(np.isfinite(report["losses"]))
    assert not (tmp_path / "o").exists()  # a dry run writes nothing


def test_difficulty_scores_move_only_for_the_images_of_the_step(faces, tmp_path):
    cfg = load_config(
        CONFIG, overrides(faces["small"], tmp_path / "d", "data.batch_size=16", "train.max_steps=1",
                          "mining.difficulty=true")
    )  # fmt: skip
    run = train.fit(cfg)
    initial = DifficultyScores(96, seed=cfg.experiment.seed).scores
    scores = run.objective.difficulty.scores
    moved = torch.nonzero(scores != initial).squeeze(1)
    sampler = GlobalBatchSampler(96, 16, seed=cfg.experiment.seed)
    first_batch = sorted(i for _, i in next(iter(sampler)))
    assert moved.tolist() == first_batch
    # d <- 0.9 d + 0.1 cos: the new scores are cosines' EMA, inside the reachable interval
    low, high = 0.9 * initial[moved] - 0.1, 0.9 * initial[moved] + 0.1
    assert ((scores[moved] >= low) & (scores[moved] <= high)).all()
    assert torch.equal(load_checkpoint(tmp_path / "d" / "last.pt")["difficulty"], scores)


def test_a_weights_only_checkpoint_is_refused_for_resume(faces, tmp_path, capsys):
    from core.checkpoint import save_checkpoint

    save_checkpoint(tmp_path / "weights.pt", {"backbone": {}, "meta": {"arch": "mbf"}})
    status = train.main(["--config", CONFIG, "--set", *overrides(faces["small"], tmp_path / "o"),
                         "--resume", str(tmp_path / "weights.pt")])  # fmt: skip
    assert status == 2
    assert (
        "holds no optimizer, sampler, head, scheduler: a weights-only checkpoint" in capsys.readouterr().err
    )


def test_a_smaller_network_input_is_resized_alike_in_training_and_evaluation(faces, tmp_path):
    """model.input_size=16 on 32x32 crops: the checkpoint records 16, and its embedder resizes 32x32
    faces exactly as the training step does."""
    out = tmp_path / "o"
    settings = overrides(faces["small"], out, "model.input_size=16", "train.max_steps=1")
    assert train.main(["--config", CONFIG, "--set", *settings]) == 0
    state = load_checkpoint(out / "last.pt")
    assert state["meta"]["input_size"] == 16
    embedder = load_embedder(out / "last.pt")
    images = torch.from_numpy(load_bin(faces["val"] / "lfw.bin").images[:8])
    assert images.shape[-1] == 32
    cfg = load_config(out / "config.yaml")
    model = train.build_model(cfg).eval()
    model.load_state_dict(state["backbone"])
    with torch.no_grad():
        expected = model(normalize_batch(images, "rgb", 16))
    torch.testing.assert_close(embedder(images), expected)
    assert model.input_size == 16 and not torch.allclose(embedder(images[:, :, ::2, ::2]), expected)


def test_a_changed_learning_rate_applies_from_the_resumed_step(faces, tmp_path):
    """Resumed from step 1 with optim.lr halved: step 2 moves every trained parameter by half of what the
    run at the old lr moved it (SGD: the same momentum buffer and gradient from the same weights, batch
    and seed, times the lr), and other optimizer settings are this run's too."""
    settings = ("data.batch_size=8", "model.input_size=16", "train.max_steps=2", "train.save_every=1")
    full, half = tmp_path / "full", tmp_path / "half"
    train.fit(load_config(CONFIG, overrides(faces["small"], full, *settings)))
    train.fit(
        load_config(CONFIG, overrides(faces["small"], half, *settings, "optim.lr=0.05")),
        str(full / "step_1.pt"),
    )
    start, old, new = (
        trained_tensors(p) for p in (full / "step_1.pt", full / "step_2.pt", half / "step_2.pt")
    )
    for key in start:
        moved, expected = new[key] - start[key], 0.5 * (old[key] - start[key])
        # each difference is rounded to the float32 spacing of the weights themselves (about 1 for BN's)
        rounding = 4 * torch.finfo(torch.float32).eps * float(start[key].abs().max())
        torch.testing.assert_close(moved, expected, rtol=1e-4, atol=rounding, msg=key)
        if key == "head.weight":  # the comparison sees the lr: the old lr's step fails it
            with pytest.raises(AssertionError):
                torch.testing.assert_close(old[key] - start[key], expected, rtol=1e-4, atol=rounding)
    assert "applied from step 1: optim.lr 0.1 -> 0.05" in (half / "train.log").read_text()

    other = tmp_path / "other"
    run = train.fit(
        load_config(CONFIG, overrides(faces["small"], other, *settings[:2], "train.max_steps=1",
                                      "optim.weight_decay=0.001", "optim.momentum=0.8")),
        str(full / "step_1.pt"),
    )  # fmt: skip
    assert [(g["weight_decay"], g["momentum"]) for g in run.optimizer.param_groups] == [(0.001, 0.8)]
    assert run.optimizer.state_dict()["state"]  # with the checkpoint's momentum buffers


def test_non_finite_embeddings_go_through_the_guard(faces, tmp_path, monkeypatch):
    """Embeddings turned NaN (a diverged backbone) reach Partial FC, which lets them through on every rank
    alike: the step is skipped and counted, the run goes on, and in a row they stop it after
    train.max_bad_steps, saying the embeddings were not finite."""
    real = train.network_input
    poisoned: set[int] = {1}
    monkeypatch.setattr(
        train,
        "network_input",
        lambda run, x: real(run, x) * (math.nan if run.state.step in poisoned else 1.0),
    )
    settings = ("data.batch_size=8", "model.input_size=16", "train.max_steps=4")
    run = train.fit(load_config(CONFIG, overrides(faces["small"], tmp_path / "a", *settings)))
    assert run.state.step == 4 and run.state.skipped_steps == 1
    assert nonfinite_entry(load_checkpoint(tmp_path / "a" / "last.pt")) is None  # BN statistics restored

    poisoned.update(range(2, 100))
    cfg = load_config(CONFIG, overrides(faces["small"], tmp_path / "b", *settings, "train.max_bad_steps=2"))
    message = (
        r"step 2: loss is nan for 2 steps in a row \(the embeddings hold NaN or inf; train.max_bad_steps 2"
    )
    with pytest.raises(train.TrainingError, match=message):
        train.fit(cfg)
    assert "stopped: step 2: loss is nan" in (tmp_path / "b" / "train.log").read_text().splitlines()[-1]


def test_a_checkpoint_holding_nan_or_inf_is_not_written(faces, tmp_path, monkeypatch):
    """A BN statistic that overflowed after step 2's update: step_2.pt is not written, the run stops naming
    the tensor and the last good checkpoint, which (and last.pt) stays byte for byte as it was."""
    out = tmp_path / "run"
    real = train.train_step
    written: dict[str, bytes] = {}

    def train_step(run, batches):
        loss = real(run, batches)
        if run.state.step == 1:  # the second step, before its save
            written.update({p.name: p.read_bytes() for p in (out / "step_1.pt", out / "last.pt")})
            name, buffer = next((n, b) for n, b in run.backbone.named_buffers() if n.endswith("running_var"))
            buffer[0] = math.inf
            written["tensor"] = f"backbone.{name}".encode()
        return loss

    monkeypatch.setattr(train, "train_step", train_step)
    cfg = load_config(CONFIG, overrides(faces["small"], out, "data.batch_size=8", "model.input_size=16",
                                        "train.max_steps=3", "train.save_every=1"))  # fmt: skip
    with pytest.raises(train.TrainingError) as caught:
        train.fit(cfg)
    tensor = written["tensor"].decode()
    assert str(caught.value) == (
        f"step 2: step_2.pt not written: {tensor} holds NaN or inf (the run diverged: lower optim.lr or set "
        f"optim.grad_clip); last good checkpoint: {out / 'step_1.pt'}"
    )
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == [
        "config.yaml",
        "last.pt",
        "step_1.pt",
        "train.log",
    ]
    assert all((out / name).read_bytes() == data for name, data in written.items() if name.endswith(".pt"))
    assert (out / "train.log").read_text().splitlines()[-1].endswith(f"stopped: {caught.value}")


@pytest.mark.parametrize("fails", [False, True], ids=["finished", "refused"])
def test_a_rank_that_stops_on_an_error_leaves_without_the_closing_barrier(monkeypatch, capsys, fails):
    """One rank that meets a bad record stops while the others wait in their next collective: a closing
    barrier would wait for them until the collective timeout and then end in a traceback."""
    calls = []

    def fake_fit(cfg, resume, overwrite=False):
        if fails:
            raise train.TrainingError("record 7 of /data/train.rec: bad image")

    monkeypatch.setattr(train, "fit", fake_fit)
    monkeypatch.setattr(train, "shutdown_distributed", lambda after_fault=False: calls.append(after_fault))
    status = train.main(["--config", CONFIG])
    assert status == (2 if fails else 0)
    assert calls == [fails]
    assert ("record 7 of /data/train.rec" in capsys.readouterr().err) == fails
