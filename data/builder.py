"""Build the training dataset a config describes (RecordIO or image folder + augmentation)."""

from __future__ import annotations

from pathlib import Path

from core.config import ConfigError, DataConfig
from data.image_folder import ImageFolderFaces
from data.recordio import RecordIOFaceSet
from data.transforms import FaceDataset, FaceSource, FaceTransform


def find_recordio(root: Path) -> Path | None:
    """The ``.rec`` that ``root`` names: the file itself, the prefix ``root.rec``, or ``root/train.rec``."""
    for candidate in (root, root.with_name(root.name + ".rec"), root / "train.rec"):
        if candidate.suffix == ".rec" and candidate.is_file():
            return candidate
    return None


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
        source: FaceSource = ImageFolderFaces(root)
        where = root
    else:
        source = RecordIOFaceSet(rec)
        where = rec
    for key, configured, found in (
        ("data.num_classes", cfg.num_classes, source.num_identities),
        ("data.num_images", cfg.num_images, source.num_images),
    ):
        if configured is not None and configured != found:
            raise ConfigError(f"{key} is {configured} in the config, but {where} holds {found}")
    return source


def build_train_dataset(cfg: DataConfig, seed: int) -> FaceDataset:
    transform = FaceTransform(cfg.augment, image_size=cfg.image_size, train=True, seed=seed)
    return FaceDataset(open_train_source(cfg), transform)
