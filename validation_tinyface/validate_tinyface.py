"""TinyFace closed-set identification under the name of AdaFace's script (``validate_tinyface.py``), so
that its command lines keep working:

    python validation_tinyface/validate_tinyface.py --data_root DATA_ROOT --model CKPT_OR_ONNX
    python -m validation_tinyface.validate_tinyface --data_root DATA_ROOT --model CKPT_OR_ONNX

Both run :mod:`validation_tinyface.evaluate` (the options, the protocol and the output are described there).
Run as a file, Python puts this folder rather than the repository on the import path, so the file starts the
module form instead: the same interpreter, arguments and working directory, with the repository added to
``PYTHONPATH`` as the ``eval_*.sh`` launchers add it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def run_as_module() -> None:
    """Replace this process by ``python -m validation_tinyface.validate_tinyface`` with the same arguments,
    the repository on ``PYTHONPATH``."""
    root = str(Path(__file__).resolve().parent.parent)
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    safe = ["-P"] if sys.version_info >= (3, 11) else []  # the repository's modules, not the working folder's
    argv = [sys.executable, *safe, "-m", "validation_tinyface.validate_tinyface", *sys.argv[1:]]
    os.execve(sys.executable, argv, {**os.environ, "PYTHONPATH": path})


if __name__ == "__main__" and not __package__:
    run_as_module()

from validation_tinyface.evaluate import build_parser, evaluate_tinyface, main  # noqa: E402

__all__ = ["build_parser", "evaluate_tinyface", "main"]

if __name__ == "__main__":
    sys.exit(main())
