"""Shared shape of the data command-line tools: run one action, print its JSON result or the error."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any


def run_json_command(action: Callable[[], Any]) -> int:
    """Print ``action()``'s result as one JSON line (exit 0), or its error on stderr (exit 1)."""
    try:
        result = action()
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(json.dumps(result))
    return 0
