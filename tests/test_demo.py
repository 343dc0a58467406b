"""`make demo`'s pipeline at a tiny scale through its real entry point: pack CelebA crops, build LFW pairs
from raw photos, train, evaluate, plot, run inference.py; a second run reuses the prepared data."""

from __future__ import annotations

import shutil

from core.checkpoint import load_checkpoint
from data.verification import load_bin, read_pairs
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


def test_demo_pipeline_end_to_end_at_tiny_scale(shared_data, tmp_path, capsys):
    same = tiny_data_folder(shared_data, tmp_path / "data")
    out = tmp_path / "demo"
    args = ["--data", str(tmp_path / "data"), "--out", str(out), "--set", "train.max_steps=3",
            "data.batch_size=8", "data.num_workers=0", "train.save_every=0",
            "model.input_size=32"]  # fmt: skip
    assert demo.main(args) == 0
    printed = capsys.readouterr().out
    assert "16 images of 4 identities" in printed
    assert load_bin(out / "lfw" / "lfw.bin").issame.tolist() == same
    state = load_checkpoint(out / "run" / "last.pt")
    assert state["step"] == 3 and state["validation"]["lfw"]["pairs"] == 10
    accuracy = state["validation"]["lfw"]["accuracy"]
    assert f"accuracy {accuracy * 100:.2f}%" in printed
    assert (out / "run" / "curves.png").stat().st_size > 0
    # inference.py ran with the new checkpoint: a 3x3 similarity matrix of the sample photos
    assert f"model: {out / 'run' / 'last.pt'}" in printed
    matrix = printed.split("(RGB input)\n", 1)[1].splitlines()[1:4]
    assert [float(row.split()[i + 1]) for i, row in enumerate(matrix)] == [1.0, 1.0, 1.0]
    # a second run reuses the prepared data and the finished run
    assert demo.main(args) == 0
    printed = capsys.readouterr().out
    assert "[1/5] reusing" in printed and "[2/5] reusing" in printed
    assert load_checkpoint(out / "run" / "last.pt")["step"] == 3
