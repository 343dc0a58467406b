"""Moved to evaluation/ (kept for train.py until it imports evaluation): evaluation.extract."""

from evaluation.extract import ImageFiles, extract, extract_dataset, extract_files  # noqa: F401
