"""The evaluation layer: peer weights through the one embedder loader, the one feature cache (its old files
included), and the options every evaluator spells the same way (with the aliases users type)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_converters import AdaFaceIR18, randomize
from test_validation_tinyface import one_torch_thread  # noqa: F401 (fixture: small tensors, shared cores)

from backbones import build_backbone
from evaluation.cache import FeatureCache, read_features
from evaluation.embedders import load_embedder
from probface import ijb as probface_ijb
from probface import risk
from tests.conftest import assert_close_scaled
from validation_hq import evaluate as hq
from validation_hq import masked
from validation_ijb import evaluate as ijb
from validation_megaface import evaluate as megaface
from validation_tinyface import evaluate as tinyface

ROOT = Path(__file__).resolve().parent.parent


def faces(n: int, seed: int) -> torch.Tensor:
    return torch.randint(
        0, 256, (n, 3, 112, 112), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)
    )


# ------------------------------------------------------------------------------------------- embedders


def test_adaface_lightning_checkpoint_is_an_embedder_fed_bgr(tmp_path):
    """An AdaFace .ckpt goes through backbones.converters: our r18 fed BGR pixels gives the source IR-18's
    embedding of (BGR / 127.5 - 1). The bound is 1e-4 of the largest |value| (float32 sums over 25k-wide
    layers; measured 2e-7)."""
    source = randomize(AdaFaceIR18())
    torch.save({"state_dict": {**{f"model.{k}": v for k, v in source.state_dict().items()},
                               "head.kernel": torch.zeros(512, 10)}}, tmp_path / "adaface.ckpt")  # fmt: skip
    embed = load_embedder(tmp_path / "adaface.ckpt", backbone="r18")
    assert embed.color == "bgr"
    images = faces(2, 3)
    with torch.no_grad():
        expected = source(images.flip(1).float() / 127.5 - 1.0)
    assert_close_scaled(embed(images), expected, rtol=1e-4)
    with pytest.raises(ValueError, match=r"adaface\.ckpt: AdaFace weights hold 8 IR blocks .*'r34' has 16"):
        load_embedder(tmp_path / "adaface.ckpt", backbone="r34")


def test_insightface_state_dict_saved_from_ddp_loads(tmp_path):
    model = randomize(build_backbone("mbf"))
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, tmp_path / "model.pt")
    embed = load_embedder(tmp_path / "model.pt", backbone="mbf")
    assert embed.color == "rgb"
    images = faces(2, 4)
    with torch.no_grad():
        expected = model(images.float() / 127.5 - 1.0)
    assert_close_scaled(embed(images), expected, rtol=1e-4)


@pytest.mark.parametrize("order", ["saved", "reversed"])
@pytest.mark.parametrize("arch, size", [("mbf", 128), ("r18", 256), ("vit_xs", 64)])
def test_a_plain_state_dict_of_another_embedding_size_loads(tmp_path, arch, size, order):
    """A state dict's embedding size is read from the tensor that holds it in the named architecture (the
    last 1-D one: mbf's GDC BN, IResNet's features BN, the ViT's last BN), whatever the order of the file's
    keys; not from the first 1-D tensor of a ``features.`` module, which in mbf is the depthwise
    convolution's BN, 512 wide whatever the embedding size."""
    model = randomize(build_backbone(arch, embedding_size=size))
    items = list(model.state_dict().items())
    torch.save(dict(reversed(items) if order == "reversed" else items), tmp_path / "model.pt")
    embed = load_embedder(tmp_path / "model.pt", backbone=arch)
    images = faces(2, 5)
    with torch.no_grad():
        expected = model.eval()(images.float() / 127.5 - 1.0)
    assert expected.shape == (2, size)
    assert_close_scaled(embed(images), expected, rtol=1e-4)


# ----------------------------------------------------------------------------------------- feature cache


class Counting:
    """compute() for the cache that returns fixed features and counts its calls."""

    def __init__(self, rows: int, flip: bool = True) -> None:
        rng = np.random.default_rng(rows)
        self.original = rng.normal(size=(rows, 4)).astype(np.float32)
        self.flipped = rng.normal(size=(rows, 4)).astype(np.float32) if flip else None
        self.calls = 0

    def __call__(self):
        self.calls += 1
        return self.original, self.flipped


def test_an_entry_answers_the_same_request_and_only_that(tmp_path, capsys):
    cache = FeatureCache(tmp_path, "test")
    names = np.array(["a.jpg", "b.jpg", "c.jpg"])
    compute = Counting(3)
    first = cache.features("set__m", compute, 3, recorded={"files": names})
    again = cache.features("set__m", compute, 3, recorded={"files": names})
    assert compute.calls == 1 and all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    no_flip = cache.features("set__m", compute, 3, flip=False, recorded={"files": names})
    assert compute.calls == 1 and no_flip[1] is None and np.array_equal(no_flip[0], first[0])
    assert capsys.readouterr().err == ""
    other = np.array(["a.jpg", "b.jpg", "d.jpg"])
    cache.features("set__m", compute, 3, recorded={"files": other}, source="the other set")
    assert compute.calls == 2
    err = capsys.readouterr().err
    assert err.startswith("test: ") and "features of 3 other images than the 3 of the other set" in err
    assert "extracting afresh" in err


def test_entries_of_earlier_versions_are_read(tmp_path):
    """The .bin evaluator's files hold original and flipped only, TinyFace's also files and flip; both are
    read as they are (TinyFace's without flips only when no flips are asked for)."""
    rng = np.random.default_rng(5)
    original, flipped = rng.normal(size=(2, 4, 3)).astype(np.float32)
    np.savez(tmp_path / "lfw__m.npz", original=original, flipped=flipped)
    files = np.array(["p/1_1.jpg", "p/1_2.jpg", "g/1_3.jpg", "g/2_1.jpg"])
    np.savez(tmp_path / "tinyface__m.npz", files=files, flip=False, original=original,
             flipped=np.zeros((0,), np.float32))  # fmt: skip
    cache = FeatureCache(tmp_path)

    def unused():
        raise AssertionError("the stored entry should have answered")

    got = cache.features("lfw__m", unused, 4)
    assert np.array_equal(got[0], original) and np.array_equal(got[1], flipped)
    got = cache.features("tinyface__m", unused, 4, flip=False, recorded={"files": files})
    assert np.array_equal(got[0], original) and got[1] is None
    with pytest.raises(ValueError, match="holds no features of the flipped images"):
        read_features(tmp_path / "tinyface__m.npz", 4, True, {"files": files})
    with pytest.raises(ValueError, match=r"not a features file of this evaluator \(no landmarks\)"):
        read_features(tmp_path / "lfw__m.npz", 4, True, {"landmarks": np.zeros((4, 5, 2))})


def test_fused_entries_are_memory_mapped_and_reused_by_row_count(tmp_path):
    cache = FeatureCache(tmp_path)
    compute = Counting(5, flip=False)
    block = cache.fused("probes_x", lambda: compute()[0], 5)
    assert isinstance(block, np.memmap) and block.dtype == np.float32
    assert np.array_equal(cache.fused("probes_x", lambda: compute()[0], 5), compute.original)
    assert compute.calls == 1
    cache.fused("probes_x", lambda: compute()[0][:4], 4)  # another file list: computed again
    assert compute.calls == 2 and len(np.load(tmp_path / "probes_x.npy")) == 4


def test_without_a_folder_nothing_is_kept(tmp_path):
    compute = Counting(2)
    cache = FeatureCache(None)
    cache.features("x", compute, 2)
    cache.features("x", compute, 2)
    assert compute.calls == 2 and cache.path("x") is None


# ------------------------------------------------------------------------------------------------ options


MODEL = ["--model", "m.pt"]
FOLDER_ALIASES = [
    (hq.build_parser, ["--data-root", "--data_root", "--bin-dir"], []),
    (ijb.build_parser, ["--data-root", "--data_root", "--ijb-root", "--image-path"], []),
    (megaface.build_parser, ["--data-root", "--data_root", "--root"], []),
    (tinyface.build_parser, ["--data-root", "--data_root"], []),
]


@pytest.mark.parametrize(("build", "spellings", "extra"), FOLDER_ALIASES)
def test_every_evaluator_reads_the_benchmark_folder_under_each_spelling(build, spellings, extra):
    for spelling in spellings:
        assert build().parse_args([*MODEL, spelling, "D", *extra]).data_root == Path("D")


def test_shared_options_and_their_aliases():
    for build in (hq.build_parser, ijb.build_parser, megaface.build_parser, tinyface.build_parser):
        args = build().parse_args(["--model-prefix", "m.pt", "--network", "r100", "--data_root", "D",
                                   "--batch_size", "7", "--num_workers", "3", "--cache", "C"])  # fmt: skip
        assert (args.model, args.backbone, args.batch_size, args.workers) == (Path("m.pt"), "r100", 7, 3)
        assert args.cache == Path("C")
    for build in (hq.build_parser, megaface.build_parser, tinyface.build_parser):
        for given, fusion in (
            ("unit_mean", "unit_mean"),
            ("pre_norm_vector_add", "sum"),
            ("average", "unit_mean"),
        ):
            assert build().parse_args([*MODEL, "--data-root", "D", "--fusion_method", given]).fusion == fusion
    assert megaface.build_parser().parse_args([*MODEL, "--root", "D", "--features", "F"]).cache == Path("F")
    args = ijb.build_parser().parse_args(
        [*MODEL, "--ijb-root", "R", "--dataset_name", "IJBB", "--result-dir", "O"]
    )
    assert (args.dataset, args.out) == ("ijbb", Path("O"))
    assert hq.build_parser().parse_args([*MODEL, "--bin", "a.bin", "b.bin"]).bins == [
        Path("a.bin"),
        Path("b.bin"),
    ]
    args = probface_ijb.build_parser().parse_args(
        [*MODEL, "--ijb-root", "R", "--out", "w.npy", "--batch_size", "9"]
    )
    assert (args.data_root, args.batch_size) == (Path("R"), 9)


def test_bin_tools_take_both_spellings(tmp_path, capsys):
    """``validation_hq.masked`` and ``probface.risk`` document ``--bin`` and accept ``--bins``: a missing file
    is reported by name either way (the options were read)."""
    missing = tmp_path / "missing.bin"
    for main, named in ((masked.main, "missing.bin"), (risk.main, "m.pt")):
        for spelling in ("--bin", "--bins"):
            assert main(["--model", str(tmp_path / "m.pt"), spelling, str(missing)]) == 2
            assert named in capsys.readouterr().err


@pytest.mark.slow  # two interpreter starts, each importing torch and the backbones
def test_tinyface_file_runs_from_any_folder_without_pythonpath(tmp_path):
    """AdaFace's command runs the file from elsewhere with no PYTHONPATH; the file hands over to the module
    form rather than editing sys.path."""
    script = ROOT / "validation_tinyface" / "validate_tinyface.py"
    assert "sys.path" not in script.read_text(encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": ""}
    proc = subprocess.run([sys.executable, str(script), "--help"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "--data-root DIR" in proc.stdout and "--fusion" in proc.stdout
