"""User code without forking: the parts README_TRAIN.md shows (section 8), written exactly as shown to a
folder outside the repository, named by ``custom_imports`` in a YAML file and trained through ``train.py``;
and what ``custom_imports`` refuses, each in one line naming the key, the file and the reason."""

from __future__ import annotations

import math
import re
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import train
from backbones import BACKBONES, build_backbone
from core.checkpoint import load_checkpoint
from core.config import ConfigError, dump_config, load_config
from core.plugins import import_checkpoint_imports
from core.registry import forget_names_since, registered_names
from data.decode import decode_face
from data.image_folder import ImageFolderFaces
from data.transforms import normalize_batch
from heads.registry import HEADS
from losses import LOSSES
from tests.conftest import assert_close_scaled
from tests.synthetic_faces import write_identity_folder

ROOT = Path(__file__).resolve().parent.parent
SECTION = "## 8. Your own code: backbones, heads, losses and objectives"
FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
PARTS = ("my_backbone.py", "my_head.py", "my_loss.py")


def documented_files() -> dict[str, str]:
    """The ```python blocks of the README_TRAIN section, by the file name their first line gives."""
    text = (ROOT / "README_TRAIN.md").read_text(encoding="utf-8")
    assert SECTION in text, f"README_TRAIN.md has no section {SECTION!r}"
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    files = {}
    for block in FENCE.findall(section):
        first, _, _ = block.partition("\n")
        name = re.fullmatch(r"# (\w+\.py)", first.strip())
        assert name, f"a python block of {SECTION!r} does not start with '# FILE.py': {first!r}"
        files[name.group(1)] = block
    return files


@pytest.fixture(scope="module")
def user_dir(tmp_path_factory) -> Path:
    """The documented files, byte for byte, in a folder outside the repository (imported once per process:
    every test of this module uses this one folder)."""
    folder = tmp_path_factory.mktemp("my_parts")
    assert ROOT not in folder.resolve().parents
    files = documented_files()
    assert set(PARTS) <= set(files), sorted(files)
    for name, code in files.items():
        (folder / name).write_text(code, encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def faces(tmp_path_factory) -> Path:
    return write_identity_folder(tmp_path_factory.mktemp("faces"), identities=8, per_identity=4)


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def experiment(user_dir: Path, name: str = "my_experiment.yaml", **extra: object) -> Path:
    """A YAML file beside the parts naming them by relative path, as README_TRAIN shows."""
    return write_yaml(
        user_dir / name,
        {
            "_base_": str(ROOT / "configs" / "cpu_tiny.yaml"),
            "custom_imports": list(PARTS),
            # one batch is the whole set (32 images), unaugmented, so the test can recompute it
            "data": {"image_size": 32, "batch_size": 32, "num_workers": 0, "augment": {"flip": 0.0}},
            "model": {"backbone": "tiny_cnn", "embedding_size": 16},
            "head": {"name": "li_arcface", "params": {"s": 16.0, "m": 0.45}},
            "loss": {"name": "poly1", "params": {"epsilon": 2.0}},
            "schedule": {"warmup_epochs": 0.0},
            # a learning rate too small to move the weights: the checkpoint holds those of the logged step
            "optim": {"lr": 1e-9},
            "train": {"epochs": 1, "max_steps": 1, "log_every": 1, "val_every": 0, "save_every": 0},
            **extra,
        },
    )


@pytest.fixture(scope="module")
def trained(user_dir, faces, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "out"
    status = train.main(
        ["--config", str(experiment(user_dir)), "--set", f"data.root={faces}", f"output_dir={out}"]
    )
    assert status == 0, (out / "train.log").read_text() if (out / "train.log").exists() else ""
    return out


def test_the_documented_parts_train_through_train_py(trained, faces):
    state = load_checkpoint(trained / "last.pt")
    assert state["meta"]["arch"] == "tiny_cnn"
    assert state["config"]["head"]["name"] == "li_arcface" and state["config"]["loss"]["name"] == "poly1"
    events = EventAccumulator(str(trained / "tensorboard"))
    events.Reload()
    (logged,) = [e.value for e in events.Scalars("train/loss") if e.step == 1]

    # the step-1 loss, recomputed from the checkpoint with the formulas the docs state: the user's backbone
    # (train mode: BN on the batch), Li-ArcFace logits s (1 - 2 theta / pi) with theta_y + m for the target,
    # Poly-1 mean(CE + epsilon (1 - exp(-CE)))
    source = ImageFolderFaces(faces)
    images = torch.stack(
        [
            torch.from_numpy(decode_face(source[i][0], 32).transpose(2, 0, 1).copy())
            for i in range(len(source))
        ]
    )
    labels = torch.as_tensor(source.labels(), dtype=torch.int64)
    backbone = build_backbone("tiny_cnn", embedding_size=16, input_size=32)
    assert type(backbone).__module__.startswith("_custom_import_my_backbone")
    backbone.load_state_dict(state["backbone"])
    with torch.no_grad():
        embeddings = backbone.train()(normalize_batch(images)).double()
    centres = state["head"]["weight"].double()
    cos = (F.normalize(embeddings, dim=1) @ F.normalize(centres, dim=1).T).clamp(-1 + 1e-7, 1 - 1e-7)
    theta = torch.acos(cos)
    theta = theta + 0.45 * F.one_hot(labels, centres.shape[0])
    ce = F.cross_entropy(16.0 * (1.0 - 2.0 * theta / math.pi), labels, reduction="none")
    expected = float((ce + 2.0 * (1.0 - torch.exp(-ce))).mean())
    plain_ce = float(ce.mean())
    # float32 training vs this float64 recomputation (sums in another order): measured 4.5e-7 apart
    assert logged == pytest.approx(expected, rel=1e-4), (logged, expected)
    assert abs(expected - plain_ce) > 100 * 1e-4 * expected  # the loss is not the plain cross-entropy


def test_a_checkpoint_imports_its_custom_imports_to_build_its_backbone(trained, user_dir, tmp_path):
    # A second copy of the documented backbone under a name of its own, named only by the checkpoint's
    # config: building the checkpoint's backbone must import it first.
    code = (user_dir / "my_backbone.py").read_text().replace('"tiny_cnn"', '"tiny_cnn_ckpt"')
    (tmp_path / "ckpt_backbone.py").write_text(code)
    state = load_checkpoint(trained / "last.pt")
    state["config"]["custom_imports"] = {"imports": [str(tmp_path / "ckpt_backbone.py")]}
    state["meta"]["arch"] = "tiny_cnn_ckpt"
    torch.save(state, tmp_path / "moved.pt")
    assert "tiny_cnn_ckpt" not in BACKBONES
    from evaluation.embedders import load_embedder

    embedder = load_embedder(tmp_path / "moved.pt")
    assert "tiny_cnn_ckpt" in BACKBONES
    reference = build_backbone("tiny_cnn", embedding_size=16, input_size=32)
    reference.load_state_dict(state["backbone"])
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference.eval()(normalize_batch(x))
    # the same weights: the embedder folds BatchNorm into the convolutions, which moves float32 rounding only
    assert_close_scaled(embedder(x), expected, rtol=1e-5)
    # a checkpoint whose custom_imports are gone warns, naming it, and still imports nothing else
    with pytest.warns(UserWarning, match=r"gone\.pt: custom_imports: .*missing\.py: no such file"):
        assert import_checkpoint_imports({"custom_imports": [str(tmp_path / "missing.py")]}, "gone.pt") == []


def test_each_file_is_imported_once_per_process(user_dir, tmp_path):
    cfg = load_config(experiment(user_dir))
    again = load_config(experiment(user_dir, "again.yaml"))  # a second config naming the same files
    assert cfg.custom_imports.imports == again.custom_imports.imports
    assert cfg.custom_imports.imports == [str(user_dir / name) for name in PARTS]
    # the same file reached through a link to its folder is the same file (keyed by its resolved path)
    (tmp_path / "link").symlink_to(user_dir, target_is_directory=True)
    other = write_yaml(
        tmp_path / "x.yaml", {"custom_imports": ["link/my_loss.py", "link/../link/my_loss.py"]}
    )
    assert load_config(other).custom_imports.imports == [str(tmp_path / "link" / "my_loss.py")] * 2
    loaded = [m for m in sys.modules if m.startswith("_custom_import_my_loss_")]
    assert len(loaded) == 1, loaded
    assert "tiny_cnn" in BACKBONES and "li_arcface" in HEADS and "poly1" in LOSSES


def test_paths_are_relative_to_the_file_naming_them_and_kept_absolute(user_dir, tmp_path, monkeypatch):
    base_dir = tmp_path / "bases"
    base_dir.mkdir()
    (base_dir / "part.py").write_text("VALUE = 1\n")
    write_yaml(base_dir / "base.yaml", {"custom_imports": ["part.py"]})
    child = write_yaml(tmp_path / "child.yaml", {"_base_": "bases/base.yaml", "output_dir": "x"})
    cfg = load_config(child)
    assert cfg.custom_imports.imports == [str(base_dir / "part.py")]  # the base's folder, not the child's
    dump_config(cfg, tmp_path / "elsewhere" / "config.yaml")
    assert load_config(tmp_path / "elsewhere" / "config.yaml") == cfg  # written absolute: reads back the same
    # --set: relative to the working directory, in either form
    monkeypatch.chdir(user_dir)
    for setting in ("custom_imports=[my_loss.py]", "custom_imports.imports=[my_loss.py]"):
        cfg = load_config(child, [setting])
        assert cfg.custom_imports.imports == [str(user_dir / "my_loss.py")], setting
    mapping = load_config(child, ["custom_imports={imports: [json], allow_failed_imports: true}"])
    assert mapping.custom_imports.imports == ["json"] and mapping.custom_imports.allow_failed_imports


REFUSALS = {
    # file name -> (its code, what the one error line says after the file)
    "missing.py": (None, r"missing\.py: no such file"),
    "broken.py": ("x = 1\n\ndef f(:\n    pass\n", r"broken\.py line 3: SyntaxError: "),
    "needs.py": ("import os\nimport not_a_module_anywhere\n", r"needs\.py line 2: ModuleNotFoundError: "),
    "raises.py": (
        "A = 1\nraise RuntimeError('no GPU here')\n",
        r"raises\.py line 2: RuntimeError: no GPU here",
    ),
    "clash.py": (
        "from torch import nn\n\nfrom backbones import BACKBONES\n\n\n@BACKBONES.register('r50')\n"
        "class Mine(nn.Module):\n    pass\n",
        r"clash\.py line 6: backbone 'r50' is already registered \(by backbones\.iresnet\.iresnet50\); "
        "register yours under another name",
    ),
}


@pytest.mark.parametrize("name", sorted(REFUSALS))
def test_a_file_that_does_not_import_is_one_line_naming_the_key_file_and_reason(name, tmp_path, capsys):
    code, reason = REFUSALS[name]
    if code is not None:
        (tmp_path / name).write_text(code)
    config = write_yaml(
        tmp_path / "exp.yaml", {"output_dir": str(tmp_path / "out"), "custom_imports": [name]}
    )
    status = train.main(["--config", str(config), "--dry-run"])
    err = capsys.readouterr().err.strip()
    assert status == 2 and "\n" not in err and "Traceback" not in err, err
    where = re.escape(f"{config} line 2: custom_imports: {tmp_path}/")
    assert re.fullmatch(f"train.py: {where}{reason}.*", err), err
    assert not (tmp_path / "out").exists()
    # the mapping form with allow_failed_imports warns with the same line and goes on
    loose = write_yaml(
        tmp_path / "loose.yaml", {"custom_imports": {"imports": [name], "allow_failed_imports": True}}
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_config(loose)
    assert [re.search(reason, str(w.message)) is not None for w in caught] == [True], caught


HALFWAY = """from torch import nn

import halfway_helper  # noqa: F401 (a module of the user's that imports, and registers a name)
from backbones import BACKBONES
from heads import HEADS


@BACKBONES.register("halfway_net")
class HalfwayNet(nn.Module):
    pass


@HEADS.register("halfway_head")
class HalfwayHead(nn.Module):
    pass

{ending}
"""

HALFWAY_HELPER = """from torch import nn

from losses import LOSSES


@LOSSES.register("halfway_helper_loss")
class HelperLoss(nn.Module):
    pass
"""


@pytest.fixture
def forget_test_names():
    """Names registered during the test are forgotten after it (other tests list every registered part)."""
    before = registered_names()
    yield
    forget_names_since(before)


def test_a_file_that_fails_part_way_leaves_none_of_its_names(tmp_path, monkeypatch, forget_test_names):
    """The names a file registered before failing are forgotten: the one-line error, and then, with the
    file mended, the same config imports it and both names are the mended file's. A module the file
    imported, which did import, keeps its name: it stays imported and would not register it again."""
    (tmp_path / "halfway_helper.py").write_text(HALFWAY_HELPER)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "halfway_helper", raising=False)
    source = tmp_path / "halfway.py"
    source.write_text(HALFWAY.format(ending="raise RuntimeError('not finished')"))
    config = write_yaml(tmp_path / "exp.yaml", {"custom_imports": ["halfway.py"]})
    with pytest.raises(ConfigError, match=r"halfway\.py line 17: RuntimeError: not finished"):
        load_config(config)
    assert "halfway_net" not in BACKBONES and "halfway_head" not in HEADS
    assert LOSSES.get("halfway_helper_loss").__module__ == "halfway_helper"
    source.write_text(HALFWAY.format(ending=""))
    load_config(config)
    assert BACKBONES.get("halfway_net").__module__ == HEADS.get("halfway_head").__module__
    assert BACKBONES.get("halfway_net").__module__.startswith("_custom_import_halfway_")
    monkeypatch.delitem(sys.modules, "halfway_helper")


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("custom_imports=3", "custom_imports must be a list of .py files or module names, or a mapping"),
        (
            "custom_imports=[no_such_module_xyz]",
            "no_such_module_xyz: no module of that name on the Python path",
        ),
        ("custom_imports=[.]", "a folder; name a .py file, or the package by its module name"),
        ("custom_imports.imports=[1]", "custom_imports.imports[0] must be a string"),
    ],
)
def test_set_mistakes_are_blamed_on_the_argument(setting, message):
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "configs" / "cpu_tiny.yaml", [setting])
    assert str(err.value).startswith(f"--set {setting}: "), err.value
    assert message in str(err.value)


def test_the_documented_objective_trains_through_train_py(user_dir, faces, tmp_path):
    """my_objective.py of README_TRAIN, named by ``custom_imports`` and chosen by ``objective.name``: the
    step-1 loss train.py logs is the supervised contrastive loss of the docs, recomputed here (float64, one
    image at a time) from the checkpoint's backbone on the batch, which is all 32 images (8 identities x
    4 images per PK batch)."""
    config = write_yaml(
        user_dir / "my_objective.yaml",
        {
            "_base_": str(ROOT / "configs" / "cpu_tiny.yaml"),
            "custom_imports": ["my_backbone.py", "my_objective.py"],
            "objective": {"name": "supcon", "params": {"temperature": 0.2}},
            "head": {"name": "none"},
            "data": {"image_size": 32, "batch_size": 32, "num_workers": 0, "sampler": "pk", "pk_k": 4,
                     "augment": {"flip": 0.0}},
            "model": {"backbone": "tiny_cnn", "embedding_size": 16},
            "schedule": {"warmup_epochs": 0.0},
            "optim": {"lr": 1e-9},  # the checkpoint holds the weights of the logged step
            "train": {"epochs": 1, "max_steps": 1, "log_every": 1, "val_every": 0, "save_every": 0},
        },
    )  # fmt: skip
    out = tmp_path / "out"
    assert train.main(["--config", str(config), "--set", f"data.root={faces}", f"output_dir={out}"]) == 0
    log = (out / "train.log").read_text()
    assert "tiny_cnn + supcon (temperature 0.2): 32 images, 8 classes" in log
    state = load_checkpoint(out / "last.pt")
    assert state["config"]["objective"] == {"name": "supcon", "params": {"temperature": 0.2}}
    assert state["head"] == {} and state["meta"]["head"] == "none"
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    (logged,) = [e.value for e in events.Scalars("train/loss") if e.step == 1]
    (positives,) = [e.value for e in events.Scalars("loss/positives_per_image") if e.step == 1]
    assert positives == 3.0  # each image's 3 others of its identity

    source = ImageFolderFaces(faces)
    images = torch.stack(
        [torch.from_numpy(decode_face(source[i][0], 32).transpose(2, 0, 1).copy()) for i in range(32)]
    )
    labels = source.labels()
    backbone = build_backbone("tiny_cnn", embedding_size=16, input_size=32)
    backbone.load_state_dict(state["backbone"])
    with torch.no_grad():
        z = F.normalize(backbone.train()(normalize_batch(images)).double(), dim=1)
    terms = []
    for i in range(len(z)):
        others = [j for j in range(len(z)) if j != i]
        log_norm = torch.logsumexp(torch.stack([z[i] @ z[j] / 0.2 for j in others]), 0)
        positive = [float(z[i] @ z[p] / 0.2 - log_norm) for p in others if labels[p] == labels[i]]
        terms.append(-sum(positive) / len(positive))
    expected = sum(terms) / len(terms)
    # float32 training vs this float64 recomputation (sums in another order)
    assert logged == pytest.approx(expected, rel=1e-4), (logged, expected)
    # its check_config refuses what it cannot train with, before the data is read
    with pytest.raises(
        ConfigError, match=r"^--set data.sampler=random: supcon needs several images per identity"
    ):
        train.check_settings(load_config(config, ["data.sampler=random"]))
