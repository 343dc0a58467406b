"""Where the real face data lives: one place for tests, benchmarks and the demo."""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DATA_ENV = "FACEREC_DATA"


def shared_data_dir() -> Path:
    """``$FACEREC_DATA`` if set, else ``../shared/data`` beside the project root."""
    env = os.environ.get(DATA_ENV)
    return Path(env) if env else PROJECT_ROOT.parent / "shared" / "data"
