"""Dataset preparation on a slice of the real LFW photos: identities, pairs, failure report, RecordIO."""

from __future__ import annotations

import json
import shutil

import numpy as np

from data.decode import encode_jpeg
from data.recordio import RecordIOFaceSet
from data.verification import load_bin, read_pairs
from scripts import prepare_dataset


def test_lfw_slice_to_bin_and_recordio(shared_data, tmp_path, capsys):
    pairs = read_pairs(shared_data / "lfw_pairs.txt")
    chosen = [pairs[0], pairs[1], pairs[300], pairs[301]]  # two same-person pairs, two different
    photos = tmp_path / "photos"
    photos.mkdir()
    for p in chosen:
        for name, num in ((p.name1, p.num1), (p.name2, p.num2)):
            shutil.copy(shared_data / "lfw_color150" / f"{name}_{num:04d}.jpg", photos)
    (photos / "Nobody_Here_0001.jpg").write_bytes(encode_jpeg(np.full((150, 150, 3), 90, np.uint8)))
    lines = [
        f"{p.name1}\t{p.num1}\t{p.num2}" if p.same else f"{p.name1}\t{p.num1}\t{p.name2}\t{p.num2}"
        for p in chosen
    ]
    (tmp_path / "pairs.txt").write_text("1\t4\n" + "\n".join(lines) + "\n")
    out = tmp_path / "out"
    args = [
        str(photos),
        str(out),
        "--flat",
        "--rec",
        "--pairs",
        str(tmp_path / "pairs.txt"),
        "--bin",
        "lfw.bin",
    ]
    assert prepare_dataset.main(args) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    people = {p.name1 for p in chosen} | {p.name2 for p in chosen}
    assert summary["failures"] == 1 and summary["identities"] == len(people) + 1
    assert "Nobody_Here_0001.jpg\tno_face" in (out / "failures.txt").read_text()
    assert "1 photos without a usable face" in captured.err
    crops = sorted((out / "aligned").glob("*/*.jpg"))
    assert len(crops) == summary["photos"] - 1
    assert {c.parent.name for c in crops} == people
    made = load_bin(out / "lfw.bin")
    assert made.images.shape[1:] == (3, 112, 112)
    assert made.issame.tolist() == [True, True, False, False]
    # pair k holds the crops of its two photos, in the order of the pairs file, byte for byte
    from data.verification import read_bin_raw

    stored, _ = read_bin_raw(out / "lfw.bin")
    named = [(n, k) for p in chosen for n, k in ((p.name1, p.num1), (p.name2, p.num2))]
    crop_bytes = [(out / "aligned" / n / f"{n}_{k:04d}.jpg").read_bytes() for n, k in named]
    assert [bytes(b) for b in stored] == crop_bytes
    rec = RecordIOFaceSet(out / "train.rec")
    assert rec.num_identities == len(people) and rec.num_images == len(crops)

    # a second run reuses the crops
    assert prepare_dataset.main(args) == 0
    assert json.loads(capsys.readouterr().out)["reused"] == summary["photos"] - 1
