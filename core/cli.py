"""Shared shape of the command-line entry points: one clear line for every error, and JSON results.

:func:`main_guard` wraps an entry point's ``main(argv)`` so that a file-system error from anywhere in it (a
missing or unreadable input, a read-only or full output folder, a path under a file) ends as one line on
stderr naming the path and the system's reason, with exit status 1, instead of a traceback. Errors about
the user's input that a ``main`` words itself keep their own line and status.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from core.fileio import WriteError, describe_os_error, os_error_in

Main = Callable[..., "int | None"]


def main_guard(prog: str) -> Callable[[Main], Main]:
    """Decorate ``main(argv=None)``: an ``OSError``, or an error caused by one (``torch.save`` reports a
    full disk as a RuntimeError over the ENOSPC), prints ``prog: PATH: reason`` and returns 1."""

    def wrap(main: Main) -> Main:
        @functools.wraps(main)
        def guarded(argv: Sequence[str] | None = None) -> int | None:
            try:
                return main(argv)
            except Exception as err:
                cause = os_error_in(err)
                if cause is None:
                    raise
                print(f"{prog}: {describe_os_error(cause)}", file=sys.stderr)
                return 1

        return guarded

    return wrap


def check_writable(path: str | os.PathLike[str]) -> None:
    """Raise :class:`~core.fileio.WriteError` now, before any work, when ``path`` could not be written at the
    end: a folder in its place, a file where one of its folders should be, or a nearest existing folder
    that this process may not write (read-only file system, no permission)."""
    path = Path(path)
    if path.is_dir():
        raise WriteError(path, OSError(errno.EISDIR, os.strerror(errno.EISDIR)), "a folder is in its place")
    folder = next((p for p in path.parents if p.exists()), Path("."))
    if not folder.is_dir():
        raise WriteError(
            path, OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR)), f"{folder} is a file, not a folder"
        )
    if not os.access(folder, os.W_OK | os.X_OK):
        code = errno.EROFS if os.statvfs(folder).f_flag & os.ST_RDONLY else errno.EACCES
        raise WriteError(path, OSError(code, os.strerror(code)), f"{os.strerror(code)} ({folder})")


def error_line(err: BaseException) -> str:
    """The one line an entry point prints for ``err``: "PATH: reason" for a file-system error, else its
    message."""
    return describe_os_error(err) if isinstance(err, OSError) else str(err)


def run_json_command(action: Callable[[], Any]) -> int:
    """Print ``action()``'s result as one JSON line (exit 0), or its error on stderr (exit 1)."""
    try:
        result = action()
    except (OSError, ValueError) as err:
        print(f"error: {error_line(err)}", file=sys.stderr)
        return 1
    print(json.dumps(result))
    return 0
