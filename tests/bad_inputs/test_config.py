"""What ``train.py`` refuses in a config: each case is a real ``train.py --config X [--set ...] --dry-run``
whose config file or ``--set`` argument holds one mistake. Every one must end in one line that names the key
(dotted path), what is allowed, and where the value came from (the ``--set`` argument, or the YAML file and
line), with exit code 2, no traceback, and nothing written: the config files and the data are unchanged.

The cases run ``train.main(argv)`` in this process (the refusals come before any step, most of them before
the data is opened).
"""

from __future__ import annotations

import shutil
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

import train
from data.recordio import pack_folder
from tests.bad_inputs.conftest import ROOT, assert_refused, call_main

TINY = ROOT / "configs" / "cpu_tiny.yaml"  # mbf + ArcFace (s 32, m 0.3), SGD lr 0.1, polynomial


@dataclass(frozen=True)
class Case:
    sets: tuple[str, ...] = ()  # --set arguments
    yaml: str = ""  # keys of the experiment file (on top of cpu_tiny.yaml), when the mistake is in a file
    base: str = ""  # a second file the experiment file inherits from (_base_), when the mistake is there
    fragments: tuple[str, ...] = ()  # what the error line must name; {exp} and {base}: the files' paths
    data: str = "folder"  # the training data: folder (112x112 CelebA faces), rec (the same, packed) or orl


def set_case(setting: str, *fragments: str, extra: tuple[str, ...] = ()) -> Case:
    """One bad ``--set`` argument (plus settings it needs): the error names that argument."""
    return Case(sets=(*extra, setting), fragments=(f"--set {setting}", *fragments))


CASES = {
    # ---- values out of range: named key, allowed range, blamed on the --set argument
    "set-data-batch-size-zero": set_case("data.batch_size=0", "data.batch_size", ">= 1"),
    "set-data-batch-size-negative": set_case("data.batch_size=-4", "data.batch_size", ">= 1"),
    "set-optim-lr-negative": set_case("optim.lr=-0.1", "optim.lr", "> 0"),
    "set-optim-lr-zero": set_case("optim.lr=0", "optim.lr", "> 0"),
    "set-optim-lr-nan": set_case("optim.lr=.nan", "optim.lr", "finite"),
    "set-optim-lr-inf": set_case("optim.lr=.inf", "optim.lr", "finite"),
    "set-optim-momentum-above-one": set_case("optim.momentum=1.5", "optim.momentum", "in [0, 1)"),
    "set-optim-weight-decay-negative": set_case("optim.weight_decay=-1e-4", "optim.weight_decay", ">= 0"),
    "set-optim-betas-one-value": set_case(
        "optim.betas=[0.9]", "optim.betas", "2 values", extra=("optim.name=adamw",)
    ),
    "set-optim-betas-value-one": set_case("optim.betas=[0.9, 1.0]", "optim.betas[1]", "in [0, 1)"),
    "set-optim-grad-accum-zero": set_case("optim.grad_accum=0", "optim.grad_accum", ">= 1"),
    "set-optim-grad-clip-negative": set_case("optim.grad_clip=-5", "optim.grad_clip", ">= 0"),
    "set-train-epochs-zero": set_case("train.epochs=0", "train.epochs", ">= 1"),
    "set-train-keep-last-zero": set_case("train.keep_last=0", "train.keep_last", ">= 1"),
    "set-train-log-every-zero": set_case("train.log_every=0", "train.log_every", ">= 1"),
    "set-train-val-every-negative": set_case("train.val_every=-1", "train.val_every", ">= 0"),
    "set-train-max-bad-steps-zero": set_case("train.max_bad_steps=0", "train.max_bad_steps", ">= 1"),
    "set-data-num-workers-negative": set_case("data.num_workers=-1", "data.num_workers", ">= 0"),
    "set-data-num-classes-zero": set_case("data.num_classes=0", "data.num_classes", ">= 1"),
    "set-data-pk-k-zero": set_case("data.pk_k=0", "data.pk_k", ">= 1", extra=("data.sampler=pk",)),
    "set-data-augment-flip-above-one": set_case("data.augment.flip=1.5", "data.augment.flip", "in [0, 1]"),
    "set-data-augment-crop-negative": set_case("data.augment.crop=-0.2", "data.augment.crop", "in [0, 1]"),
    "set-model-embedding-size-zero": set_case("model.embedding_size=0", "model.embedding_size", ">= 1"),
    "set-model-input-size-zero": set_case("model.input_size=0", "model.input_size", ">= 1"),
    "set-model-dropout-one": set_case("model.dropout=1.0", "model.dropout", "in [0, 1)"),
    "set-experiment-seed-negative": set_case("experiment.seed=-1", "experiment.seed", ">= 0"),
    "set-head-sample-rate-zero": set_case("head.sample_rate=0", "head.sample_rate", "in (0, 1]"),
    "set-head-sample-rate-above-one": set_case("head.sample_rate=1.5", "head.sample_rate", "in (0, 1]"),
    "set-schedule-warmup-negative": set_case("schedule.warmup_epochs=-1", "schedule.warmup_epochs", ">= 0"),
    "set-schedule-milestones-decreasing": set_case(
        "schedule.milestones=[3, 1]", "schedule.milestones", "increasing", extra=("schedule.name=multistep",)
    ),
    "set-schedule-min-lr-above-lr": set_case("schedule.min_lr=1.0", "schedule.min_lr", "optim.lr"),
    "set-mining-cd-percentile-above-one": set_case(
        "mining.cd_percentile=2", "mining.cd_percentile", "in [0, 1]"
    ),
    # ---- the head's and the loss's constructor arguments: names and types from the signature
    "set-head-params-m-not-a-number": set_case("head.params.m=abc", "head.params.m", "a number"),
    "set-head-params-s-null": set_case("head.params.s=null", "head.params.s", "a number"),
    "set-head-params-easy-margin-not-bool": set_case(
        "head.params.easy_margin=2", "head.params.easy_margin", "true or false"
    ),
    "set-head-params-unknown-name": set_case("head.params.mm=0.5", "head.params.mm", "head.params.m"),
    # a value the constructor refuses: named with the part and its params (here set in two places)
    "set-head-params-variant-unknown": Case(
        sets=("head.params.variant=fast",),
        fragments=("head.params", "arcface variant must be one of", "'fast'"),
    ),
    "set-head-params-for-head-none": set_case(
        "head.params.s=3", "head.params", "head.name", extra=("head.name=none", "data.sampler=pk")
    ),
    "set-loss-params-unknown-name": set_case(
        "loss.params.gama=2", "loss.params.gama", "loss.params.gamma", extra=("loss.name=focal",)
    ),
    "set-loss-focal-gamma-negative": set_case(
        "loss.params.gamma=-1", "loss.params", "gamma", extra=("loss.name=focal",)
    ),
    # ---- names of registered parts
    "set-model-backbone-unknown": set_case("model.backbone=r5O", "model.backbone", "r50"),
    "set-head-name-unknown": set_case("head.name=arcfce", "head.name", "arcface"),
    "set-loss-name-unknown": set_case("loss.name=focla", "loss.name", "focal"),
    # ---- --set itself
    "set-unknown-key": set_case("optim.lrr=1", "unknown key optim.lrr", "optim.lr"),
    "set-wrong-type": set_case("optim.lr=fast", "optim.lr", "a number"),
    "set-missing-equals": set_case("optim.lr", "dotted.key=value"),
    "set-value-not-yaml": set_case("data.val_targets=[lfw", "not valid yaml"),
    # ---- mistakes in YAML files: the file and the line
    "yaml-optim-lr-negative": Case(
        yaml="optim:\n  momentum: 0.9\n  lr: -0.1\n", fragments=("{exp}", "line 4", "optim.lr", "> 0")
    ),
    "yaml-head-params-m-string": Case(
        yaml="head:\n  params:\n    m: abc\n", fragments=("{exp}", "line 4", "head.params.m", "a number")
    ),
    "yaml-unknown-key": Case(yaml="optim:\n  lrr: 0.1\n", fragments=("{exp}", "line 3", "optim.lrr")),
    "yaml-duplicate-key": Case(
        yaml="optim:\n  lr: 0.1\n  lr: 0.2\n",
        fragments=("{exp}", "line 4", "duplicate", "optim.lr", "line 3"),
    ),
    "yaml-duplicate-section": Case(
        yaml="train:\n  epochs: 2\ntrain:\n  epochs: 3\n", fragments=("{exp}", "line 4", "duplicate", "train")
    ),
    "yaml-duplicate-key-in-base-file": Case(
        base="data:\n  batch_size: 8\n  batch_size: 16\n",
        fragments=("{base}", "line 4", "duplicate", "data.batch_size", "line 3"),
    ),
    "yaml-bad-value-in-base-file": Case(
        base="train:\n  epochs: 0\n", fragments=("{base}", "line 3", "train.epochs", ">= 1")
    ),
    # ---- data.image_size against the data
    "set-data-image-size-not-the-folders": Case(
        sets=("data.image_size=128",), fragments=("data.image_size", "128", "112x112", "{data}")
    ),
    "set-data-image-size-not-the-faces-92x112": Case(
        data="orl", fragments=("data.image_size", "112", "92x112", "{data}", "align the faces to squares")
    ),
    "set-data-image-size-not-the-recordio": Case(
        sets=("data.image_size=96",), data="rec", fragments=("data.image_size", "96", "112x112", "{data}")
    ),
}


@pytest.fixture(scope="module")
def faces(shared_data, tmp_path_factory) -> dict[str, Path]:
    """Four real CelebA identities (aligned 112x112 faces) as a folder and packed into a RecordIO, and two
    ORL identities (92x112 photographs)."""
    src = shared_data / "celeba_aligned112"
    folder = tmp_path_factory.mktemp("faces")
    for identity in sorted(p for p in src.iterdir() if p.is_dir())[:4]:
        shutil.copytree(identity, folder / identity.name)
    rec = tmp_path_factory.mktemp("rec")
    pack_folder(folder, rec / "train")
    orl = tmp_path_factory.mktemp("orl")  # grey 92x112 photographs, not aligned square faces
    for identity in ("s1", "s2"):
        shutil.copytree(shared_data / "orl" / identity, orl / identity)
    return {
        "folder": folder,
        "folder_dir": folder,
        "rec": rec / "train.rec",
        "rec_dir": rec,
        "orl": orl,
        "orl_dir": orl,
    }


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_train_refuses_bad_config(case: Case, faces, tmp_path, capsys, unchanged):
    data = faces[case.data]
    base = tmp_path / "base.yaml"
    base.write_text(f"_base_: {TINY}\n{case.base}")
    exp = tmp_path / "exp.yaml"
    # the first line is the inheritance, so the mistake in case.yaml starts at line 2
    exp.write_text(f"_base_: base.yaml\n{textwrap.dedent(case.yaml)}")
    argv = ["--config", str(exp), "--dry-run", "--set", f"data.root={data}", "data.batch_size=8",
            "data.num_workers=0", f"output_dir={tmp_path / 'out'}", *case.sets]  # fmt: skip
    with unchanged(exp, base, faces[case.data + "_dir"]):
        outcome = call_main(train.main, argv, capsys)
    fragments = [f.format(exp=exp, base=base, data=data) for f in case.fragments]
    assert_refused(outcome, *fragments)
    assert outcome.code == 2
    assert not (tmp_path / "out").exists()
