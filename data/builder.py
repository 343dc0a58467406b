"""Build the training dataset a config describes (RecordIO or image folder + augmentation)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from core.config import ConfigError, DataConfig
from data.bad_records import BadRecords
from data.decode import DecodeError, decode_rgb
from data.image_folder import ImageFolderFaces
from data.recordio import RecordIOError, RecordIOFaceSet, find_recordio
from data.transforms import FaceDataset, FaceSource, FaceTransform, describe

__all__ = ["build_train_dataset", "find_recordio", "open_train_source"]


def open_train_source(cfg: DataConfig) -> FaceSource:
    """The images and labels of ``cfg.root``; ``num_classes``/``num_images`` in the config are checked."""
    if not cfg.root:
        raise ConfigError("data.root is not set: give the folder of train.rec/train.idx or of the images")
    root = Path(cfg.root)
    rec = find_recordio(root)
    if cfg.format == "rec" and rec is None:
        raise ConfigError(
            f"data.root {root}: no RecordIO (neither {root}.rec, {root}/train.rec nor a .rec file)"
        )
    if cfg.format == "folder" or (cfg.format == "auto" and rec is None):
        if not root.is_dir():
            raise ConfigError(f"data.root {root}: no such folder of identity subfolders (and no RecordIO)")
        source: FaceSource = ImageFolderFaces(root, skip_hint=None)
        where = root
    else:
        source = RecordIOFaceSet(rec)
        where = rec
        check_identity_table(source)
    for key, configured, found in (
        ("data.num_classes", cfg.num_classes, source.num_identities),
        ("data.num_images", cfg.num_images, source.num_images),
    ):
        if configured is not None and configured != found:
            raise ConfigError(f"{key} is {configured} in the config, but {where} holds {found}")
    check_image_size(source, cfg.image_size, where)
    return source


def check_image_size(source: FaceSource, size: int, where: Path, sample: int = 8) -> None:
    """Refuse ``data.image_size`` when most of the first ``sample`` faces that decode have another size: then
    the setting, not a record, is wrong, and it is said before a model is built for it. A face of another size
    among faces of ``size`` is a bad record, left to ``data.bad_records``."""
    sizes: list[tuple[int, int]] = []
    first: dict[tuple[int, int], str] = {}
    for i in range(min(len(source), 2 * sample)):
        try:
            img = decode_rgb(source[i][0], describe(source, i))
        except (DecodeError, RecordIOError, OSError):
            continue  # a record for data.bad_records
        sizes.append((img.shape[1], img.shape[0]))
        first.setdefault(sizes[-1], describe(source, i))
        if len(sizes) == sample:
            break
    if 2 * sizes.count((size, size)) >= len(sizes):
        return
    (width, height), _ = Counter(sizes).most_common(1)[0]
    hint = f"set data.image_size: {width}" if width == height else "align the faces to squares"
    raise ConfigError(
        f"data.image_size is {size}, but {where} holds {width}x{height} images "
        f"({first[width, height]}); {hint}"
    )


def check_identity_table(faces: RecordIOFaceSet) -> None:
    """Refuse a rec whose identity table disagrees with its labels (a meta header announcing classes that
    have no record or no images, labels outside their class's range), naming the key, before a classifier
    is sized from it."""
    problems = faces.identity_problems(faces.labels())
    if problems:
        more = f" ({len(problems)} problems in all)" if len(problems) > 1 else ""
        raise RecordIOError(
            f"{problems[0]}{more}; `python -m data.recordio check {faces.rec_path}` lists every problem"
        )


def build_train_dataset(cfg: DataConfig, seed: int) -> FaceDataset:
    """The training images of ``cfg``; ``data.bad_records`` decides what a record that cannot be read or
    decoded does to the run (see :class:`data.bad_records.BadRecords`)."""
    transform = FaceTransform(cfg.augment, image_size=cfg.image_size, train=True, seed=seed)
    dataset = FaceDataset(open_train_source(cfg), transform)
    dataset.bad_records = BadRecords(cfg.bad_records, cfg.max_bad_records, root=cfg.root)
    return dataset
