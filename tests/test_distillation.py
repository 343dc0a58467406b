"""The distillation objective (objectives/distillation.py, objectives/teacher.py; docs/methods.md §3.13):
each loss against a direct computation, the teacher-feature cache (written once, read without the teacher,
keyed by the teacher file, atomic), the flip lookup and the online teacher against the teacher run on the
epoch's own images, training through train.py with each kind of teacher, and an exact resume."""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import train
from backbones import build_backbone
from core.checkpoint import load_checkpoint
from core.config import ConfigError, load_config
from evaluation.embedders import TorchEmbedder, load_embedder
from objectives import objective_class
from objectives.distillation import Distillation, feature_loss, similarity_loss
from objectives.teacher import UnaugmentedImages, flipped_positions
from scripts.export_onnx import export
from tests.fixtures.checkpoint_v1 import tiny_backbone as fixture
from tests.synthetic_faces import write_identity_folder
from tests.test_converters import AdaFaceIR18, randomize

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "cpu_tiny.yaml"
STUDENT = (*fixture.COMMON, "data.val_targets=[]", "objective.name=distillation", "train.save_every=0")


# ----------------------------------------------------------------------------------------- formulas


def batch(n: int, d: int, seed: int) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 3


def test_the_feature_losses_are_the_formulas_written_out():
    s, t = batch(6, 5, 0), batch(6, 5, 1)
    cosine, l2 = 0.0, 0.0
    for i in range(6):
        dot = sum(float(s[i, k] * t[i, k]) for k in range(5))
        ns = math.sqrt(sum(float(s[i, k]) ** 2 for k in range(5)))
        nt = math.sqrt(sum(float(t[i, k]) ** 2 for k in range(5)))
        cosine += 1 - dot / (ns * nt)
        l2 += sum((float(s[i, k]) / ns - float(t[i, k]) / nt) ** 2 for k in range(5))
    assert float(feature_loss(s, t, "cosine")) == pytest.approx(cosine / 6, rel=1e-6)
    assert float(feature_loss(s, t, "l2")) == pytest.approx(l2 / 6, rel=1e-6)
    assert float(feature_loss(s, 2.5 * s, "cosine")) == pytest.approx(0.0, abs=1e-6)  # scale-free


def test_the_similarity_loss_is_the_off_diagonal_mse_of_the_cosine_matrices():
    s, t = batch(5, 7, 2), batch(5, 3, 3)  # the dimensions may differ: only the matrices are compared

    def cos(a: torch.Tensor, i: int, j: int) -> float:
        return float(a[i] @ a[j]) / (float(a[i].norm()) * float(a[j].norm()))

    pairs = [(i, j) for i in range(5) for j in range(5) if i != j]
    expected = sum((cos(s, i, j) - cos(t, i, j)) ** 2 for i, j in pairs) / len(pairs)
    assert float(similarity_loss(s, t)) == pytest.approx(expected, rel=1e-6)
    assert float(similarity_loss(s, 4 * s)) == pytest.approx(0.0, abs=1e-6)


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def faces(tmp_path_factory) -> Path:
    return write_identity_folder(tmp_path_factory.mktemp("distill") / "faces", 6, 4, seed=3)


def tiny_net(dim: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return fixture.TinyNet(embedding_size=dim, input_size=16).eval()


def onnx_teacher(path: Path, dim: int = 24, seed: int = 0) -> Path:
    export(TorchEmbedder(tiny_net(dim, seed)), path, fold=False)
    return path


def settings(faces: Path, out: Path, teacher: Path, *more: str, params: str = "") -> list[str]:
    teacher_params = f"{{teacher: {teacher}, cache_dir: {out.parent / 'cache'}{params}}}"
    return [f"data.root={faces}", f"output_dir={out}", *STUDENT, f"objective.params={teacher_params}", *more]


@contextlib.contextmanager
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def fit(sets: list[str]) -> train.Run:
    with fixture.registered():
        return train.fit(load_config(CONFIG, sets), device=torch.device("cpu"))


# ------------------------------------------------------------------------------------------ the cache


def test_the_cache_is_written_once_and_read_again_without_the_teacher(faces, tmp_path):
    teacher = onnx_teacher(tmp_path / "t.onnx")
    first = fit(settings(faces, tmp_path / "a", teacher, "train.max_steps=4"))
    calls = first.objective.teacher.calls
    assert calls == 2  # 24 images in one batch of 128, and their flips: nothing more over 2 epochs
    log = (tmp_path / "a" / "train.log").read_text()
    assert "(cache: data.augment flips at most" in log
    cached = first.objective.teacher.cache_file
    assert cached.is_file() and cached.parent == tmp_path / "cache"
    assert not [p for p in cached.parent.iterdir() if p.name.endswith(".tmp")]
    # the entry holds the teacher's features of the stored images and of their flips
    embed = load_embedder(teacher)
    stored = UnaugmentedImages(first.dataset.source, 32)
    images = torch.stack([stored[i] for i in range(24)])
    torch.testing.assert_close(first.objective.teacher.original, embed(images), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(first.objective.teacher.flipped, embed(images.flip(3)), rtol=1e-5, atol=1e-5)
    second = fit(settings(faces, tmp_path / "b", teacher, "train.max_steps=1"))
    assert second.objective.teacher.calls == 0
    torch.testing.assert_close(second.objective.teacher.original, first.objective.teacher.original)
    # the teacher file rewritten (other weights): its old features are not read
    onnx_teacher(teacher, seed=5)
    os.utime(teacher, ns=(cached.stat().st_mtime_ns + 10**9,) * 2)
    third = fit(settings(faces, tmp_path / "c", teacher, "train.max_steps=1"))
    assert third.objective.teacher.calls == 2 and third.objective.teacher.cache_file != cached
    assert float((third.objective.teacher.original - first.objective.teacher.original).abs().max()) > 1e-3


def test_an_interrupted_cache_write_leaves_no_entry(faces, tmp_path, monkeypatch):
    teacher = onnx_teacher(tmp_path / "t.onnx")

    def broken(fh, **arrays):
        fh.write(b"PK partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez", broken)
    with pytest.raises(OSError):
        fit(settings(faces, tmp_path / "a", teacher, "train.max_steps=1"))
    assert not list((tmp_path / "cache").iterdir())


def test_cached_features_follow_the_epochs_flips_and_online_features_the_augmented_images(faces, tmp_path):
    """The feature a batch gets is the teacher's of exactly the image the loop trained on: the flipped
    row where the epoch's transform flipped it (cache), the augmented image itself (online)."""
    teacher = onnx_teacher(tmp_path / "t.onnx")
    embed = load_embedder(teacher)
    run = fit(settings(faces, tmp_path / "a", teacher, "train.max_steps=1"))
    indices = torch.arange(24)
    for epoch in (0, 1, 2):
        run.state.epoch = epoch
        images = torch.stack([run.dataset[(epoch, i)][0] for i in range(24)])
        torch.testing.assert_close(
            run.objective.teacher.features(indices), embed(images), rtol=1e-5, atol=1e-5
        )
    flips = flipped_positions(run.cfg.data.augment, run.cfg.experiment.seed, 0, np.arange(24))
    assert 0 < flips.sum() < 24
    online = fit(
        settings(faces, tmp_path / "b", teacher, "train.max_steps=1", "data.augment.photometric=0.5")
    )
    assert "(online: data.augment changes pixels (photometric)" in (tmp_path / "b" / "train.log").read_text()
    online.state.epoch = 1
    images = torch.stack([online.dataset[(1, i)][0] for i in range(24)])
    torch.testing.assert_close(
        online.objective.teacher.features(indices), embed(images), rtol=1e-5, atol=1e-5
    )


# -------------------------------------------------------------------------- the loss of a micro-batch


def test_the_objectives_loss_is_the_weighted_sum_with_the_learned_projection(faces, tmp_path):
    teacher = onnx_teacher(tmp_path / "t.onnx", dim=24)
    params = ", feature_loss: l2, feature_weight: 2.0, similarity_weight: 3.0, classification_weight: 0.5"
    run = fit(settings(faces, tmp_path / "a", teacher, "train.max_steps=1", params=params))
    objective = run.objective
    assert isinstance(objective, Distillation) and objective.projection.weight.shape == (24, 16)
    indices, labels = torch.tensor([0, 5, 9, 17]), torch.tensor([0, 1, 2, 4])
    s = torch.randn(4, 16, generator=torch.Generator().manual_seed(0))
    t = objective.teacher.features(indices)
    torch.manual_seed(1)
    total, _ = objective.loss(s, labels, indices)
    torch.manual_seed(1)
    cls, _ = objective.classification.loss(s, labels, indices)
    p = s @ objective.projection.weight.T
    expected = 0.5 * cls + 2.0 * feature_loss(p, t, "l2") + 3.0 * similarity_loss(s, t)
    torch.testing.assert_close(total, expected, rtol=1e-6, atol=1e-6)
    assert set(objective.log_scalars()) >= {"distill/feature", "distill/similarity", "distill/classification"}


# ------------------------------------------------------------------- teachers of every kind, resume


def checkpoint_teacher(path: Path) -> Path:
    return fixture.HERE / "classification_step_5.pt"  # a tiny run of this framework (fixture_tiny, 16-d)


def insightface_teacher(path: Path) -> Path:
    model = randomize(build_backbone("mbf"))
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, path / "model.pt")
    return path / "model.pt"


def adaface_teacher(path: Path) -> Path:
    source = randomize(AdaFaceIR18())
    ckpt = {"state_dict": {**{f"model.{k}": v for k, v in source.state_dict().items()},
                           "head.kernel": torch.zeros(512, 10)}, "epoch": 3}  # fmt: skip
    torch.save(ckpt, path / "adaface.ckpt")
    return path / "adaface.ckpt"


@pytest.mark.parametrize(
    ("kind", "make", "params", "dim"),
    [
        ("onnx", lambda p: onnx_teacher(p / "t.onnx", dim=24), "", 24),
        ("checkpoint", checkpoint_teacher, "", 16),
        ("insightface", insightface_teacher, ", teacher_backbone: mbf", 512),
        pytest.param(
            "adaface", adaface_teacher, ", teacher_backbone: r18", 512, marks=pytest.mark.slow
        ),  # an IResNet-18 teacher at 112x112: about 10 s on two cores
    ],
)
def test_train_py_distils_from_every_kind_of_teacher(faces, tmp_path, kind, make, params, dim):
    teacher = make(tmp_path)
    out = tmp_path / "run"
    no_head = ("head.name=none", "head.params={}")
    sets = settings(faces, out, teacher, "train.max_steps=3", *no_head, params=params)
    argv = ["--config", str(CONFIG), "--set", *sets]
    with fixture.registered():
        assert train.main(argv) == 0, kind
    state = load_checkpoint(out / "last.pt")
    projection = state["distillation"]["projection"]
    if dim == 16:
        assert projection is None  # the same dimension as the student: no projection
    else:
        assert projection["weight"].shape == (dim, 16)
    assert state["head"] == {} and state["meta"]["objective"] == "distillation"
    assert f"distillation from {teacher.name}" in (out / "train.log").read_text()


def test_a_resumed_distillation_run_ends_where_the_uninterrupted_run_ended(faces, tmp_path):
    teacher = onnx_teacher(tmp_path / "t.onnx")
    common = ["train.max_steps=5", "train.save_every=3", "head.sample_rate=0.5", "mining.difficulty=true"]
    params = ", similarity_weight: 1.0"
    with one_thread():
        fit(settings(faces, tmp_path / "a", teacher, *common, params=params))
        cfg = load_config(CONFIG, settings(faces, tmp_path / "b", teacher, *common, params=params))
        with fixture.registered():
            train.fit(cfg, str(tmp_path / "a" / "step_3.pt"), device=torch.device("cpu"))
    a, b = load_checkpoint(tmp_path / "a" / "last.pt"), load_checkpoint(tmp_path / "b" / "last.pt")
    start = load_checkpoint(tmp_path / "a" / "step_3.pt")
    assert a["step"] == b["step"] == 5
    for entry in ("backbone", "head"):
        for key, value in a[entry].items():
            if value.is_floating_point():
                update = float((value - start[entry][key]).abs().max()) or 1.0
                assert float((value - b[entry][key]).abs().max()) <= 1e-4 * update, (entry, key)
    torch.testing.assert_close(
        a["distillation"]["projection"]["weight"], b["distillation"]["projection"]["weight"]
    )
    assert not torch.equal(
        a["distillation"]["projection"]["weight"], start["distillation"]["projection"]["weight"]
    )
    torch.testing.assert_close(a["difficulty"], b["difficulty"])


# --------------------------------------------------------------------------------------- the config


@pytest.mark.parametrize(
    ("params", "words"),
    [
        ("{}", "objective.params.teacher: the distillation objective needs a teacher model file"),
        ("{teacher: /no/such.onnx}", "objective.params.teacher /no/such.onnx: no such file"),
        (
            "{teacher: TEACHER, feature_loss: l1}",
            "objective.params.feature_loss 'l1' is not one of cosine, l2",
        ),
        (
            "{teacher: TEACHER, teacher_mode: sometimes}",
            "objective.params.teacher_mode 'sometimes' is not one",
        ),
        ("{teacher: TEACHER, feature_weight: -1.0}", "objective.params.feature_weight must be >= 0"),
        ("{teacher: TEACHER, temperature: 2.0}", "objective.params.temperature"),
    ],
)
def test_bad_distillation_settings_are_one_line(tmp_path, params, words):
    teacher = tmp_path / "t.onnx"
    teacher.write_bytes(b"x")
    sets = ["objective.name=distillation", f"objective.params={params.replace('TEACHER', str(teacher))}"]
    with pytest.raises(ConfigError) as err:
        objective_class(load_config(CONFIG, sets))
    assert words in str(err.value) and "\n" not in str(err.value)


def test_the_cpu_recipe_names_the_shared_teacher_and_caches():
    cfg = load_config(ROOT / "configs" / "distill_cpu.yaml")
    assert cfg.objective.name == "distillation" and cfg.head.name == "arcface"
    assert cfg.objective.params["teacher"].endswith("mobilefacenet_paddle_128d.onnx")
    assert cfg.data.augment.crop == cfg.data.augment.photometric == 0  # the cached teacher applies
