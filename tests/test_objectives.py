"""Training objectives (``objectives/``): the registry, the choice ``objective.name: auto`` makes from the
keys configs already use, explicit names that contradict them, each objective's checkpoint state round
trip, and checkpoints written by train.py before objectives existed (tests/fixtures/checkpoint_v1), which
the current code resumes and trains on as the old code did, and evaluates."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import train
from core.checkpoint import load_checkpoint
from core.config import ConfigError, load_config
from data.decode import decode_face
from data.image_folder import ImageFolderFaces
from data.transforms import normalize_batch
from evaluation.embedders import load_embedder
from heads.partial_fc import PartialFC
from objectives import OBJECTIVES, Objective, TrainingData, build_objective, objective_class, objective_name
from objectives.classification import Classification
from objectives.metric import Metric
from objectives.probface import ProbFace
from tests.fixtures.checkpoint_v1 import tiny_backbone as fixture
from tests.synthetic_faces import write_identity_folder

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "cpu_tiny.yaml"
RECIPES = ROOT / "configs" / "recipes"
METRIC = ["head.name=none", "head.params={}", "loss.name=triplet", "data.sampler=pk"]
PROBFACE = ["head.name=none", "head.params={}", "loss.name=probface", "data.sampler=pk",
            "model.uncertainty=scalar"]  # fmt: skip


# ------------------------------------------------------------------------------------- registry, auto


def test_the_registry_holds_the_three_objectives_and_refuses_an_unknown_name():
    assert {"classification", "metric", "probface"} <= set(OBJECTIVES.names())
    assert OBJECTIVES.get("classification") is Classification and OBJECTIVES.get("metric") is Metric
    assert OBJECTIVES.get("probface") is ProbFace
    cfg = load_config(CONFIG, ["objective.name=clasification"])
    with pytest.raises(ConfigError) as err:
        objective_class(cfg)
    assert str(err.value).startswith("--set objective.name=clasification: objective.name: unknown objective")
    assert "did you mean 'classification'?" in str(err.value)


@pytest.mark.parametrize(
    ("config", "settings", "expected"),
    [
        (CONFIG, [], "classification"),
        (CONFIG, METRIC, "metric"),
        (CONFIG, PROBFACE, "probface"),
        (RECIPES / "arcface.yaml", [], "classification"),
        (RECIPES / "cd_stage2.yaml", [], "classification"),
        (RECIPES / "masked_triplet.yaml", [], "metric"),
        (RECIPES / "probface.yaml", [], "probface"),
    ],
)
def test_auto_trains_what_the_head_and_uncertainty_keys_meant(config, settings, expected):
    cfg = load_config(config, settings)
    assert cfg.objective.name == "auto"
    assert objective_name(cfg) == expected
    assert objective_name(load_config(config, [*settings, f"objective.name={expected}"])) == expected


@pytest.mark.parametrize(
    ("settings", "name", "implied"),
    [
        ([], "metric", "classification"),
        ([], "probface", "classification"),
        (METRIC, "classification", "metric"),
        (METRIC, "probface", "metric"),
        (PROBFACE, "metric", "probface"),
    ],
)
def test_an_explicit_name_that_contradicts_the_other_sections_is_refused_in_one_line(settings, name, implied):
    cfg = load_config(CONFIG, [*settings, f"objective.name={name}"])
    with pytest.raises(ConfigError) as err:
        objective_name(cfg)
    message = str(err.value)
    assert message.startswith(f"--set objective.name={name}: objective.name {name!r} does not fit head.name")
    assert f"which train the {implied!r} objective" in message and "\n" not in message


def test_objective_params_are_checked_against_the_constructor():
    cfg = load_config(CONFIG, ["objective.params.margin=0.2"])
    with pytest.raises(ConfigError, match=r"unknown key objective.params.margin: objective 'classification'"):
        objective_class(cfg)


def test_each_objective_refuses_settings_it_cannot_train_with():
    cases = [
        (["model.uncertainty=scalar"], "model.uncertainty (ProbFace) trains with head.name: none"),
        (["loss.name=triplet"], "loss.name 'triplet' is not a loss on the head's cross-entropy"),
        (["mining.cd_interval=5"], "mining.cd_interval needs mining.difficulty: true"),
        ([*METRIC, "mining.cd_interval=5"], "mining.cd_interval mines by a head's cosines"),
        ([*PROBFACE, "data.sampler=random"], "needs several images per identity in each batch"),
        ([*PROBFACE, "loss.name=triplet"], "loss.name probface and model.uncertainty"),
    ]
    for settings, message in cases:
        with pytest.raises(ConfigError, match=re.escape(message)):
            objective_class(load_config(CONFIG, settings))


# ------------------------------------------------------------------------------------ state round trip


def tiny_data(num_classes: int = 6, per_class: int = 4) -> TrainingData:
    labels = np.repeat(np.arange(num_classes), per_class)
    return TrainingData(
        labels=labels, num_classes=num_classes,
        indices_per_identity=lambda: {c: np.flatnonzero(labels == c) for c in range(num_classes)},
        load=lambda positions: torch.zeros(len(positions), 3, 32, 32, dtype=torch.uint8),
        network_input=lambda images: normalize_batch(images, "rgb", 16), device=torch.device("cpu"),
    )  # fmt: skip


def built(settings: list[str], seed: int) -> tuple[Objective, torch.nn.Module]:
    """The objective of cpu_tiny with ``settings`` on the fixtures' tiny backbone (16-d, 16x16 input)."""
    cfg = load_config(CONFIG, [*fixture.COMMON, *settings, f"experiment.seed={seed}"])
    torch.manual_seed(seed)
    backbone = fixture.TinyNet(embedding_size=16, input_size=16)
    return build_objective(cfg, backbone, tiny_data()), backbone


def test_a_classification_objective_saves_and_restores_its_checkpoint_state():
    a, backbone = built(["head.name=adaface", "head.params={}", "mining.difficulty=true"], seed=1)
    b, _ = built(["head.name=adaface", "head.params={}", "mining.difficulty=true"], seed=2)
    assert isinstance(a, Classification) and a.network(backbone) is backbone
    assert isinstance(a.parameter_modules()[0], PartialFC)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a state no initialisation gives
        a.classifier.head.weight.normal_(generator=generator)
        a.classifier.head.batch_mean.fill_(3.5)
        a.difficulty.scores.uniform_(-1, 1, generator=generator)
    state = a.state_dict()
    assert set(state) == {"head", "uncertainty", "difficulty"} and state["uncertainty"] is None
    assert not torch.equal(b.state_dict()["head"]["weight"], state["head"]["weight"])
    assert b.load_state_dict(state) == []
    for key, value in state["head"].items():
        assert torch.equal(b.state_dict()["head"][key], value), key
    assert torch.equal(b.difficulty.scores, state["difficulty"])
    assert a.meta() == {"num_classes": 6, "head": "adaface", "uncertainty": "none"}
    # a checkpoint without scores: they start afresh, and the resume line says so
    assert b.load_state_dict({**state, "difficulty": None}) == [
        "mining.difficulty (scores start at U(0, 1): the checkpoint has none)"
    ]


def test_the_classifiers_optimizer_state_round_trips_through_the_objective():
    a, backbone = built(["head.name=arcface"], seed=1)
    b, _ = built(["head.name=arcface"], seed=2)
    optimizers = [torch.optim.SGD([*backbone.parameters(), *o.classifier.parameters()], lr=0.1, momentum=0.9)
                  for o in (a, b)]  # fmt: skip
    embeddings, labels = torch.randn(6, 16, generator=torch.Generator().manual_seed(3)), torch.arange(6)
    a.classifier(embeddings, labels).backward()
    optimizers[0].step()
    state = a.optimizer_state_dict(optimizers[0])
    b.load_optimizer_state_dict(optimizers[1], state)
    index = len(list(backbone.parameters()))  # the centres come after the backbone's parameters
    momentum = optimizers[1].state_dict()["state"][index]["momentum_buffer"]
    assert torch.equal(momentum, state["state"][index]["momentum_buffer"]) and momentum.abs().sum() > 0


def test_a_probface_objective_saves_and_restores_its_uncertainty_module():
    a, backbone = built(PROBFACE, seed=1)
    b, _ = built(PROBFACE, seed=2)
    assert isinstance(a, ProbFace) and a.network(backbone).uncertainty is a.uncertainty
    state = a.state_dict()
    assert state["head"] == {} and state["difficulty"] is None
    assert not torch.equal(b.uncertainty.fc1.weight, a.uncertainty.fc1.weight)
    b.load_state_dict(state)
    for key, value in state["uncertainty"].items():
        assert torch.equal(b.uncertainty.state_dict()[key], value), key


def test_the_run_state_writes_and_reads_the_checkpoint_entries_it_always_had():
    state = train.TrainState(global_batch=32, seed=7, step=5, epoch=1, step_in_epoch=2, best=0.9,
                             skipped_steps=1, validation={"lfw": {"accuracy": 0.9}}, bad_steps=2)  # fmt: skip
    saved = state.state_dict()
    assert saved == {
        "step": 5, "epoch": 1, "validation": {"lfw": {"accuracy": 0.9}},
        "sampler": {"epoch": 1, "step_in_epoch": 2, "global_batch": 32, "seed": 7},
        "train": {"best": 0.9, "skipped_steps": 1},
    }  # fmt: skip
    restored = train.TrainState(global_batch=32, seed=7)
    restored.load_state_dict(saved)
    assert restored == train.TrainState(global_batch=32, seed=7, step=5, epoch=1, step_in_epoch=2, best=0.9,
                                        skipped_steps=1, validation={"lfw": {"accuracy": 0.9}})  # fmt: skip
    assert math.isinf(train.TrainState(1, 0).best)


# ------------------------------------------------------------------- checkpoints of the old format


@pytest.fixture(scope="module")
def fixture_faces(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("checkpoint_v1")
    return write_identity_folder(
        root / "faces", fixture.IDENTITIES, fixture.PER_IDENTITY, seed=fixture.DATA_SEED
    )


def trained(state: dict) -> dict[str, torch.Tensor]:
    """What a step changes: backbone, classifier and uncertainty parameters and BN statistics."""
    out = {f"backbone.{k}": v for k, v in state["backbone"].items()}
    out.update({f"head.{k}": v for k, v in state["head"].items()})
    out.update({f"uncertainty.{k}": v for k, v in (state["uncertainty"] or {}).items()})
    return {k: v.double() for k, v in out.items() if v.is_floating_point()}


@pytest.mark.parametrize("run_name", list(fixture.RUNS))
def test_a_checkpoint_of_the_old_format_resumes_and_trains_on_as_the_old_code_did(
    fixture_faces, tmp_path, run_name
):
    """The run resumed from the old code's step-a checkpoint with the same settings ends at step b where
    the old code's uninterrupted run ended: weights, classifier, uncertainty module, difficulty scores and
    optimizer state, compared relative to the size of the two steps' update (on the machine that made the
    fixture they agree bit for bit; other CPU kernels round differently)."""
    settings, resumed, later = fixture.RUNS[run_name]
    pretrained = fixture.HERE / "classification_step_5.pt"
    sets = [s.replace("{pretrained}", str(pretrained)) for s in settings]
    out = tmp_path / "run"
    argv = ["--config", str(CONFIG), "--set", f"data.root={fixture_faces}", f"output_dir={out}", *sets,
            "--resume", str(fixture.HERE / f"{run_name}_step_{resumed}.pt")]  # fmt: skip
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the fixture was made (with one thread the two codes agree bit for bit)
    try:
        with fixture.registered():
            assert train.main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    log = (out / "train.log").read_text()
    resumed_line = next(line for line in log.splitlines() if " resumed " in line)
    assert f"at epoch 0 step {resumed}; changed since the checkpoint" in resumed_line
    changed = resumed_line.split(f"applied from step {resumed}: ")[1]
    keys = {item.split(" ")[0] for item in changed.split(", ")}  # the paths only (the repository may move)
    assert "data.root" in keys and keys <= {"data.root", "model.pretrained"}, changed

    old, new = (load_checkpoint(p) for p in (fixture.HERE / f"{run_name}_step_{later}.pt", out / "last.pt"))
    start = trained(load_checkpoint(fixture.HERE / f"{run_name}_step_{resumed}.pt"))
    a, b = trained(old), trained(new)
    assert a.keys() == b.keys() == start.keys()
    update = max(float((a[k] - start[k]).abs().max()) for k in a)
    assert update > 0
    for key in a:
        assert float((a[key] - b[key]).abs().max()) <= 1e-4 * update, key
    assert new["step"] == old["step"] == later and new["sampler"] == old["sampler"]
    assert new["meta"] == old["meta"] and new.keys() == old.keys()
    if old["difficulty"] is not None:
        torch.testing.assert_close(new["difficulty"], old["difficulty"], rtol=0, atol=1e-5)
    for index, entry in old["optimizer"]["state"].items():
        for name, value in entry.items():
            scale = float(value.abs().max()) or 1.0
            torch.testing.assert_close(
                new["optimizer"]["state"][index][name], value, rtol=0, atol=1e-3 * scale
            )


def test_a_checkpoint_of_the_old_format_loads_in_an_evaluator_embedder(fixture_faces):
    path = fixture.HERE / "classification_step_5.pt"
    source = ImageFolderFaces(fixture_faces)
    images = torch.stack([torch.from_numpy(decode_face(source[i][0], 32).transpose(2, 0, 1).copy())
                          for i in range(6)])  # fmt: skip
    with fixture.registered():
        embedder = load_embedder(path)
        features = embedder(images)
    net = fixture.TinyNet(embedding_size=16, input_size=16).eval()
    net.load_state_dict(load_checkpoint(path)["backbone"])
    with torch.no_grad():
        expected = net(normalize_batch(images, "rgb", 16))
    assert features.shape == (6, 16)
    torch.testing.assert_close(features, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
