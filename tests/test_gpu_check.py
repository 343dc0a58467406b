"""scripts/gpu_check.sh: its CPU version runs here, so the script that gives the GPU verdict cannot rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scripts import gpu_check

ROOT = Path(__file__).resolve().parent.parent


def test_peak_table_matches_device_names_to_datasheet_peaks() -> None:
    """Names as torch.cuda.get_device_name() gives them; dense (not sparse) bf16 TFLOP/s, fp16 on V100."""
    expected = {
        "NVIDIA H100 80GB HBM3": 989.0, "NVIDIA H100 PCIe": 756.0, "NVIDIA H100 NVL": 835.0,
        "NVIDIA H200": 989.0, "NVIDIA GH200 480GB": 989.0, "NVIDIA A100-SXM4-80GB": 312.0,
        "NVIDIA A100 80GB PCIe": 312.0, "Tesla V100-SXM2-32GB": 125.0, "NVIDIA L40S": 362.0,
        "NVIDIA L40": 181.0, "NVIDIA L4": 121.0, "NVIDIA A10": 125.0,
    }  # fmt: skip
    for name, peak in expected.items():
        found = gpu_check.peak_tflops(name)
        assert found is not None and found[0] == peak, (name, found)
    assert gpu_check.peak_tflops("NVIDIA GeForce RTX 4090") is None


def test_a_failing_part_is_reported_and_the_others_still_run(tmp_path: Path, capsys) -> None:
    status = gpu_check.main(
        ["--out", str(tmp_path), "--cpu", "--parts", "environment", "partial_fc", "--pfc-classes", "0"]
    )
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert status == 1
    assert report["parts"]["environment"]["status"] == "ok"
    failed = report["parts"]["partial_fc"]
    assert failed["status"] == "failed" and failed["reason"].startswith("ValueError: ")
    assert failed["settings"]["classes"] == 0
    out = capsys.readouterr().out
    assert "partial_fc" in out and "FAILED: ValueError" in out


def test_the_gpu_verdict_times_the_vision_transformers_as_the_cpu_version_can(tmp_path: Path) -> None:
    """The GPU profile's throughput rows include vit_t and vit_b. Here vit_t runs train.py's step once
    (bf16 autocast on the CPU, tiny batch) and reports the forward FLOPs of the README's backbone table
    (3.01 GFLOPs at 112x112, 2 per multiply-accumulate, attention included; scripts/bench_backbones.py)."""
    assert {"vit_t", "vit_b"} <= set(gpu_check.PROFILES["gpu"]["backbones"])
    status = gpu_check.main(
        ["--out", str(tmp_path), "--cpu", "--parts", "throughput", "--backbones", "vit_t", "--modes", "bf16",
         "--batch", "2", "--steps", "1", "--warmup", "1", "--classes", "10"]
    )  # fmt: skip
    (row,) = json.loads((tmp_path / "gpu_check.json").read_text())["parts"]["throughput"]["rows"]
    assert status == 0 and row["backbone"] == "vit_t" and row["status"] == "ok", row
    assert row["figures"]["forward_gflops_per_image"] == pytest.approx(3.01, abs=0.01)


FIGURES = {
    "environment": {"torch", "cuda", "cudnn", "nccl", "device", "memory_gib", "cpu_cores"},
    "partial_fc": {"step_ms", "weight_gib", "classes_scored"},
    "pipeline": {"images_per_s", "training_images_per_s", "synthetic_images_per_s", "real_over_synthetic",
                 "first_batch_s", "cpu_decode_images_per_s_per_core"},
    "extraction": {"images_per_s_with_flip", "ijbc_extraction_s", "decode_align_images_per_s_per_core",
                   "ijbc_projected_s"},
    "train": {"first_losses", "last_losses", "loss_falls", "checkpoint_step", "resumed_at_step",
              "final_step"},
}  # fmt: skip


@pytest.mark.slow
def test_cpu_version_reports_every_part(tmp_path: Path) -> None:
    """The whole CPU version through the launcher (about a minute on 2 idle cores, hence ``slow``; CI runs
    it): every part has its figures or a stated reason, and the figures are those of a working run. The
    budget is raised so that a busy machine runs every part rather than skipping for time."""
    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(
        ["bash", "scripts/gpu_check.sh", str(tmp_path), "--cpu", "--budget-s", "1200"], cwd=ROOT, env=env,
        capture_output=True, text=True, timeout=1500, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    first = done.stdout.splitlines()[0]
    assert first.startswith("GPU check, CPU version (--cpu given)") and "nothing about a GPU" in first
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["profile"] == "cpu" and report["first_line"] == first
    assert set(report["parts"]) == set(gpu_check.PARTS)
    for name, record in report["parts"].items():
        assert record["status"] in ("ok", "skipped", "failed"), name
        if record["status"] != "ok":
            assert record["reason"], name
        elif name in FIGURES:
            assert FIGURES[name] <= set(record["figures"]), (name, record["figures"])
    parts = report["parts"]
    assert parts["environment"]["figures"]["torch"] == torch.__version__
    assert parts["environment"]["figures"]["collective"] == "gloo all_reduce on 1 rank: ok"
    rows = {row["mode"]: row for row in parts["throughput"]["rows"]}
    assert set(rows) == set(gpu_check.MODES)
    for mode, row in rows.items():
        assert row["backbone"] == "mbf" and row["settings"]["batch"] == report["settings"]["batch"]
        if mode.endswith("compile"):
            assert row["status"] == "skipped" and "compiling mbf takes minutes" in row["reason"]
        elif mode == "fp16":
            assert row["status"] == "skipped" and "fp16 convolutions take a slow path" in row["reason"]
        else:
            assert row["status"] == "ok", row
            figures = row["figures"]
            assert figures["images_per_s"] > 0 and figures["forward_gflops_per_image"] > 0.1
            assert figures["training_tflops"] > 0 and figures["mfu_percent"] is None and figures["mfu_note"]
    train = parts["train"]["figures"]
    steps, extra = report["settings"]["train_steps"], report["settings"]["resume_steps"]
    assert train["loss_falls"] and train["checkpoint_step"] == train["resumed_at_step"] == steps
    assert train["final_step"] == steps + extra
    pfc = parts["partial_fc"]
    assert pfc["figures"]["classes_scored"] == int(0.2 * pfc["settings"]["classes"])
    assert parts["pipeline"]["figures"]["images_per_s"] > 0
    assert (
        parts["extraction"]["figures"]["ijbc_projected_s"]
        > parts["extraction"]["figures"]["ijbc_extraction_s"]
    )
    for name in gpu_check.PARTS:
        assert name in done.stdout
    assert not (tmp_path / "work").exists()  # the generated data and checkpoints are removed
