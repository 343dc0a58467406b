"""Data readers, writers, datasets and augmentations."""
