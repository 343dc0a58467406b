from __future__ import annotations

import os
from pathlib import Path

import pytest

from core.paths import DATA_ENV, shared_data_dir

REQUIRE_ENV = "FACEREC_REQUIRE_DATA"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real face data folder; skips without it, fails instead when $FACEREC_REQUIRE_DATA=1 (CI)."""
    root = shared_data_dir()
    if not root.is_dir():
        reason = f"real face data not found at {root} (set ${DATA_ENV})"
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    return root
