"""The contracts between the parts, written down as code, hold for every part that exists:

* every registered backbone honours :class:`backbones.contract.Backbone` (constructor keyword arguments,
  ``embedding_size`` and ``input_size`` attributes, ``(N, D)`` embeddings, the flattened last map with
  ``return_features=True``), and a backbone that does not is refused when built, in one line naming what it
  lacks;
* every training dataset class satisfies :class:`data.transforms.FaceSource` (what the samplers, miners and
  ``train.py`` read);
* every loss is registered inside ``losses/``: ``list_losses()`` is the same whatever is imported first.
"""

from __future__ import annotations

import importlib
import inspect
import pickle
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import data
from backbones import BACKBONES, build_backbone, list_backbones, resface
from backbones.contract import CONSTRUCTOR_ARGS, Backbone, BackboneContractError, has_feature_output
from data.image_folder import ImageFolderFaces
from data.recordio import RecordIOFaceSet, pack_folder
from data.transforms import FaceSource, describe
from tests.conftest import ShapesOnly
from tests.synthetic_faces import write_identity_folder

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).parent / "fixtures" / "recordio"

# Backbones with more than 25 M parameters take seconds each to build and run on a CPU (vit_h: 606 M): they
# are built on the meta device and run on fake tensors (tests.conftest.ShapesOnly: shapes and dtypes, no
# values); the rest are built and run for real. Each family has a member in the real set (r18/r34, mbf,
# inception_resnet_v1, vit_t/vit_xs) and tests/test_backbones.py and tests/test_vit.py check the values.
# The count at embedding size 8 (the transformer blocks and convolutions do not depend on the input size).
HUGE = 25e6
INPUT_SIDES = (16, 32, 75, 112)  # the smallest side each backbone takes is the first that builds


def smallest(name: str, build=build_backbone) -> tuple[nn.Module, int]:
    """Backbone ``name`` built by ``build`` with every contract argument at its smallest valid input side."""
    for side in INPUT_SIDES:
        torch.manual_seed(0)
        try:
            model = build(
                name, embedding_size=8, dropout=0.0, precision="fp32", grad_checkpoint=False, input_size=side
            )
        except ValueError as err:
            if "input_size" in str(err):
                continue
            raise
        return model, side
    raise AssertionError(f"{name}: no input side of {INPUT_SIDES} builds")


def parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def check_contract(name: str) -> int:
    model, side = smallest(name)
    assert isinstance(model, Backbone) and isinstance(model, nn.Module)
    assert (model.embedding_size, model.input_size) == (8, side)
    x = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(1))
    model.train()  # batch statistics: a fresh network's running ones are arbitrary
    with torch.no_grad():
        embedding = model(x)
        assert embedding.shape == (2, 8) and embedding.dtype == torch.float32, (name, embedding.shape)
        assert torch.isfinite(embedding).all(), name
        if has_feature_output(model):
            torch.manual_seed(2)  # the same stochastic depth / patch masking in both passes
            again = model(x)
            torch.manual_seed(2)
            pair = model(x, return_features=True)
            assert isinstance(pair, tuple) and len(pair) == 2, name
            features = pair[1]
            assert features.ndim == 2 and features.shape[0] == 2 and features.dtype == torch.float32, name
            torch.testing.assert_close(pair[0], again, rtol=0, atol=0, msg=f"{name}: not the same pass")
    return parameters(model)


def check_contract_shapes(name: str) -> int:
    """:func:`check_contract` on fake tensors: the same attributes, shapes and dtypes, no values (so neither
    finiteness nor the equality of the two passes, which the real checks of each family's small member
    cover: the forward code is the family's, only the number or width of blocks differs)."""
    fake, side = smallest(name, ShapesOnly)
    model = fake.model
    assert isinstance(model, Backbone) and isinstance(model, nn.Module)
    assert (model.embedding_size, model.input_size) == (8, side)
    x = fake.input(2, side)
    model.train()
    with torch.no_grad():
        embedding = fake(x)
        assert embedding.shape == (2, 8) and embedding.dtype == torch.float32, (name, embedding.shape)
        if has_feature_output(model):
            pair = fake(x, return_features=True)
            assert isinstance(pair, tuple) and len(pair) == 2, name
            assert pair[0].shape == (2, 8) and pair[0].dtype == torch.float32, name
            features = pair[1]
            assert features.ndim == 2 and features.shape[0] == 2 and features.dtype == torch.float32, name
    return parameters(model)


# Over HUGE parameters at embedding size 8 (millions): r50 30.7, r100 52.3, r200 106.0, resface64 37.2,
# seresnext101_32x4d(_gem) 46.9, vit_s 38.2, vit_b 76.0, vit_l 170.8, vit_h 605.8 (each test checks its side).
LARGE_NAMES = {
    "r50", "r100", "r200", "resface64", "seresnext101_32x4d", "seresnext101_32x4d_gem", "vit_s",
    "vit_s_dp005_mask_0", "vit_b", "vit_b_dp005_mask_005", "vit_l", "vit_l_dp005_mask_005", "vit_h",
}  # fmt: skip
SMALL = [n for n in list_backbones() if n not in LARGE_NAMES]
LARGE = [n for n in list_backbones() if n in LARGE_NAMES]
# Inits that read values, which the meta device has not: resface64's truncated normal redraws out-of-range
# values (torch.nonzero). On the meta device there is nothing to draw, so it is skipped there; the real
# network's contract (the embedding and conv_final of one pass) is checked in tests/test_backbones_extra.py
# (test_resface64_conv_final_interface) and its init in test_resface64_from_the_config_at_96.
VALUE_INITS = {"resface64": (resface, "_truncated_normal_")}


@pytest.mark.parametrize("name", list_backbones())
def test_every_backbone_takes_the_contract_arguments_by_keyword(name):
    factory = BACKBONES.get(name)
    params = inspect.signature(factory).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        assert set(CONSTRUCTOR_ARGS) <= set(params), (name, list(params))
    # the factories that pass **kwargs on are held to it by building them with all five (below)


@pytest.mark.parametrize("name", SMALL)
def test_every_backbone_honours_the_contract(name):
    assert check_contract(name) <= HUGE, f"{name}: over {HUGE:.0f} parameters: add it to LARGE_NAMES"


@pytest.mark.parametrize("name", LARGE)
def test_every_large_backbone_honours_the_contract(name, monkeypatch):
    if name in VALUE_INITS:
        monkeypatch.setattr(*VALUE_INITS[name], lambda *args, **kwargs: None)
    count = check_contract_shapes(name)
    assert count > HUGE, f"{name}: not over {HUGE:.0f} parameters: take it out of LARGE_NAMES"


def test_the_shapes_only_contract_check_can_fail():
    """A network whose embedding has the wrong width is refused on fake tensors as it is for real."""
    name = f"contract_probe_{len(BACKBONES)}"

    class WrongWidth(_NoAttributes):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.embedding_size, self.input_size = kwargs["embedding_size"], kwargs["input_size"]
            self.fc = nn.Linear(3 * 16 * 16, kwargs["embedding_size"] + 1)

        def forward(self, x):
            return self.fc(x.flatten(1))

    BACKBONES.register(name)(WrongWidth)
    try:
        with pytest.raises(AssertionError, match=r"torch.Size\(\[2, 9\]\)"):
            check_contract_shapes(name)
    finally:
        BACKBONES._factories.pop(name)  # a probe, not a part


class _NoAttributes(nn.Module):
    def __init__(self, embedding_size=8, dropout=0.0, precision="fp32", grad_checkpoint=False, input_size=16):
        super().__init__()
        self.fc = nn.Linear(3, embedding_size)


def _no_grad_checkpoint(embedding_size=512, dropout=0.0, precision="fp32", input_size=112):
    raise AssertionError("not called: refused before it is built")


class _WrongSize(_NoAttributes):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.embedding_size, self.input_size = 512, kwargs["input_size"]


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        (_NoAttributes, r"has no attribute embedding_size or input_size; a backbone holds"),
        (_no_grad_checkpoint, r"does not take the keyword argument grad_checkpoint; every backbone is built"),
        (_WrongSize, r"was built with embedding_size=8 but holds embedding_size=512"),
        (lambda **kwargs: "not a module", r"built a str, not a torch.nn.Module"),
    ],
)
def test_a_backbone_that_breaks_the_contract_is_refused_when_built(factory, message):
    name = f"contract_probe_{len(BACKBONES)}"
    BACKBONES.register(name)(factory)
    try:
        with pytest.raises(BackboneContractError) as err:
            build_backbone(name, embedding_size=8, dropout=0.0, precision="fp32", grad_checkpoint=False,
                           input_size=16)  # fmt: skip
    finally:
        BACKBONES._factories.pop(name)  # a probe, not a part
    assert re.match(rf"backbone '{name}' \(\S*test_contracts\.\S+\) ", str(err.value)), err.value
    assert re.search(message, str(err.value)) and "\n" not in str(err.value), err.value


# ---------------------------------------------------------------------------------------- datasets


def dataset_classes() -> set[type]:
    """Every class of the ``data`` package that reads training faces (it offers ``indices_per_identity``)."""
    found = set()
    for module in pkgutil.walk_packages(data.__path__, "data."):
        if module.name.endswith("__main__"):
            continue
        for _, cls in inspect.getmembers(importlib.import_module(module.name), inspect.isclass):
            reads_faces = callable(getattr(cls, "indices_per_identity", None))
            if cls.__module__.startswith("data.") and reads_faces and cls is not FaceSource:
                found.add(cls)
    return found


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, FaceSource]:
    folder = write_identity_folder(tmp_path_factory.mktemp("faces"), identities=5, per_identity=3)
    packed = tmp_path_factory.mktemp("rec") / "train"
    pack_folder(folder, packed, image_size=32)
    return {
        "image folder": ImageFolderFaces(folder),
        "RecordIO packed here": RecordIOFaceSet(packed.with_suffix(".rec")),
        "RecordIO of insightface (mxnet)": RecordIOFaceSet(FIXTURES / "insightface.rec"),
        "RecordIO of im2rec (mxnet, no header)": RecordIOFaceSet(FIXTURES / "im2rec.rec"),
    }


def test_every_dataset_class_is_checked(sources):
    assert dataset_classes() == {type(s) for s in sources.values()}


@pytest.mark.parametrize(
    "kind",
    [
        "image folder",
        "RecordIO packed here",
        "RecordIO of insightface (mxnet)",
        "RecordIO of im2rec (mxnet, no header)",
    ],
)
def test_every_dataset_satisfies_the_face_source_protocol(sources, kind):
    source = sources[kind]
    assert isinstance(source, FaceSource)
    n, classes = source.num_images, source.num_identities
    assert len(source) == n > 0 and classes > 0
    labels = source.labels()
    assert isinstance(labels, np.ndarray) and labels.dtype == np.int64 and labels.shape == (n,)
    assert set(np.unique(labels).tolist()) == set(range(classes))
    groups = source.indices_per_identity()
    assert sorted(groups) == list(range(classes))
    for label, positions in groups.items():
        assert isinstance(positions, np.ndarray) and np.all(np.diff(positions) > 0)
        assert np.all(labels[positions] == label)
    assert np.array_equal(np.sort(np.concatenate(list(groups.values()))), np.arange(n))
    for i in (0, n - 1):
        image, label = source[i]
        assert isinstance(image, bytes) and image and label == labels[i]
        assert describe(source, i) != f"{type(source).__name__} item {i}"  # named by its file or key
    copy = pickle.loads(pickle.dumps(source))  # what a DataLoader worker receives
    assert copy[n - 1] == source[n - 1]


# ------------------------------------------------------------------------------------------- losses


def test_every_loss_is_registered_inside_losses_whatever_is_imported_first():
    # a fresh interpreter: in this one, other tests may have registered parts of their own
    program = (
        "import losses, heads, backbones\n"
        "first = (losses.list_losses(), heads.list_heads(), backbones.list_backbones())\n"
        "import train, probface.loss, probface.model, objectives, mining\n"
        "print(first == (losses.list_losses(), heads.list_heads(), backbones.list_backbones()))\n"
        "print(' '.join(f'{n}:{losses.LOSSES.get(n).__module__}' for n in first[0]))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", program], cwd=ROOT, capture_output=True, text=True, check=False, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    same, listed = proc.stdout.split("\n")[:2]
    assert same == "True", proc.stdout
    modules = dict(entry.split(":") for entry in listed.split())
    assert {"cross_entropy", "focal", "frabsm_weight", "triplet", "probface"} <= set(modules)
    assert all(module.startswith("losses.") for module in modules.values()), modules
