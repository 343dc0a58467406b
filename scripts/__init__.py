"""Command-line tools: benchmarks, dataset preparation, export. Run them as ``python -m scripts.NAME``."""
