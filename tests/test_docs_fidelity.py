"""docs/fidelity.md names, for every departure from a seed or peer, the test that holds it: each named test
must exist, so the table cannot point to a test that was renamed or removed."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIDELITY = ROOT / "docs" / "fidelity.md"
COLUMNS = ["component", "seed/peer behaviour (with file)", "ours", "why", "measured effect", "test"]


def table_rows(text: str) -> list[list[str]]:
    rows = []
    for line in text.splitlines():
        if line.startswith("|") and not line.startswith("|---"):
            rows.append([cell.strip() for cell in line.strip().strip("|").split(" | ")])
    return rows


def cited_tests(cell: str) -> list[tuple[str, str]]:
    """(file, test name) of every `tests/x.py::name` and of every following bare `::name` in a cell."""
    cited, current = [], None
    for path, name in re.findall(r"`(tests/[\w/]+\.py)?::(\w+)", cell):
        current = path or current
        assert current, f"test {name!r} is cited without a file: {cell[:120]}"
        cited.append((current, name))
    return cited


def defined_tests(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)}


def test_every_row_has_the_six_columns_and_a_test():
    rows = table_rows(FIDELITY.read_text(encoding="utf-8"))
    headers = [row for row in rows if row[0] == "component"]
    body = [row for row in rows if row[0] != "component"]
    assert headers and all(h == COLUMNS for h in headers)
    assert len(body) >= 20
    for row in body:
        assert len(row) == len(COLUMNS), f"row {row[0]!r} has {len(row)} cells"
        assert row[5] and row[4], f"row {row[0]!r} lacks a measured effect or a test"


def test_every_cited_test_exists():
    missing, count = [], 0
    for row in table_rows(FIDELITY.read_text(encoding="utf-8")):
        for path, name in cited_tests(row[-1]):
            count += 1
            file = ROOT / path
            if not file.is_file() or name not in defined_tests(file):
                missing.append(f"{path}::{name}")
    assert count >= 20
    assert not missing, f"docs/fidelity.md cites tests that do not exist: {missing}"


def test_a_missing_test_is_noticed():
    cell = "`tests/test_heads.py::no_such_test_anywhere`, `::test_centre_init_can_be_chosen`"
    found = cited_tests(cell)
    assert found == [
        ("tests/test_heads.py", "no_such_test_anywhere"),
        ("tests/test_heads.py", "test_centre_init_can_be_chosen"),
    ]
    assert "no_such_test_anywhere" not in defined_tests(ROOT / "tests/test_heads.py")
