"""Build the training dataset a config describes (RecordIO or image folder + augmentation)."""

from __future__ import annotations

from pathlib import Path

from core.config import DataConfig
from data.image_folder import ImageFolderFaces
from data.recordio import RecordIOFaceSet
from data.transforms import FaceDataset, FaceSource, FaceTransform


def open_train_source(cfg: DataConfig) -> FaceSource:
    """The images and labels of ``cfg.root``; ``num_classes``/``num_images`` in the config are checked."""
    if not cfg.root:
        raise ValueError("data.root is not set: give the folder of train.rec/train.idx or of the images")
    root = Path(cfg.root)
    if cfg.format == "rec":
        rec = root if root.suffix == ".rec" else root / "train.rec"
        source: FaceSource = RecordIOFaceSet(rec)
        where = rec
    else:
        source = ImageFolderFaces(root)
        where = root
    for key, configured, found in (
        ("data.num_classes", cfg.num_classes, source.num_identities),
        ("data.num_images", cfg.num_images, source.num_images),
    ):
        if configured is not None and configured != found:
            raise ValueError(f"{key} is {configured} in the config, but {where} holds {found}")
    return source


def build_train_dataset(cfg: DataConfig, seed: int) -> FaceDataset:
    transform = FaceTransform(cfg.augment, image_size=cfg.image_size, train=True, seed=seed)
    return FaceDataset(open_train_source(cfg), transform)
