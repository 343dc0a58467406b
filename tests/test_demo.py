"""`make demo`'s pipeline at a tiny scale through its real entry point: pack CelebA crops, build LFW pairs
from raw photos, train, evaluate, plot, run inference.py; a second run reuses the prepared data."""

from __future__ import annotations

import itertools
import shutil

import cv2
import numpy as np
import torch
import torch.nn.functional as F

import inference
from backbones import build_backbone
from core.checkpoint import load_checkpoint
from data.verification import load_bin, read_pairs
from face_alignment import YuNetDetector, align_face
from scripts import demo


def tiny_data_folder(shared_data, root):
    """A data folder laid out like ../shared/data: 4 CelebA identities, the photos of 10 LFW pairs."""
    celeba = shared_data / "celeba_aligned112"
    for identity in sorted(p for p in celeba.iterdir() if p.is_dir())[:4]:
        for photo in sorted(identity.glob("*.jpg"))[:4]:
            (root / "celeba_aligned112" / identity.name).mkdir(parents=True, exist_ok=True)
            shutil.copy(photo, root / "celeba_aligned112" / identity.name)
    pairs = read_pairs(shared_data / "lfw_pairs.txt")
    chosen = pairs[:5] + pairs[300:305]  # five same-person pairs, five different
    (root / "lfw_color150").mkdir()
    lines = []
    for p in chosen:
        for name, num in ((p.name1, p.num1), (p.name2, p.num2)):
            shutil.copy(shared_data / "lfw_color150" / f"{name}_{num:04d}.jpg", root / "lfw_color150")
        lines.append(
            f"{p.name1}\t{p.num1}\t{p.num2}" if p.same else f"{p.name1}\t{p.num1}\t{p.name2}\t{p.num2}"
        )
    (root / "lfw_pairs.txt").write_text("1\t10\n" + "\n".join(lines) + "\n")
    return [p.same for p in chosen]


def checkpoint_embeddings(path, images: torch.Tensor) -> torch.Tensor:
    """Un-normalised embeddings of uint8 RGB faces by the backbone of checkpoint ``path``, computed here:
    the architecture from its meta, (x/255 - 0.5)/0.5, a bilinear antialiased resize to its input size."""
    state = load_checkpoint(path)
    meta = state["meta"]
    assert meta["color"] == "rgb" and meta["normalization"] == "(x/255 - 0.5) / 0.5"
    model = build_backbone(meta["arch"], embedding_size=meta["embedding_size"], input_size=meta["input_size"])
    model.load_state_dict(state["backbone"])
    side = meta["input_size"]
    x = F.interpolate(images.float() / 127.5 - 1.0, size=(side, side), mode="bilinear", antialias=True)
    with torch.no_grad():
        return model.eval()(x)


def ten_fold_accuracy(features: np.ndarray, issame: np.ndarray) -> float:
    """The .bin protocol written out (docs/methods.md §5.2): squared distances of unit features, 10
    contiguous folds, each judged at the first best threshold of 0:0.01:4 on the other nine."""
    dist = ((features[0::2] - features[1::2]) ** 2).sum(1)
    thresholds = np.arange(0, 4, 0.01)
    accuracies = []
    for test in np.array_split(np.arange(len(issame)), 10):
        train = np.setdiff1d(np.arange(len(issame)), test)
        best = thresholds[np.argmax([np.mean((dist[train] < t) == issame[train]) for t in thresholds])]
        accuracies.append(np.mean((dist[test] < best) == issame[test]))
    return float(np.mean(accuracies))


def test_the_demo_reports_from_an_output_dir_given_in_set_with_the_weight_average(
    shared_data, tmp_path, capsys
):
    """``--set output_dir=...`` moves the run (train.py takes the last output_dir), and the report reads it
    from there; with ``train.ema`` the average's LFW figure is printed beside the trained weights'."""
    tiny_data_folder(shared_data, tmp_path / "data")
    elsewhere = tmp_path / "elsewhere"
    args = ["--data", str(tmp_path / "data"), "--out", str(tmp_path / "demo"), "--set", "train.max_steps=2",
            "data.batch_size=16", "data.num_workers=0", "train.save_every=0", "model.input_size=32",
            "train.ema.enabled=true", f"output_dir={elsewhere}"]  # fmt: skip
    assert demo.main(args) == 0
    printed = capsys.readouterr().out
    state = load_checkpoint(elsewhere / "last.pt")
    assert state["step"] == 2 and not (tmp_path / "demo" / "run").exists()
    average = state["ema"]["validation"]["lfw"]
    assert (
        f"weight average (train.ema): accuracy {average['accuracy'] * 100:.2f}% ± "
        f"{average['accuracy_std'] * 100:.2f}" in printed
    )
    assert f"model: {elsewhere / 'last.pt'}" in printed


def test_demo_pipeline_end_to_end_at_tiny_scale(shared_data, tmp_path, capsys):
    same = tiny_data_folder(shared_data, tmp_path / "data")
    out = tmp_path / "demo"
    # every step sees all 16 training faces, so the training loss must fall from step to step
    args = ["--data", str(tmp_path / "data"), "--out", str(out), "--set", "train.max_steps=4",
            "data.batch_size=16", "data.num_workers=0", "train.save_every=0", "train.log_every=1",
            "model.input_size=32"]  # fmt: skip
    assert demo.main(args) == 0
    printed = capsys.readouterr().out
    assert "16 images of 4 identities" in printed
    lfw = load_bin(out / "lfw" / "lfw.bin")
    assert lfw.issame.tolist() == same
    checkpoint = out / "run" / "last.pt"
    state = load_checkpoint(checkpoint)
    assert state["step"] == 4 and state["validation"]["lfw"]["pairs"] == 10

    # it learns its training identities: the logged loss falls at every step, to under a third
    log = (out / "run" / "train.log").read_text()
    losses = [float(line.split(" loss ")[1].split()[0]) for line in log.splitlines() if " loss " in line]
    assert len(losses) == 4 and all(b < a for a, b in itertools.pairwise(losses)), losses
    assert losses[-1] < losses[0] / 3, losses

    # the LFW figures it prints are those of the checkpoint's own features, recomputed here. (Four steps
    # leave MobileFaceNet's BatchNorm statistics far from its activations, so its eval-mode features are
    # nearly equal for every face and these figures say nothing of learning at this scale; held-out
    # accuracy rising above chance is test_train_loop's tiny run.)
    images = torch.from_numpy(lfw.images)
    original = checkpoint_embeddings(checkpoint, images)
    fused = F.normalize(original + checkpoint_embeddings(checkpoint, images.flip(3)), dim=1).numpy()
    reported = state["validation"]["lfw"]
    np.testing.assert_allclose(reported["feature_norm"], original.norm(dim=1).mean().item(), rtol=1e-4)
    accuracy = ten_fold_accuracy(fused, lfw.issame)
    assert reported["accuracy"] == accuracy
    assert f"accuracy {accuracy * 100:.2f}% ± {reported['accuracy_std'] * 100:.2f}" in printed
    assert (out / "run" / "curves.png").stat().st_size > 0

    # inference.py ran with the new checkpoint: the cosines of its embeddings of the sample photos
    assert f"model: {checkpoint}" in printed
    photos = sorted(inference.SAMPLES.glob("*.jpg"))
    detector, crops = YuNetDetector(), []
    for photo in photos:
        rgb = cv2.cvtColor(cv2.imread(str(photo)), cv2.COLOR_BGR2RGB)
        face = max(detector.detect(rgb), key=lambda f: (f.box[2] - f.box[0]) * (f.box[3] - f.box[1]))
        crops.append(align_face(rgb, face.landmarks).transpose(2, 0, 1))
    emb = F.normalize(checkpoint_embeddings(checkpoint, torch.from_numpy(np.stack(crops))), dim=1)
    rows = printed.split("(RGB input)\n", 1)[1].splitlines()[1:4]
    assert [row.split()[0] for row in rows] == [p.name for p in photos]
    matrix = torch.tensor([[float(v) for v in row.split()[1:]] for row in rows])
    torch.testing.assert_close(matrix, emb @ emb.T, rtol=0, atol=1e-3)  # printed to 3 decimals

    # a second run reuses the prepared data and the finished run
    assert demo.main(args) == 0
    printed = capsys.readouterr().out
    assert "[1/5] reusing" in printed and "[2/5] reusing" in printed
    assert load_checkpoint(checkpoint)["step"] == 4
