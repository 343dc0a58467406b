"""validation_hq.evaluate: the command, its table and JSON, and results that do not depend on batch size."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data.verification import read_bin_raw, write_bin
from evaluation.embedders import load_embedder
from evaluation.verification import evaluate_pairs, fuse_flip
from validation_hq import evaluate


@pytest.fixture(scope="module")
def small_bin(shared_data, tmp_path_factory):
    """The first 60 LFW pairs (30 same-person, 30 different) as their own .bin."""
    images, issame = read_bin_raw(shared_data / "lfw_yunet112.bin")
    keep = np.r_[0:30, 300:330]
    path = tmp_path_factory.mktemp("bins") / "lfw.bin"
    write_bin(path, [images[j] for k in keep for j in (2 * k, 2 * k + 1)], issame[keep].tolist())
    return path


@pytest.fixture(scope="module")
def embed(shared_data):
    return load_embedder(shared_data / "models" / "onnx" / "mobilefacenet_paddle_128d.onnx", color="bgr")


def test_batch_size_does_not_change_results(embed, small_bin):
    a = evaluate.evaluate_bins(embed, [small_bin], batch_size=7)
    b = evaluate.evaluate_bins(embed, [small_bin], batch_size=64)
    assert a["lfw"]["accuracy"] == b["lfw"]["accuracy"]
    assert a["lfw"]["feature_norm"] == pytest.approx(b["lfw"]["feature_norm"], rel=1e-6)


def test_command_prints_table_and_writes_json(embed, small_bin, shared_data, tmp_path, capsys):
    model = shared_data / "models" / "onnx" / "mobilefacenet_paddle_128d.onnx"
    out = tmp_path / "r.json"
    assert evaluate.main(["--model", str(model), "--color", "bgr", "--bin-dir", str(small_bin.parent),
                          "--json", str(out)]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "BGR input, flip fusion sum, batch 128" in printed and "lfw" in printed and "mean" in printed
    saved = json.loads(out.read_text())
    assert saved["settings"]["color"] == "bgr" and saved["lfw"]["pairs"] == 60
    # the same numbers as the protocol on features extracted by hand
    from data.verification import load_bin
    from evaluation.extract import extract

    val = load_bin(small_bin)
    original, flipped = extract(embed, val.images, 32)
    expected = evaluate_pairs(fuse_flip(original, flipped), val.issame)
    assert saved["lfw"]["accuracy"] == pytest.approx(expected["accuracy"])
    assert saved["lfw"]["accuracy"] > 0.9  # a real pretrained model on real pairs


def test_no_bins_is_an_error(shared_data, tmp_path, capsys):
    model = shared_data / "models" / "onnx" / "mobilefacenet_paddle_128d.onnx"
    assert evaluate.main(["--model", str(model), "--bin-dir", str(tmp_path)]) == 2
    assert "no .bin given" in capsys.readouterr().err


def test_eval_hq_script(shared_data, small_bin, tmp_path):
    model = shared_data / "models" / "onnx" / "mobilefacenet_paddle_128d.onnx"
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path / "r.json")}
    proc = subprocess.run(
        ["bash", "validation_hq/eval_hq.sh", str(model), str(small_bin.parent), "--color", "bgr"],
        cwd=Path(evaluate.__file__).resolve().parent.parent, env=env, capture_output=True, text=True,
        check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "r.json").read_text())["lfw"]["pairs"] == 60


def test_eval_hq_script_output_json_argument_then_out_then_default(tmp_path):
    """OUT_JSON, a third argument that is not an option, wins over $OUT, which wins over
    work_dirs/eval/<model>_hq.json in the repository; relative paths are the caller's (python replaced by
    echo, so only the launcher's own work is checked; a copy of it stands in for the repository)."""
    repo = tmp_path / "repo"
    for rel in ("validation_hq/eval_hq.sh", "scripts/eval_launcher.sh"):
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(Path(evaluate.__file__).resolve().parent.parent / rel, repo / rel)
    caller = tmp_path / "caller"
    caller.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "OUT"} | {"PYTHON": "echo"}

    def launch(*args: str, **extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(repo / "validation_hq/eval_hq.sh"), *args], cwd=caller,
                              env=env | extra, capture_output=True, text=True, check=False)  # fmt: skip

    head = ["-m", "validation_hq.evaluate", "--model", "m.onnx", "--bin-dir", "bins", "--json"]
    proc = launch("m.onnx", "bins", "res/r.json", "--color", "bgr", OUT=str(tmp_path / "env.json"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [*head, "res/r.json", "--color", "bgr"]
    assert (caller / "res").is_dir()
    proc = launch("m.onnx", "bins", "--color", "bgr", OUT=str(tmp_path / "env" / "r.json"))
    assert proc.stdout.split() == [*head, str(tmp_path / "env" / "r.json"), "--color", "bgr"]
    assert (tmp_path / "env").is_dir()
    printed = launch("m.onnx", "bins").stdout.split()
    assert printed[:-1] == head
    assert Path(printed[-1]).resolve() == (repo / "work_dirs/eval/m_hq.json").resolve()
    usage = launch("m.onnx")
    assert usage.returncode == 2 and "eval_hq.sh CKPT_OR_ONNX BIN_DIR [OUT_JSON]" in usage.stderr


def test_eval_risk_script_takes_bins_then_an_optional_json(tmp_path):
    """scripts/eval_risk.sh CKPT BIN [BIN ...] [OUT.json]: the trailing .json is the output, else $OUT, else
    work_dirs/eval/<model>_risk.json in the repository (here a copy of the launcher; python replaced by
    echo); a .json alone is no .bin, and too few arguments print the usage."""
    repo = tmp_path / "repo"
    for rel in ("scripts/eval_risk.sh", "scripts/eval_launcher.sh"):
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(Path(evaluate.__file__).resolve().parent.parent / rel, repo / rel)
    env = {**os.environ, "PYTHON": "echo", "OUT": str(tmp_path / "env.json")}

    def launch(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(repo / "scripts/eval_risk.sh"), *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, check=False)  # fmt: skip

    head = ["-m", "probface.risk", "--model", "p.pt", "--bin", "lfw.bin", "cfp_fp.bin", "--json"]
    proc = launch("p.pt", "lfw.bin", "cfp_fp.bin", "res/risk.json", "--no-flip")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [*head, "res/risk.json", "--no-flip"] and (tmp_path / "res").is_dir()
    assert launch("p.pt", "lfw.bin", "cfp_fp.bin", "--no-flip").stdout.split() == [
        *head, str(tmp_path / "env.json"), "--no-flip"
    ]  # fmt: skip
    del env["OUT"]
    printed = launch("p.pt", "lfw.bin", "cfp_fp.bin").stdout.split()
    assert printed[:-1] == head
    assert Path(printed[-1]).resolve() == (repo / "work_dirs/eval/p_risk.json").resolve()
    for too_few in (["p.pt"], ["p.pt", "out.json"]):
        usage = launch(*too_few)
        assert usage.returncode == 2 and "eval_risk.sh CKPT BIN [BIN ...] [OUT.json]" in usage.stderr


def test_cached_features_rescore_without_the_model(embed, small_bin, tmp_path):
    first = evaluate.evaluate_bins(embed, [small_bin], cache=tmp_path, key="m")
    assert (tmp_path / "lfw__m.npz").is_file()

    def no_model(images):
        raise AssertionError("the cache should have answered")

    again = evaluate.evaluate_bins(no_model, [small_bin], fusion="concat", cache=tmp_path, key="m")
    assert again["lfw"]["feature_norm"] == first["lfw"]["feature_norm"]
    assert again["lfw"]["accuracy"] > 0.9
