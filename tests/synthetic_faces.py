"""Generated identity sets for training tests: each identity is a smooth random colour pattern, each of its
images a shifted, re-lit, noisy copy. A model that learns what stays the same within an identity tells
new identities apart too, so held-out verification accuracy measures learning, not memorisation."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from data.decode import encode_jpeg
from data.verification import write_bin


def identity_pattern(rng: np.random.Generator, size: int) -> np.ndarray:
    coarse = rng.uniform(70, 185, size=(4, 4, 3)).astype(np.float32)
    return cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)


def variant(pattern: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    dy, dx = rng.integers(-4, 5, size=2)
    img = np.roll(pattern, (int(dy), int(dx)), axis=(0, 1))
    img = img * rng.uniform(0.6, 1.4) + rng.uniform(-40, 40) + rng.normal(0, 20, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def write_identity_folder(
    root: Path, identities: int, per_identity: int, size: int = 32, seed: int = 0
) -> Path:
    """``root/id_XXX/N.jpg`` images of ``identities`` generated identities."""
    rng = np.random.default_rng(seed)
    for k in range(identities):
        pattern = identity_pattern(rng, size)
        folder = root / f"id_{k:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        for n in range(per_identity):
            (folder / f"{n}.jpg").write_bytes(encode_jpeg(variant(pattern, rng), quality=95))
    return root


def write_pairs_bin(path: Path, pairs: int, size: int = 32, seed: int = 1) -> Path:
    """A verification ``.bin`` of ``pairs`` pairs (half same-identity) of identities never trained on."""
    rng = np.random.default_rng(seed)
    images, issame = [], []
    for k in range(pairs):
        first = identity_pattern(rng, size)
        same = k % 2 == 0
        second = first if same else identity_pattern(rng, size)
        images += [
            encode_jpeg(variant(first, rng), quality=95),
            encode_jpeg(variant(second, rng), quality=95),
        ]
        issame.append(same)
    write_bin(path, images, issame)
    return path
