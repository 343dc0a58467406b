"""docs/methods.md is the framework's methods reference: every citation of it must resolve to a section,
and no file may cite the external spec it replaces."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
METHODS = ROOT / "docs" / "methods.md"
# Built from pieces so that this file neither cites the old spec nor holds citations of its own.
OLD_TOKEN = "SP" + "EC"
OLD_REFERENCE = re.compile(rf"\b{OLD_TOKEN}\b")
CITE = "docs/" + "methods.md"
# Never scanned: the environment, git's store, caches and run outputs (the .gitignore'd folders).
SKIP_DIRS = {
    ".git",
    ".venv",
    "__pycache__",
    ".pytest_cache",
    ".ruff_cache",
    ".mypy_cache",
    "work_dirs",
    "runs",
}
HEADING = re.compile(r"^#{1,6}\s+(\d+(?:\.\d+)?)\s", re.MULTILINE)
# The path followed by one or more section numbers, each with its own sign: "§a.b", "§a.b, §c.d",
# "§a.b-§c.d", "§a and §b" (see test_citation_parsing_takes_every_number_after_the_path).
CITATION = re.compile(r"docs/methods\.md((?:(?:\s*(?:,|-|–|and|or|to)\s*|\s+)§\s*\d+(?:\.\d+)*)+)")
SECTION_NUMBER = re.compile(r"§\s*(\d+(?:\.\d+)*)")


def repository_files(root: Path) -> list[Path]:
    """The files of the working tree: tracked and untracked-but-not-ignored ones when ``root`` is a git
    checkout, otherwise every file outside :data:`SKIP_DIRS`."""
    try:
        listed = subprocess.run(
            ["git", "-C", str(root), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            capture_output=True,
            check=True,
        ).stdout
        top = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--show-toplevel"],
            capture_output=True,
            check=True,
            text=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        listed, top = None, ""
    if listed is not None and Path(top).resolve() == root.resolve():
        files = [root / name for name in listed.decode().split("\0") if name]
    else:
        files = [
            path
            for path in root.rglob("*")
            if path.is_file() and not SKIP_DIRS.intersection(path.relative_to(root).parts)
        ]
    return sorted(p for p in files if p.is_file() and not SKIP_DIRS.intersection(p.relative_to(root).parts))


def text_of(path: Path) -> str | None:
    """The file as text, or None for a binary file (NUL bytes or not UTF-8)."""
    data = path.read_bytes()
    if b"\0" in data[:8192]:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def old_reference_hits(root: Path) -> list[str]:
    """``path:line: text`` of every line that cites the old external spec."""
    hits = []
    for path in repository_files(root):
        text = text_of(path)
        if text is None:
            continue
        for lineno, line in enumerate(text.splitlines(), start=1):
            if OLD_REFERENCE.search(line):
                hits.append(f"{path.relative_to(root)}:{lineno}: {line.strip()}")
    return hits


def section_numbers(methods_text: str) -> set[str]:
    """Numbers of the numbered headings of the methods reference (``## 3.11 ProbFace`` -> ``3.11``)."""
    return set(HEADING.findall(methods_text))


def cited_sections(text: str) -> list[tuple[int, str]]:
    """``(line, section number)`` of every ``docs/methods.md §x.y`` citation in ``text``."""
    found = []
    for match in CITATION.finditer(text):
        lineno = text.count("\n", 0, match.start()) + 1
        found.extend((lineno, number) for number in SECTION_NUMBER.findall(match.group(1)))
    return found


def dangling_citations(root: Path, sections: set[str]) -> list[str]:
    """``path:line: §x.y`` of every citation whose section the methods reference does not have."""
    bad = []
    for path in repository_files(root):
        text = text_of(path)
        if text is None:
            continue
        for lineno, number in cited_sections(text):
            if number not in sections:
                bad.append(f"{path.relative_to(root)}:{lineno}: docs/methods.md §{number}")
    return bad


# ------------------------------------------------------------------------------------- the repository


def test_no_file_cites_the_old_external_spec():
    hits = old_reference_hits(ROOT)
    assert not hits, "cite docs/methods.md §x.y instead:\n" + "\n".join(hits)


def test_every_methods_citation_points_to_an_existing_section():
    sections = section_numbers(METHODS.read_text(encoding="utf-8"))
    bad = dangling_citations(ROOT, sections)
    assert not bad, "no such section in docs/methods.md:\n" + "\n".join(bad)


def test_the_code_cites_the_methods_reference():
    """The reference is what the code's citations point to: they exist and they are found."""
    cited = {n for p in repository_files(ROOT) if (t := text_of(p)) for _, n in cited_sections(t)}
    assert {"1.4", "2.1", "3.7", "3.11", "3.12", "5.2", "5.3", "6"} <= cited


def test_internal_references_of_the_methods_reference_exist():
    text = METHODS.read_text(encoding="utf-8")
    sections = section_numbers(text)
    missing = sorted({n for n in SECTION_NUMBER.findall(text) if n not in sections})
    assert not missing, f"docs/methods.md refers to sections it does not have: {missing}"


def test_methods_reference_has_the_numbered_sections():
    sections = section_numbers(METHODS.read_text(encoding="utf-8"))
    expected = {"1", "2", "3", "4", "5", "6"}
    expected |= {f"1.{i}" for i in range(1, 5)} | {f"2.{i}" for i in range(1, 5)}
    expected |= {f"3.{i}" for i in range(1, 13)} | {f"5.{i}" for i in range(1, 8)}
    assert expected <= sections, f"missing sections: {sorted(expected - sections)}"


def test_readme_links_the_methods_reference():
    assert "(docs/methods.md)" in (ROOT / "README.md").read_text(encoding="utf-8")


# ----------------------------------------------------------------------- the checks catch what they should


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "methods.md").write_text("# 3 Heads\n\n## 3.1 CosFace\n\n## 3.12 Partial FC\n")
    (tmp_path / "pkg").mkdir()
    return tmp_path


def test_a_file_citing_the_old_spec_is_reported(tree: Path):
    token = OLD_TOKEN
    (tree / "pkg" / "good.py").write_text(f'"""CosFace ({CITE} §3.1)."""\nspecs = 1\n')
    assert old_reference_hits(tree) == []
    (tree / "pkg" / "head.py").write_text(f'"""CosFace ({token} §3.1)."""\n')
    (tree / "notes.md").write_text(f"as the {token} says\n")
    # ignored folders are not part of the repository
    (tree / ".venv").mkdir()
    (tree / ".venv" / "lib.py").write_text(f"# {token}\n")
    assert old_reference_hits(tree) == [
        f"notes.md:1: as the {token} says",
        f'pkg/head.py:1: """CosFace ({token} §3.1)."""',
    ]


def test_a_citation_of_a_missing_section_is_reported(tree: Path):
    sections = section_numbers((tree / "docs" / "methods.md").read_text())
    assert sections == {"3", "3.1", "3.12"}
    (tree / "pkg" / "ok.py").write_text(f"# {CITE} §3.1, §3.12 and {CITE} §3\n")
    assert dangling_citations(tree, sections) == []
    (tree / "pkg" / "bad.py").write_text(f"x = 1\n# Partial FC ({CITE} §3.1-§3.13)\n")
    assert dangling_citations(tree, sections) == [f"pkg/bad.py:2: {CITE} §3.13"]


def test_citation_parsing_takes_every_number_after_the_path():
    text = f"a ({CITE} §3.7, §3.9)\nb {CITE} §3.1-§3.7\nc {CITE} §4 and §6; §9 is prose"
    assert cited_sections(text) == [(1, "3.7"), (1, "3.9"), (2, "3.1"), (2, "3.7"), (3, "4"), (3, "6")]
