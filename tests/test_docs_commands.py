"""The commands the documentation shows are accepted by the code they name.

Every command of the ```bash blocks of README.md, README_TRAIN.md and docs/*.md, and every inline code span
that starts with a program (``python``, ``bash``, ``make``, ``torchrun`` or a ``.sh`` launcher), is checked
without training or evaluating anything:

* ``python -m pkg.mod ARGS`` / ``python path/to/file.py ARGS``: ARGS are parsed by the entry point's own
  argparse parser (``build_parser()``, else the parser its ``parse_args``/``main`` builds), so an unknown
  option, a missing or an extra positional argument, a wrong choice or a wrong number is an error;
* ``torchrun OPTIONS train.py ARGS``: OPTIONS by torchrun's parser, ARGS by train.py's;
* ``bash LAUNCHER ARGS`` (with its ``VAR=value`` prefix): a copy of the launchers runs with a stand-in
  interpreter that records the command it would have run, which is then checked as above; a launcher
  that refuses its arguments (usage, exit status 2) is an error;
* ``make TARGET VAR=value``: the target must exist and use the variables, and the framework commands
  ``make -n`` prints are checked as above;
* every ``configs/*.yaml`` named must exist.

Placeholders: ``[...]`` groups are optional, so each command is checked with all of them and with none;
``a|b`` is checked once per alternative; a placeholder that the code looks up (``RECIPE``) is replaced by
an example. An inline span may be a fragment that names a tool in the prose (``python -m probface.risk``
gives ...): its missing required arguments are not an error, but its options must exist.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import io
import itertools
import os
import re
import shlex
import shutil
import subprocess
import textwrap
from pathlib import Path
from unittest import mock

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", ROOT / "README_TRAIN.md", *sorted((ROOT / "docs").glob("*.md"))]
PROGRAMS = ("python", "python3", "bash", "make", "torchrun")
NOT_OURS = ("cd", "export", "git", "pip", "tensorboard")  # programs a bash block may show unchecked
ENV_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=")
CONFIG = re.compile(r"configs/[\w./-]+\.ya?ml")
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.S | re.M)
EXAMPLES = {"RECIPE": "arcface"}  # placeholders whose value the code looks up
MISSING = "the following arguments are required"


# -------------------------------------------------------------------------------------- extraction


def split_env(tokens: list[str]) -> tuple[dict[str, str], list[str]]:
    """``A=1 B=2 prog args`` -> ({A: 1, B: 2}, [prog, args])."""
    env: dict[str, str] = {}
    while tokens and ENV_WORD.match(tokens[0]):
        key, value = tokens[0].split("=", 1)
        env[key] = value
        tokens = tokens[1:]
    return env, tokens


def is_command(tokens: list[str]) -> bool:
    _, words = split_env(tokens)
    return bool(words) and (words[0] in PROGRAMS or words[0].endswith(".sh"))


def commands_in(text: str) -> list[tuple[int, str, bool]]:
    """(line number, command, is an inline fragment) of a Markdown text: each logical line of its ```bash
    blocks (continuations joined, comments dropped) and each inline code span of two or more words that
    starts with a program."""
    found = []
    for block in FENCE.finditer(text):
        if block.group(1) not in ("bash", "sh", "shell", "console"):
            continue
        first = text.count("\n", 0, block.start(2)) + 1
        pending, start = "", first
        for offset, line in enumerate(block.group(2).splitlines()):
            if not pending:
                start = first + offset
            if line.rstrip().endswith("\\") and not line.lstrip().startswith("#"):
                pending += line.rstrip()[:-1] + " "
                continue
            command, pending = (pending + line).strip(), ""
            if command and not command.startswith("#"):
                found.append((start, command, False))
    prose = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    for span in re.finditer(r"(?<!`)`([^`]+)`(?!`)", prose):
        words = span.group(1).split()
        if len(words) > 1 and is_command(words):
            found.append((text.count("\n", 0, span.start()) + 1, " ".join(words), True))
    return found


def variants(command: str) -> list[list[str]]:
    """The argument lists a documented command stands for: its ``[optional]`` groups all given and all
    left out, and each alternative of an ``a|b`` word."""
    items: list[tuple[str, int]] = []  # (word, bracket depth)
    depth = 0
    for word in shlex.split(command, comments=True):
        word = EXAMPLES.get(word, word)
        opened = len(word) - len(word.lstrip("["))
        depth += opened
        word = word[opened:]
        closed = min(len(word) - len(word.rstrip("]")), depth) if opened or depth else 0
        if word:
            items.append((word[: len(word) - closed] if closed else word, depth))
        depth -= closed
    forms = [[w for w, _ in items], [w for w, d in items if d == 0]]
    out = []
    for form in forms:
        choices = [w.split("|") if "|" in w and not w.startswith("-") else [w] for w in form]
        for argv in itertools.product(*choices):
            if list(argv) not in out:
                out.append(list(argv))
    return out


def documented() -> list[tuple[str, str, bool]]:
    return [
        (f"{doc.relative_to(ROOT)}:{line}", command, fragment)
        for doc in DOCS
        for line, command, fragment in commands_in(doc.read_text(encoding="utf-8"))
    ]


# ---------------------------------------------------------------------------------------- checking


class _Built(BaseException):  # BaseException: passes through an entry point's `except Exception`
    def __init__(self, parser: argparse.ArgumentParser):
        self.parser = parser


def framework_module(name: str) -> bool:
    top = name.split(".")[0]
    return (ROOT / top / "__init__.py").is_file() or (ROOT / f"{top}.py").is_file()


@functools.cache
def parser_of(module_name: str) -> argparse.ArgumentParser:
    """The entry point's argparse parser: ``build_parser()``, else the one its ``parse_args(argv)`` or
    ``main(argv)`` builds (caught as it starts parsing, so nothing runs)."""
    module = importlib.import_module(module_name)
    if hasattr(module, "build_parser"):
        return module.build_parser()
    entry = getattr(module, "parse_args", None) or getattr(module, "main", None)
    if entry is None:
        raise AssertionError(f"{module_name} has no command line (build_parser, parse_args or main)")

    def built(self, *args, **kwargs):
        raise _Built(self)

    with mock.patch.object(argparse.ArgumentParser, "parse_args", built):
        try:
            try:
                entry([])
            except TypeError:
                entry()
        except _Built as caught:
            return caught.parser
    raise AssertionError(f"{module_name}: its command line parses no arguments with argparse")


def parse(
    parser: argparse.ArgumentParser, argv: list[str], what: str, fragment: bool = False
) -> tuple[argparse.Namespace | None, list[str]]:
    """Parse like the command line would; a refusal becomes a problem naming the command and argparse's
    message. A fragment may leave required arguments out, but each of its options must exist."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            return parser.parse_args(argv), []
    except SystemExit as exc:
        message = err.getvalue().strip().splitlines()
        message = re.sub(r"^.*?: error: ", "", message[-1]) if message else f"exit status {exc.code}"
        if fragment and MISSING in message:
            return None, [f"{what} {shlex.join(argv)}: no option {w}" for w in unknown_options(parser, argv)]
        return None, [f"{what} {shlex.join(argv)}: {message}"]


def unknown_options(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """The words of ``argv`` that look like options and are options of neither the parser nor the
    sub-command named in ``argv``."""
    known = set(parser._option_string_actions)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for word in argv:
                if word in action.choices:
                    known |= set(action.choices[word]._option_string_actions)
    return [w for w in argv if re.match(r"--?[A-Za-z]", w) and w.split("=")[0] not in known]


def check_python(argv: list[str], fragment: bool = False) -> list[str]:
    """``python`` arguments: ``-m module ARGS`` or ``file.py ARGS``."""
    if argv[:1] == ["-m"] and len(argv) > 1:
        module, rest = argv[1], argv[2:]
    elif argv and argv[0].endswith(".py"):
        if not (ROOT / argv[0]).is_file():
            return [f"python {argv[0]}: no such file in the repository"]
        module, rest = ".".join(Path(argv[0]).with_suffix("").parts), argv[1:]
    else:
        return [f"python {shlex.join(argv)}: neither -m MODULE nor a .py file"]
    if module == "torch.distributed.run":
        return check_torchrun(rest, fragment)
    if not framework_module(module):
        return [f"python -m {module}: not a module of the framework"]
    return parse(parser_of(module), rest, f"python -m {module}", fragment)[1]


def check_torchrun(argv: list[str], fragment: bool = False) -> list[str]:
    from torch.distributed.run import get_args_parser

    args, problems = parse(get_args_parser(), argv, "torchrun")
    if args is None:
        return problems
    script = ["-m", args.training_script] if args.module else [args.training_script]
    return check_python([*script, *args.training_script_args], fragment)


def check_make(argv: list[str], env: dict[str, str]) -> list[str]:
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    targets = set(re.findall(r"^([\w.-]+)\s*:(?!=)", makefile, re.M))
    variables = set(re.findall(r"\$\((\w+)\)", makefile)) | set(
        re.findall(r"^(\w+)\s*[?:+]?=", makefile, re.M)
    )
    words = [w for w in argv if not w.startswith("-")]
    assigned = {**env, **dict(w.split("=", 1) for w in words if ENV_WORD.match(w))}
    problems = [f"make: no target {t!r} in the Makefile" for t in words if "=" not in t and t not in targets]
    problems += [f"make: the Makefile does not use {v}" for v in assigned if v not in variables]
    if problems or shutil.which("make") is None:  # without make, the Makefile's text is all there is to check
        return problems
    dry = subprocess.run(["make", "-n", "-s", "-C", str(ROOT), *argv], env={**os.environ, **env},
                         capture_output=True, text=True, check=False)  # fmt: skip
    if dry.returncode:
        return [f"make {shlex.join(argv)}: {dry.stderr.strip()}"]
    for line in dry.stdout.replace("\\\n", " ").splitlines():
        words = shlex.split(line)
        if "-m" in words:
            at = words.index("-m")
            if at + 1 < len(words) and framework_module(words[at + 1]):
                problems += check_python(words[at:])
    return problems


STAND_IN = """#!/usr/bin/env bash
# Stands in for the interpreter: records the command a launcher would run.
if [[ ${1-} == -c ]]; then  # a launcher's inline Python (train_probface.sh reads the checkpoint's metadata)
    echo "model.backbone=r100 model.embedding_size=512 model.input_size=112 data.color=rgb"
    exit 0
fi
printf '%s\\0' "$@" > "$FACEREC_ARGV_DIR/$(ls "$FACEREC_ARGV_DIR" | wc -l)"
"""


def check_launcher(script: str, argv: list[str], env: dict[str, str], sandbox: Path) -> list[str]:
    """Run the sandbox's copy of the launcher with the stand-in interpreter; check what it would run."""
    if not (ROOT / script).is_file():
        return [f"{script}: no such launcher in the repository"]
    launchers = "\n".join(f.read_text() for f in sandbox.rglob("*.sh"))
    unread = [
        f"{script}: no launcher reads {name}" for name in env if not re.search(rf"\$\{{?{name}\b", launchers)
    ]
    if unread:
        return unread
    records = sandbox / "argv" / str(len(list((sandbox / "argv").iterdir())))
    records.mkdir()
    base = {k: os.environ[k] for k in ("PATH", "HOME", "LANG", "TMPDIR") if k in os.environ}
    proc = subprocess.run(
        ["bash", str(sandbox / script), *argv], cwd=sandbox, capture_output=True, text=True, check=False,
        env={**base, **env, "PYTHON": str(sandbox / "python"), "FACEREC_ARGV_DIR": str(records)},
    )  # fmt: skip
    if proc.returncode:
        return [f"{script} {shlex.join(argv)}: exit status {proc.returncode}: {proc.stderr.strip()[:300]}"]
    runs = [f.read_text().split("\0")[:-1] for f in sorted(records.iterdir())]
    if not runs:
        return [f"{script} {shlex.join(argv)}: ran no Python"]
    return [problem for run in runs for problem in [*missing_configs(run), *check_python(run)]]


def missing_configs(words: list[str]) -> list[str]:
    return [f"{c}: no such config" for w in words for c in CONFIG.findall(w) if not (ROOT / c).is_file()]


def check_command(command: str, sandbox: Path, fragment: bool = False) -> list[str]:
    """Every problem of a documented command, over all of its variants."""
    problems: list[str] = []
    for words in variants(command):
        env, words = split_env(words)
        problems += missing_configs([*env.values(), *words])
        program, argv = words[0], words[1:]
        if program in ("python", "python3"):
            problems += check_python(argv, fragment)
        elif program == "torchrun":
            problems += check_torchrun(argv, fragment)
        elif program == "make":
            problems += check_make(argv, env)
        elif program == "bash" and argv:
            problems += check_launcher(argv[0], argv[1:], env, sandbox)
        elif program.endswith(".sh"):
            problems += check_launcher(program, argv, env, sandbox)
        elif program not in NOT_OURS:
            problems.append(f"{program}: not a command this test knows how to check")
    return list(dict.fromkeys(problems))


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory) -> Path:
    """A copy of the launchers and configs (a launcher writes nothing into the repository) and the
    stand-in interpreter."""
    box = tmp_path_factory.mktemp("launchers")
    for script in [*ROOT.glob("scripts/*.sh"), *ROOT.glob("validation_*/*.sh")]:
        (box / script.relative_to(ROOT)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(script, box / script.relative_to(ROOT))
    shutil.copytree(ROOT / "configs", box / "configs")
    (box / "python").write_text(STAND_IN)
    (box / "python").chmod(0o755)
    (box / "argv").mkdir()
    return box


# ------------------------------------------------------------------------------------------- tests

COMMANDS = documented()


def test_the_documentation_shows_commands():
    where = {place.split(":")[0] for place, _, _ in COMMANDS}
    assert {"README.md", "README_TRAIN.md", "docs/evaluation.md"} <= where
    assert len(COMMANDS) > 40


@pytest.mark.parametrize(("place", "command", "fragment"), COMMANDS, ids=[p for p, _, _ in COMMANDS])
def test_documented_command_is_accepted(place, command, fragment, sandbox):
    assert check_command(command, sandbox, fragment) == [], f"{place}: {command}"


def test_extraction_of_blocks_and_inline_commands():
    text = textwrap.dedent(
        """\
        Run `make demo CONFIG=configs/x.yaml
        DEMO_DIR=d` or `scripts/` (a path, not a command).

        ```bash
        # a comment
        OUT=r.json bash validation_hq/eval_hq.sh M BINS   # trailing comment
        python -m validation_ijb.evaluate --model M \\
            --ijb-root R --dataset ijbc
        ```

        ```python
        python = "not a command"
        ```
        """
    )
    assert commands_in(text) == [
        (6, "OUT=r.json bash validation_hq/eval_hq.sh M BINS   # trailing comment", False),
        (7, "python -m validation_ijb.evaluate --model M      --ijb-root R --dataset ijbc", False),
        (1, "make demo CONFIG=configs/x.yaml DEMO_DIR=d", True),
    ]
    assert variants("bash a.sh M [OUT] [--color bgr] x|y") == [
        ["bash", "a.sh", "M", "OUT", "--color", "bgr", "x"],
        ["bash", "a.sh", "M", "OUT", "--color", "bgr", "y"],
        ["bash", "a.sh", "M", "x"],
        ["bash", "a.sh", "M", "y"],
    ]
    assert variants("python train.py --set data.val_targets=[lfw]") == [
        ["python", "train.py", "--set", "data.val_targets=[lfw]"]
    ]


def test_readme_layout_table_names_every_top_level_part():
    """Every tracked top-level folder and Python/Make file is in the README's layout table, and everything
    the table names exists."""
    section = (ROOT / "README.md").read_text(encoding="utf-8").split("## Layout", 1)[1].split("\n## ", 1)[0]
    named = {
        n
        for row in section.splitlines()
        if row.startswith("| `")
        for n in re.findall(r"`([^`]+)`", row.split("|")[1])
    }
    assert named and all((ROOT / n).exists() for n in named), named
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=False)
    if tracked.returncode:
        pytest.skip(f"not a git checkout: {tracked.stderr.strip()}")
    top = {f.split("/")[0] + ("/" if "/" in f else "") for f in tracked.stdout.splitlines()}
    parts = {n for n in top if not n.startswith(".") and (n.endswith(("/", ".py")) or n == "Makefile")}
    assert parts - named == set()


WRONG: list[tuple[str, str]] = [
    ("python -m validation_hq.evaluate --model M --bins lfw.bin --no-such-flag", "unrecognized arguments"),
    ("python -m data.verification make IMAGES PAIRS", "required: out"),
    ("python -m scripts.export_onnx CKPT out.onnx extra.onnx", "unrecognized arguments: extra.onnx"),
    ("python -m validation_ijb.evaluate --model M --ijb-root R --dataset ijbd", "invalid choice: 'ijbd'"),
    ("python -m probface.risk --model M --bin lfw.bin --pairs some", "invalid int value"),
    ("python -m no_such_package.tool --x", "not a module of the framework"),
    ("python train.py --config configs/no_such.yaml", "configs/no_such.yaml: no such config"),
    (
        "torchrun --nproc_per_node=2 train.py --cofig configs/base.yaml",
        "the following arguments are required",
    ),
    ("bash validation_hq/eval_hq.sh CKPT_OR_ONNX", "exit status 2"),
    (
        "bash validation_hq/eval_hq.sh M BINS out.json --no-such-flag",
        "unrecognized arguments: --no-such-flag",
    ),
    ("bash validation_ijb/eval_ijb.sh M ROOT ijbd", "invalid choice: 'ijbd'"),
    ("DATASET=x scripts/train_adaface.sh --resumee auto", "unrecognized arguments: --resumee"),
    ("DATSET=x BACKBONE=r50 scripts/train_adaface.sh", "no launcher reads DATSET"),
    ("bash scripts/train_recipe.sh no_such_recipe", "no recipe configs/recipes/no_such_recipe.yaml"),
    ("make no-such-target", "no target 'no-such-target'"),
    ("make demo NO_SUCH_VARIABLE=1", "the Makefile does not use NO_SUCH_VARIABLE"),
    ("python -m validation_hq.evaluate --model M [--colour bgr]", "unrecognized arguments: --colour"),
    ("python -m backbones.converters insightface|adafase W out.pt --arch r50", "invalid choice: 'adafase'"),
    ("ls -l", "not a command this test knows how to check"),
]


@pytest.mark.parametrize(("command", "expected"), WRONG, ids=[c for c, _ in WRONG])
def test_a_command_the_code_refuses_is_reported(command, expected, sandbox):
    """A synthetic documentation snippet whose command the code would refuse: the check must say so."""
    doc = f"Text.\n\n```bash\n{command}\n```\n"
    [(_, extracted, _)] = commands_in(doc)
    problems = check_command(extracted, sandbox)
    assert any(expected in p for p in problems), problems


def test_an_inline_fragment_may_leave_arguments_out_but_not_invent_options(sandbox):
    [(_, named, fragment)] = commands_in("`python -m probface.risk` scores pairs.")
    assert fragment and check_command(named, sandbox, fragment) == []
    assert check_command(named, sandbox) != []  # in a bash block the same words are an incomplete command
    [(_, wrong, fragment)] = commands_in("`python -m probface.risk --pair-uncertainy sum` scores pairs.")
    assert check_command(wrong, sandbox, fragment) == [
        "python -m probface.risk --pair-uncertainy sum: no option --pair-uncertainy"
    ]
    [(_, sub, fragment)] = commands_in("`python -m data.recordio pack --quality 90 --qualty`")
    assert check_command(sub, sandbox, fragment) == [
        "python -m data.recordio pack --quality 90 --qualty: no option --qualty"
    ]


def test_the_right_commands_of_the_snippets_above_pass(sandbox):
    right = [
        "python -m validation_hq.evaluate --model M --bins lfw.bin [--color bgr]",
        "python -m backbones.converters insightface|adaface W out.pt --arch r50",
        "torchrun --nproc_per_node=2 train.py --config configs/base.yaml",
        "DATASET=x scripts/train_adaface.sh --resume auto",
        "bash validation_hq/eval_hq.sh M BINS [out.json] --color bgr",
        "make demo CONFIG=configs/demo_cpu_long.yaml",
    ]
    assert {c: check_command(c, sandbox) for c in right} == {c: [] for c in right}


def test_a_launcher_run_records_the_command_it_would_run(sandbox):
    """The stand-in interpreter sees the final command: the launcher's defaults filled in."""
    records_before = set((sandbox / "argv").iterdir())
    assert (
        check_launcher("scripts/train_adaface.sh", ["--resume", "auto"], {"DATASET": "ms1mv3"}, sandbox) == []
    )
    [records] = set((sandbox / "argv").iterdir()) - records_before
    [run] = [f.read_text().split("\0")[:-1] for f in records.iterdir()]
    assert run[:2] == ["-m", "torch.distributed.run"]
    assert run[run.index("train.py") :] == [
        "train.py", "--config", "configs/recipes/adaface.yaml", "--set", "data.root=datasets/ms1mv3",
        "data.val_root=datasets/ms1mv3", "output_dir=work_dirs/ms1mv3_default_adaface", "--resume", "auto",
    ]  # fmt: skip
