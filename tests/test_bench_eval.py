"""Evaluation speed features: threaded .bin decoding, bf16 autocast in the embedder, scripts/bench_eval."""

from __future__ import annotations

import json
import mmap
import time

import cv2
import numpy as np
import pytest
import torch
from test_validation_tinyface import one_torch_thread  # noqa: F401 (fixture: small tensors, shared cores)

from backbones import build_backbone
from data.decode import DecodeError, encode_jpeg
from data.verification import VerificationFileError, load_bin, read_bin_raw, write_bin
from evaluation.embedders import TorchEmbedder, load_embedder
from evaluation.extract import extract
from evaluation.verification import evaluate_pairs, fuse_flip
from scripts import bench_eval
from scripts.bench_support import Peak


@pytest.fixture(scope="module")
def real_pairs(shared_data):
    """The encoded images and flags of the first 300 LFW pairs (the same-person fold: images repeat)."""
    images, issame = read_bin_raw(shared_data / "lfw_yunet112.bin")
    return images[:600], issame[:300]


def test_threaded_decoding_equals_sequential(real_pairs, tmp_path):
    images, issame = real_pairs
    path = tmp_path / "lfw.bin"
    write_bin(path, images, issame.tolist())
    assert len({id(b) for b in read_bin_raw(path)[0]}) < len(images)  # shared images stay shared
    sequential = load_bin(path)
    for workers in (2, 5):
        threaded = load_bin(path, workers=workers)
        np.testing.assert_array_equal(threaded.images, sequential.images)
        np.testing.assert_array_equal(threaded.issame, sequential.issame)
    # and both are the pixels of each JPEG decoded on its own
    for i in (0, 1, 299, 598):
        expected = cv2.cvtColor(cv2.imdecode(np.frombuffer(images[i], np.uint8), cv2.IMREAD_COLOR),
                                cv2.COLOR_BGR2RGB)  # fmt: skip
        np.testing.assert_array_equal(sequential.images[i], expected.transpose(2, 0, 1))


@pytest.mark.parametrize("workers", [0, 4])
def test_threaded_decoding_raises_the_first_error(real_pairs, tmp_path, workers):
    images = list(real_pairs[0][:120])
    images[70] = images[70][: len(images[70]) // 2]  # truncated, after the size error below
    images[90] = b"garbage"
    small = cv2.resize(cv2.imdecode(np.frombuffer(images[0], np.uint8), cv2.IMREAD_COLOR), (100, 100))
    images[33] = encode_jpeg(cv2.cvtColor(small, cv2.COLOR_BGR2RGB))
    path = tmp_path / "bad.bin"
    write_bin(path, images, [True] * 60)
    with pytest.raises(VerificationFileError, match=r"bad.bin: image 33 is 100x100, but image 0 is 112x112"):
        load_bin(path, workers=workers)
    images[33] = images[32]
    write_bin(path, images, [True] * 60)
    with pytest.raises(DecodeError, match=r"bad.bin image 70: truncated JPEG"):
        load_bin(path, workers=workers)


@pytest.fixture(scope="module")
def faces(real_pairs):
    return torch.from_numpy(np.stack([
        cv2.cvtColor(cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        for b in real_pairs[0][:4:2]
    ]).transpose(0, 3, 1, 2).copy())  # fmt: skip


def test_bf16_autocast_features_are_close_to_fp32(faces):
    torch.manual_seed(0)
    model = build_backbone("mbf")
    fp32 = TorchEmbedder(model)(faces)
    with torch.no_grad():
        plain = model.eval()((faces.float() / 127.5) - 1)
    torch.testing.assert_close(fp32, plain)  # fp32: no autocast at all
    bf16 = TorchEmbedder(model, precision="bf16")(faces)
    assert bf16.dtype == torch.float32 and not torch.equal(bf16, fp32)  # it did run in bf16
    cosine = torch.nn.functional.cosine_similarity(bf16, fp32)
    assert cosine.min() > 0.99, cosine


def test_precision_is_checked(shared_data):
    with pytest.raises(ValueError, match="precision must be one of"):
        TorchEmbedder(build_backbone("mbf"), precision="int8")
    onnx = shared_data / "models" / "onnx" / "mobilefacenet_paddle_128d.onnx"
    with pytest.raises(ValueError, match="precision bf16 is for PyTorch models"):
        load_embedder(onnx, precision="bf16")
    assert load_embedder(onnx).precision == "fp32"


def pixel_embedder(images: torch.Tensor) -> torch.Tensor:
    """A cheap stand-in for a network: 4x4 average-pooled pixels, centred."""
    x = torch.nn.functional.avg_pool2d(images.float(), 28).flatten(1)
    return x - x.mean(dim=1, keepdim=True)


def test_bench_eval_reports_every_row(shared_data, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench_eval, "make_embedder", lambda args, device, precision, faces: _Named(precision))
    out = tmp_path / "bench.json"
    args = ["--limit", "40", "--speed-images", "24", "--batch-sizes", "8", "16", "--workers", "0", "2",
            "--devices", "cpu", "--json", str(out)]  # fmt: skip
    assert bench_eval.main(args) == 0
    report = json.loads(out.read_text())
    printed = capsys.readouterr().out
    assert "whole .bin evaluation (40 pairs, batch 128)" in printed and "peak RSS" in printed
    assert [r["threads"] for r in report["decode"]] == [0, 2]
    (run,) = report["runs"]
    rows = [(r["batch"], r["flip"]) for r in run["extractor"]]
    assert rows == [(8, False), (8, True), (16, False), (16, True)]
    assert [r["workers"] for r in run["loader"]] == [0, 2]
    assert all(r["images_per_s"] > 0 for r in [*run["extractor"], *run["loader"], *report["decode"]])
    whole = run["whole"]
    assert whole["pairs"] == 40 and whole["total_s"] >= whole["extract_s"] > 0 and run["peak_rss_mib"] > 100
    # the peak of the evaluation's steps (the high-water mark is reset before them: see the test below);
    # the decoded images (3 MiB here) may reuse memory the process already held, so only the order holds
    assert whole["peak_of"] == "these steps" and whole["decoded_mib"] > 0
    assert whole["peak_rss_mib"] >= 0.99 * whole["rss_before_mib"]
    val = load_bin(bench_eval.limited_bin(shared_data / "lfw_yunet112.bin", 40, tmp_path))
    assert 0 < val.issame.sum() < 40  # both kinds of pairs, though the file starts with 300 positives
    original, flipped = extract(pixel_embedder, val.images, 16)
    assert whole["accuracy"] == evaluate_pairs(fuse_flip(original, flipped), val.issame)["accuracy"]


def _touched_pages(mib: int) -> mmap.mmap:
    """``mib`` MiB of fresh anonymous pages from the kernel, every page written (resident), whatever the
    C allocator would have reused."""
    block, chunk = mmap.mmap(-1, mib * 2**20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS), b"\x01" * 2**20
    for _ in range(mib):
        block.write(chunk)
    return block


def test_the_peak_is_reset_before_a_measured_step():
    """After a reset the high-water mark forgets an earlier, larger allocation and sees a new one."""
    big = _touched_pages(256)
    big.close()  # unmapped: back to the kernel
    assert bench_eval.reset_peak_rss(), "this test needs Linux's /proc/self/clear_refs"
    before = bench_eval.rss_mib()
    assert bench_eval.peak_rss_mib() < before + 128  # the 256 MiB peak is forgotten
    block = _touched_pages(64)
    peak = bench_eval.peak_rss_mib()
    block.close()
    assert before + 0.9 * 64 <= peak < before + 128, (before, peak)


def test_a_phase_peak_counts_the_phase_alone_and_its_anonymous_part():
    """scripts.bench_support.Peak (bench_pfc_scale's phases): a phase that touches 64 MiB of anonymous pages
    after a 256 MiB one was freed reports about 64 MiB above its start, in the resident set and in RssAnon."""
    big = _touched_pages(256)
    big.close()
    with Peak() as phase:
        block = _touched_pages(64)
        time.sleep(0.1)  # the RssAnon sampler reads every 20 ms
        block.close()
    row, mib = phase.row(), 1 / 1024
    assert 0.9 * 64 * mib <= row["extra_gb"] < 128 * mib, row
    assert 0.9 * 64 * mib <= row["anon_extra_gb"] < 128 * mib, row
    assert row["peak_gb"] >= row["extra_gb"] and row["seconds"] >= 0.1


class _Named:
    """pixel_embedder with the attributes the benchmark reads from an embedder."""

    def __init__(self, precision: str) -> None:
        self.precision = precision

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return pixel_embedder(images)


def test_random_backbone_is_calibrated_to_sane_features(faces):
    """An untrained r18 with default BatchNorm statistics gives norms near 3e8 (r50: inf); measured ones
    keep the features in the usual range."""
    args = bench_eval.parse_args(["--backbone", "r18"])
    features = bench_eval.make_embedder(args, "cpu", "fp32", faces.numpy())(faces)
    assert torch.isfinite(features).all() and features.norm(dim=1).max() < 1e3
    assert not torch.allclose(features[0], features[1])


class _TinyNet(torch.nn.Module):
    """conv -> BN -> PReLU twice, pooled: a network with BatchNorms to fold, exported in a moment."""

    input_size = 16

    def __init__(self) -> None:
        super().__init__()
        layers = []
        for cin, cout in ((3, 8), (8, 8)):
            layers += [
                torch.nn.Conv2d(cin, cout, 3, padding=1),
                torch.nn.BatchNorm2d(cout),
                torch.nn.PReLU(cout),
            ]
        self.body = torch.nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).mean(dim=(2, 3))


def test_runtimes_side_by_side(tmp_path):
    torch.manual_seed(0)
    model = _TinyNet().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):  # statistics that matter, so folding changes the weights
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    images = torch.randint(0, 256, (4, 3, 16, 16), generator=torch.Generator().manual_seed(1)).to(torch.uint8)
    rows = bench_eval.compare_runtimes(TorchEmbedder(model), images, [1], repeats=2, busy=0, scratch=tmp_path)
    names = ["pytorch eager", "fast path", "onnxruntime", "onnxruntime (defaults)"]
    assert [r["runtime"] for r in rows] == names
    assert all(r["threads"] == 1 and r["batch"] == 4 and r["images_per_s"] > 0 for r in rows)
    assert rows[1]["fast_path"] == "BatchNorm folded (2 of 2)"
    # every runtime gives eager's features (float32 rounding: measured below 1e-6 of their size)
    assert rows[0]["difference"] == 0 and all(r["difference"] < 1e-4 for r in rows[1:])
    printed = "\n".join(bench_eval.format_runtimes(rows))
    assert "fast path / best onnxruntime (1 threads, 0 busy, medians)" in printed


def test_bench_ijbc_projects_from_its_measured_parts(shared_data, tmp_path, capsys):
    from scripts import bench_ijbc

    gpu = tmp_path / "gpu_check.json"
    extraction = {"settings": {"backbone": "r100", "precision": "bf16"},
                  "figures": {"images_per_s_with_flip": 5000.0}}  # fmt: skip
    gpu.write_text(json.dumps({"device": "a GPU", "parts": {"extraction": extraction}}))
    out = tmp_path / "ijbc.json"
    sizes = ["--count", "20", "--images", "3000", "--templates", "300"]
    sizes += ["--pairs", "20000", "--genuine", "100"]
    assert bench_ijbc.main([*sizes, "--cores", "8", "--gpu-check", str(gpu), "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    scoring, projection = report["scoring"], report["projection"]
    assert scoring["pairs"] == 20000 and scoring["templates"] == 300  # every template got images
    steps = ("image_features_s", "template_pooling_s", "pair_scores_s", "roc_tar_at_far_s")
    assert scoring["total_s"] == pytest.approx(sum(scoring[s] for s in steps))
    decode = 3000 / (report["decode_align"]["images_per_s_per_core"] * 7)  # all cores but one
    assert projection["decode_align_s"] == pytest.approx(decode)
    assert projection["extraction_s"] == pytest.approx(3000 / 5000)
    assert projection["total_s"] == pytest.approx(max(decode, 0.6) + scoring["total_s"])
    assert (
        report["gpu_source"].startswith("measured by scripts/gpu_check.sh")
        and "r100 bf16" in report["gpu_source"]
    )
    assert "projected IJB-C on 8 cores + the GPU" in capsys.readouterr().out
    gpu.write_text(json.dumps({"parts": {}}))
    assert bench_ijbc.main([*sizes, "--gpu-check", str(gpu)]) == 2
    assert "no parts.extraction.figures.images_per_s_with_flip" in capsys.readouterr().err
