"""What ``train.py`` refuses about where it writes and what it continues: a new run into a folder that holds
another run's checkpoints, a checkpoint to resume that does not fit the run (architecture, embedding or input
size, colour order, head, class count, optimizer, global batch, seed), a run that diverges, and the file
system refusing a write (a path under a file, a read-only folder, a full disk during a checkpoint).

Each case runs ``train.main(argv)`` in this process on generated identities (32x32 crops, MobileFaceNet at a
16x16 input, as tests/test_train_loop.py), and must end in one line on stderr naming the folder, checkpoint
or setting and what is wrong, exit status 2, no traceback; every file written before is byte for byte as it
was (a refused run writes nothing, config.yaml included), and a run that had started says the same line at
the end of its train.log.
"""

from __future__ import annotations

import errno
import shutil
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest

import core.checkpoint
import core.fileio
import train
from core.checkpoint import load_checkpoint, nonfinite_entry, save_checkpoint
from tests.bad_inputs.conftest import ROOT, assert_refused, call_main, digest
from tests.synthetic_faces import write_identity_folder

CONFIG = str(ROOT / "configs" / "cpu_tiny.yaml")  # mbf + ArcFace, SGD lr 0.1, keep_last 2


@pytest.fixture(scope="module")
def faces(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("faces")
    return {
        "small": write_identity_folder(root / "small", identities=12, per_identity=8, seed=3),
        "ten": write_identity_folder(root / "ten", identities=10, per_identity=8, seed=4),
    }


def settings(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        f"data.root={data}", f"output_dir={out}", "data.image_size=32", "data.num_workers=0",
        "model.embedding_size=64", "model.input_size=16", "data.batch_size=8", "data.val_root=",
        "train.log_every=1", *extra,
    ]  # fmt: skip


def run_train(capsys, data: Path, out: Path, *extra: str, args: tuple[str, ...] = ()):
    return call_main(train.main, ["--config", CONFIG, *args, "--set", *settings(data, out, *extra)], capsys)


@pytest.fixture(scope="module")
def previous_run(faces, tmp_path_factory) -> Path:
    """A finished run of 2 steps: config.yaml, train.log, tensorboard/, step_1.pt, step_2.pt, last.pt."""
    out = tmp_path_factory.mktemp("previous") / "run"
    argv = [
        "--config",
        CONFIG,
        "--set",
        *settings(faces["small"], out, "train.max_steps=2", "train.save_every=1"),
    ]
    assert train.main(argv) == 0
    return out


@pytest.fixture
def run_dir(previous_run, tmp_path) -> Path:
    """A copy of the previous run's output_dir for one case to refuse into."""
    out = tmp_path / "run"
    shutil.copytree(previous_run, out)
    return out


def stopped_line(out: Path) -> str:
    return (out / "train.log").read_text().splitlines()[-1]


# ------------------------------------------------------------ output_dir and resume, refused before any write

RESUME = ("--resume", "auto")


def case(sets: tuple[str, ...], args: tuple[str, ...], *fragments: str) -> tuple:
    """--set arguments, other arguments, and what the error line must name ({out}: the output_dir, {ten}:
    data of 10 identities instead of 12)."""
    return sets, args, fragments


REFUSED = {
    "train-new-run-into-output-dir-holding-checkpoints": case(
        (), (), "output_dir {out} already holds checkpoints", "step_2.pt", "--resume auto", "--overwrite"),
    "train-resume-older-checkpoint-below-newer-ones": case(
        (), ("--resume", "{out}/step_1.pt"), "output_dir {out} holds step_2.pt", "newer than step 1",
        "--resume auto"),
    "train-overwrite-with-resume-auto": case((), ("--overwrite", *RESUME), "--overwrite", "--resume auto"),
    "train-resume-checkpoint-not-found": case(
        (), ("--resume", "{out}/step_9.pt"), "{out}/step_9.pt", "not found"),
    "train-resume-mbf-checkpoint-into-r18-run": case(
        ("model.backbone=r18",), RESUME, "{out}/last.pt", "arch 'mbf' (this run: 'r18')", "model.backbone"),
    "train-resume-other-embedding-size": case(
        ("model.embedding_size=32",), RESUME, "{out}/last.pt", "embedding_size 64 (this run: 32)",
        "model.embedding_size"),
    "train-resume-other-input-size": case(
        ("model.input_size=32",), RESUME, "input_size 16 (this run: 32)", "model.input_size"),
    "train-resume-other-colour-order": case(
        ("data.color=bgr",), RESUME, "color 'rgb' (this run: 'bgr')", "data.color"),
    "train-resume-other-class-count": case(
        ("data.root={ten}",), RESUME, "{out}/last.pt", "num_classes 12 (this run: 10)", "data.root",
        "model.pretrained"),
    "train-resume-other-head": case(
        ("head.name=cosface", "head.params={{}}"), RESUME, "head 'arcface' (this run: 'cosface')",
        "head.name"),
    "train-resume-other-optimizer": case(
        ("optim.name=adamw",), RESUME, "{out}/last.pt", "optim.name 'sgd' (this run: 'adamw')"),
    "train-resume-other-parameter-groups": case(
        ("optim.no_decay_bn_bias=true",), RESUME, "{out}/last.pt", "parameter groups",
        "optim.no_decay_bn_bias"),
    "train-resume-other-global-batch": case(
        ("data.batch_size=4",), RESUME, "{out}/last.pt", "global batch of 8 images, this run has 4"),
    "train-resume-other-seed": case(
        ("experiment.seed=7",), RESUME, "{out}/last.pt", "seed 2048, this run has 7"),
}  # fmt: skip


@pytest.mark.parametrize("case", REFUSED, ids=list(REFUSED))
def test_refused_before_anything_is_written(faces, run_dir, capsys, unchanged, case):
    sets, args, fragments = REFUSED[case]
    fill = {"out": run_dir, "ten": faces["ten"]}
    sets = tuple(s.format(**fill) for s in sets)
    with unchanged(run_dir):  # config.yaml, train.log, the checkpoints: byte for byte
        outcome = run_train(
            capsys, faces["small"], run_dir, *sets, args=tuple(a.format(**fill) for a in args)
        )
    assert_refused(outcome, *(f.format(**fill) for f in fragments))
    assert outcome.code == 2


def test_a_weights_only_or_truncated_checkpoint_is_refused_before_anything_is_written(
    faces, run_dir, tmp_path, capsys, unchanged
):
    weights = save_checkpoint(tmp_path / "weights.pt", {"backbone": {}, "meta": {"arch": "mbf"}})
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes((run_dir / "step_2.pt").read_bytes()[:5000])
    for path, fragment in ((weights, "weights-only checkpoint"), (truncated, "truncated.pt")):
        with unchanged(run_dir, path):
            outcome = run_train(capsys, faces["small"], run_dir, args=("--resume", str(path)))
        assert_refused(outcome, str(path), fragment)


def test_overwrite_moves_the_previous_run_aside_and_deletes_nothing(faces, run_dir, previous_run, capsys):
    before = {Path(p).relative_to(previous_run): md5 for p, md5 in digest([previous_run]).items()}
    outcome = run_train(capsys, faces["small"], run_dir, "train.max_steps=1", args=("--overwrite",))
    assert outcome.code == 0, outcome.err
    [aside] = run_dir.glob("replaced_*")
    moved = {Path(p).relative_to(aside): md5 for p, md5 in digest([aside]).items()}
    assert moved == before  # every file of the previous run, byte for byte
    assert load_checkpoint(run_dir / "last.pt")["step"] == 1 and not (run_dir / "step_2.pt").exists()
    log = (run_dir / "train.log").read_text()
    assert f"the files of the run that was here were moved to {aside}" in log
    assert "step 2/" not in log  # a fresh log: the previous run's lines went with it


# ------------------------------------------------------------------------------------ a diverging run


def test_a_run_at_lr_1e6_stops_with_one_line_and_writes_no_nonfinite_checkpoint(faces, tmp_path, capsys):
    """``optim.lr=1e6``: after the first update the weights are ~1e25, BN statistics overflow and the
    embeddings turn NaN; each such step is skipped (nothing non-finite is kept), and after
    ``train.max_bad_steps`` the run stops naming the step and the last good checkpoint."""
    out = tmp_path / "run"
    diverging = ("optim.lr=1e6", "optim.grad_clip=0", "train.save_every=1", "train.max_bad_steps=3")
    outcome = run_train(capsys, faces["small"], out, *diverging)
    assert_refused(outcome, "for 3 steps in a row", "train.max_bad_steps 3", "lower optim.lr",
                   f"last good checkpoint: {out / 'step_'}")  # fmt: skip
    assert outcome.code == 2
    assert stopped_line(out).endswith(f"stopped: {outcome.last_error_line.removeprefix('train.py: ')}")
    written = sorted(out.glob("*.pt"))
    assert written
    for path in written:
        assert nonfinite_entry(load_checkpoint(path)) is None, path


# ----------------------------------------------------------------------------------- the file system


def test_an_output_dir_under_a_file_is_named(faces, tmp_path, capsys, unchanged):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("a file where a folder was meant")
    for out in (blocker / "run", blocker):
        with unchanged(blocker):
            outcome = run_train(capsys, faces["small"], out)
        assert_refused(outcome, f"cannot write {out / 'config.yaml'}", f"{blocker} is a file, not a folder")
        assert outcome.code == 2


def test_a_read_only_output_dir_is_named(faces, run_dir, capsys, unchanged, monkeypatch):
    def read_only(*args, dir=None, **kwargs):  # what mkstemp meets on a read-only mount (root ignores chmod)
        raise OSError(errno.EROFS, "Read-only file system", dir)

    monkeypatch.setattr(core.fileio, "tempfile", SimpleNamespace(mkstemp=read_only))
    with unchanged(run_dir):
        outcome = run_train(capsys, faces["small"], run_dir, "train.max_steps=3", args=("--resume", "auto"))
    assert_refused(outcome, f"cannot write {run_dir / 'config.yaml'}: Read-only file system")


class FillsTheDisk:
    """A file whose writes fail with ENOSPC once ``room`` bytes were written."""

    def __init__(self, fh, room: int):
        self.fh, self.room = fh, room

    def write(self, data):
        self.room -= len(data)
        if self.room < 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.fh.write(data)

    def __getattr__(self, name):
        return getattr(self.fh, name)


def test_a_full_disk_during_a_checkpoint_keeps_the_previous_ones(faces, run_dir, capsys, monkeypatch):
    """The disk fills while step_3.pt is written: one line naming it and the system's reason (not torch's
    "unexpected pos ..."), no temporary file left, step_1/step_2/last.pt byte for byte as they were."""
    real = core.checkpoint.atomic_write

    @contextmanager
    def full_disk(path, mode="wb", **kwargs):
        with real(path, mode, **kwargs) as fh:
            yield FillsTheDisk(fh, room=4096)

    monkeypatch.setattr(core.checkpoint, "atomic_write", full_disk)
    checkpoints = [run_dir / n for n in ("step_1.pt", "step_2.pt", "last.pt")]
    before = digest(checkpoints)
    outcome = run_train(capsys, faces["small"], run_dir, "train.max_steps=3", args=("--resume", "auto"))
    target = run_dir / "step_3.pt"
    assert_refused(outcome, f"cannot write {target}: No space left on device")
    assert "unexpected pos" not in outcome.err
    assert digest(checkpoints) == before
    assert sorted(p.name for p in run_dir.iterdir() if p.is_file()) == [
        "config.yaml", "last.pt", "step_1.pt", "step_2.pt", "train.log",
    ]  # fmt: skip
    assert stopped_line(run_dir).endswith(f"stopped: cannot write {target}: No space left on device")
