"""Class-id labels, checked the same way by every head and loss (one message for each fault)."""

from __future__ import annotations

import torch


def check_labels(
    owner: str,
    labels: torch.Tensor,
    num_classes: int | None = None,
    rows: int | None = None,
    rows_of: str = "embeddings",
) -> None:
    """Refuse labels that cannot be class ids of this batch, naming ``owner``: a dtype other than int64
    (``TypeError``); with ``rows``, a shape other than ``(rows,)`` (``rows_of`` names what the rows are);
    with ``num_classes``, a label outside ``[0, num_classes)`` (the first of the lowest or highest)."""
    if labels.dtype != torch.int64:
        raise TypeError(f"{owner}: labels must be int64 class ids, got {labels.dtype}")
    if rows is not None and labels.shape != (rows,):
        raise ValueError(f"{owner}: {tuple(labels.shape)} labels for {rows} {rows_of}")
    if num_classes is not None and labels.numel():
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= num_classes:
            raise ValueError(f"{owner}: label {low if low < 0 else high} outside [0, {num_classes})")
