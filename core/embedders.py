"""Moved to evaluation/ (kept for train.py until it imports evaluation): its embedders and options."""

from evaluation.embedders import OnnxEmbedder, TorchEmbedder, embedder_key, load_embedder  # noqa: F401
from evaluation.options import add_embedder_arguments, embedder_from_args, run_settings, settings_line  # noqa: F401
