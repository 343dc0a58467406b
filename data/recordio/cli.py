"""The command line ``python -m data.recordio info|check|pack`` (see :mod:`data.recordio`)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from core.cli import run_json_command
from data.recordio.audit import check, info
from data.recordio.packer import pack_folder

DESCRIPTION = (
    "MXNet / InsightFace RecordIO (``.rec`` + ``.idx`` + ``.lst``): reader, writer and folder packer."
)


def _check_command(args: argparse.Namespace) -> int:
    """``check``: each problem on stderr as it is found, the JSON summary on stdout, then one closing line."""
    found: list[str] = []

    def show(problem: str) -> None:
        found.append(problem)
        print(problem, file=sys.stderr, flush=True)

    try:
        summary = check(args.path, args.idx, args.image_size or None, args.workers, args.allow_empty, show)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(json.dumps(summary))
    if found:
        print(f"error: {summary['path']}: {len(found)} problems; the first: {found[0]}", file=sys.stderr)
        return 1
    return 0


def _at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is less than {low}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    """``info PATH``, ``check PATH`` or ``pack IMAGE_FOLDER OUT_PREFIX``."""
    parser = argparse.ArgumentParser(prog="python -m data.recordio", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="describe a .rec/.idx pair (checks every record's header)")
    p_info.add_argument("rec", type=Path, help=".rec file, its prefix, or a folder holding train.rec")
    p_info.add_argument("--idx", type=Path, default=None, help="index file (default: beside the .rec)")
    p_check = sub.add_parser("check", help="decode every record and list every problem (exit 1 if any)")
    p_check.add_argument(
        "path", type=Path, help=".rec file, its prefix, a folder holding train.rec, or an image folder"
    )
    p_check.add_argument("--idx", type=Path, default=None, help="index file (default: beside the .rec)")
    p_check.add_argument(
        "--workers", type=_at_least(1), default=min(8, os.cpu_count() or 1), help="processes"
    )
    p_check.add_argument(
        "--image-size", type=_at_least(0), default=112, help="side of the stored faces (0: any size)"
    )
    p_check.add_argument("--allow-empty", action="store_true", help="skip identity folders without images")
    p_pack = sub.add_parser("pack", help="pack <root>/<identity>/<image> into OUT.rec/.idx/.lst")
    p_pack.add_argument("folder", type=Path)
    p_pack.add_argument("out_prefix", type=Path)
    p_pack.add_argument(
        "--quality", type=_at_least(1), default=95, help="JPEG quality (1-100) for re-encoded images"
    )
    p_pack.add_argument("--image-size", type=_at_least(1), default=112, help="side of the aligned faces")
    p_pack.add_argument("--resize", action="store_true", help="scale square images of another size")
    p_pack.add_argument("--allow-empty", action="store_true", help="skip identity folders without images")
    p_pack.add_argument("--overwrite", action="store_true", help="replace an existing OUT.rec/.idx/.lst")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The command line of :func:`build_parser`; prints JSON."""
    args = build_parser().parse_args(argv)
    if args.command == "info":
        return run_json_command(lambda: info(args.rec, args.idx))
    if args.command == "check":
        return _check_command(args)
    if args.quality > 100:
        print(f"error: --quality {args.quality}: JPEG quality is 1 to 100", file=sys.stderr)
        return 1
    return run_json_command(
        lambda: pack_folder(
            args.folder,
            args.out_prefix,
            args.quality,
            args.image_size,
            args.resize,
            args.allow_empty,
            overwrite=args.overwrite,
            skip_hint="--allow-empty",
        )
    )
