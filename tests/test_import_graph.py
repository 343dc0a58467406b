"""The import graph keeps its layers: ``core/`` is plumbing that imports no model, dataset or evaluator; the
evaluation layer imports no benchmark; the benchmark folders never import each other; and no private name
(``_folds``) is imported across packages.

Every ``import`` and ``from ... import`` statement of the files is read with ``ast`` (those inside functions
too), so an import the code would only run on some path is caught as well.
"""

from __future__ import annotations

import ast
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Packages above core/: models, data, evaluation and the methods built on them.
NOT_FOR_CORE = ("backbones", "heads", "losses", "data", "evaluation", "objectives", "mining", "probface",
                "face_alignment")  # fmt: skip


def imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, module, imported names) of every absolute import in ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module, [alias.name for alias in node.names]))
    return found


def top(module: str) -> str:
    return module.split(".")[0]


def benchmark_folders() -> list[str]:
    return sorted(p.name for p in ROOT.glob("validation_*") if (p / "__init__.py").is_file())


def python_files(*folders: str) -> list[Path]:
    return sorted(f for folder in folders for f in (ROOT / folder).rglob("*.py"))


def refused(files: list[Path], forbidden: Callable[[Path, str], bool]) -> list[str]:
    out = []
    for path in files:
        rel = path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else path.name
        for line, module, _ in imports(path):
            if forbidden(path, top(module)):
                out.append(f"{rel}:{line} imports {module}")
    return out


def test_core_imports_no_models_data_or_evaluators():
    files = python_files("core")
    assert files, "no core/*.py found"
    bad = refused(files, lambda _, t: t in NOT_FOR_CORE or t.startswith("validation_"))
    assert not bad, "core/ must not import models, data or evaluators:\n" + "\n".join(bad)


def test_the_rule_catches_an_import_from_above(tmp_path):
    """The check itself: a core-like file importing a backbone inside a function is refused."""
    sneaky = tmp_path / "sneaky.py"
    sneaky.write_text(
        "import os\n\ndef build():\n    from backbones.iresnet import iresnet50\n", encoding="utf-8"
    )
    assert [(line, top(m)) for line, m, _ in imports(sneaky)] == [(1, "os"), (4, "backbones")]
    assert refused([sneaky], lambda _, t: t in NOT_FOR_CORE) == ["sneaky.py:4 imports backbones.iresnet"]


def test_evaluation_layer_imports_no_benchmark_or_method():
    bad = refused(
        python_files("evaluation"),
        lambda _, t: t.startswith("validation_") or t in ("probface", "objectives"),
    )
    assert not bad, "evaluation/ sits below the benchmark folders:\n" + "\n".join(bad)


@pytest.mark.parametrize("folder", benchmark_folders())
def test_benchmark_folders_do_not_import_each_other(folder):
    bad = refused(python_files(folder), lambda _, t: t.startswith("validation_") and t != folder)
    assert not bad, (
        f"{folder} imports another benchmark's code (shared code belongs in evaluation/):\n" + "\n".join(bad)
    )


def test_no_private_name_crosses_a_package():
    packages = sorted(p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file() and p.name != "tests")
    files = python_files(*packages) + sorted(ROOT.glob("*.py"))
    bad = []
    for path in files:
        own = path.relative_to(ROOT).parts[0]
        for line, module, names in imports(path):
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private and top(module) != own.removesuffix(".py"):
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {', '.join(private)} from {module}")
    assert not bad, "private names stay in their package (make shared ones public):\n" + "\n".join(bad)
