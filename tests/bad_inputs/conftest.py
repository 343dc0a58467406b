"""Shared checks of the bad-input catalogue: each case runs a real command on a bad input and expects one
clear line on stderr naming what is wrong and where, a non-zero exit, no traceback, and every file
written before left byte for byte as it was.

Two ways to run a command: ``call_main`` calls an entry point's ``main(argv)`` in this process (fast; a
``SystemExit`` from argparse counts as its exit code), ``run_command`` starts it as a subprocess (for what
needs a process of its own: torchrun, signals, module-level behaviour).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Outcome:
    code: int
    out: str
    err: str

    @property
    def last_error_line(self) -> str:
        lines = [line for line in self.err.splitlines() if line.strip()]
        return lines[-1] if lines else ""


def call_main(main: Callable[[Sequence[str]], int | None], argv: Sequence[str], capsys) -> Outcome:
    """``main(argv)`` in this process; its return value or ``SystemExit`` code, with what it printed."""
    capsys.readouterr()
    try:
        code = main(list(argv))
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    captured = capsys.readouterr()
    return Outcome(int(code or 0), captured.out, captured.err)


def run_command(
    argv: Sequence[str], cwd: Path = ROOT, env: dict | None = None, timeout: float = 300
) -> Outcome:
    """``argv`` as a subprocess with the repository on PYTHONPATH (``python`` means this interpreter)."""
    argv = [sys.executable if a == "python" else str(a) for a in argv]
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    proc = subprocess.run(argv, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
    return Outcome(proc.returncode, proc.stdout, proc.stderr)


def assert_refused(outcome: Outcome, *fragments: str) -> None:
    """Non-zero exit, no traceback, and the last stderr line names every fragment (case-insensitive)."""
    shown = f"exit {outcome.code}\n--- stdout\n{outcome.out[-2000:]}\n--- stderr\n{outcome.err[-4000:]}"
    assert outcome.code != 0, f"accepted silently:\n{shown}"
    assert "Traceback" not in outcome.err + outcome.out, f"raw traceback:\n{shown}"
    line = outcome.last_error_line.lower()
    missing = [f for f in fragments if f.lower() not in line]
    assert not missing, f"the error line does not name {missing}:\n{shown}"


def digest(paths: Iterable[Path]) -> dict[str, str]:
    """md5 of every file under ``paths`` (files or folders), keyed by path."""
    result = {}
    for path in paths:
        path = Path(path)
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for f in files:
            result[str(f)] = hashlib.md5(f.read_bytes()).hexdigest()
    return result


@pytest.fixture
def unchanged():
    """``with unchanged(paths): ...`` asserts that the files under ``paths`` are byte-identical afterwards
    (none added, removed or changed)."""
    from contextlib import contextmanager

    @contextmanager
    def check(*paths: Path):
        before = digest(paths)
        yield
        after = digest(paths)
        changed = sorted(set(before.items()) ^ set(after.items()))
        assert after == before, f"files written before were changed: {changed}"

    return check
