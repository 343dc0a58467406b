from __future__ import annotations

import dataclasses
import inspect
import re
import typing
from pathlib import Path
from typing import Literal

import pytest
import torch
import yaml

from core.config import (
    Config,
    ConfigError,
    all_keys,
    check_part,
    config_from_dict,
    config_to_dict,
    dump_config,
    load_config,
    parse_overrides,
    validate,
    value_bounds,
)
from core.registry import Registry

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def write(path: Path, data: object) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def test_base_yaml_spells_out_every_schema_default():
    # base.yaml is the readable list of defaults: it must cover every key and agree with the schema.
    raw = yaml.safe_load((CONFIGS / "base.yaml").read_text())

    def leaves(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict) and v:  # an empty mapping is a free-form leaf (head.params)
                yield from leaves(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}"

    schema_leaves = {k for k in all_keys() if not any(o.startswith(k + ".") for o in all_keys())}
    assert set(leaves(raw)) == schema_leaves
    assert load_config(CONFIGS / "base.yaml") == Config()


def yaml_files_nearest_first(path: Path) -> list[tuple[Path, dict]]:
    """The file and every file it inherits from, read with plain yaml, in the order that decides a key: the
    file itself, then its last base (with that base's own bases), ..., then its first base."""
    raw = yaml.safe_load(path.read_text()) or {}
    bases = raw.pop("_base_", [])
    chain = [(path, raw)]
    for base in reversed([bases] if isinstance(bases, str) else bases):
        chain += yaml_files_nearest_first((path.parent / base).resolve())
    return chain


def flat_leaves(tree: dict, prefix: str = "") -> dict[str, object]:
    """``{"a.b": leaf}`` for every non-mapping value (an empty mapping sets nothing: it merges)."""
    out: dict[str, object] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out |= flat_leaves(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def expected_values(path: Path) -> dict[str, object]:
    """What the files of ``path``'s chain set: the nearest file's value of each key; the ``params`` of a
    section (head, loss) kept only when no nearer file gives that section another ``name``."""
    chain = [flat_leaves(raw) for _, raw in yaml_files_nearest_first(path)]
    expected: dict[str, object] = {}
    for i, leaves in enumerate(chain):
        for key, value in leaves.items():
            if key in expected:
                continue
            section, _, rest = key.partition(".")
            if rest.startswith("params."):
                names = [f.get(f"{section}.name") for f in chain[i:] if f"{section}.name" in f]
                here = names[0] if names else None  # the section's name where these params were set
                if any(f.get(f"{section}.name", here) != here for f in chain[:i]):
                    continue  # renamed nearer: constructor arguments of another part
            expected[key] = value
    return expected


@pytest.mark.parametrize("name", sorted(str(p.relative_to(CONFIGS)) for p in CONFIGS.rglob("*.yaml")))
def test_every_shipped_config_loads(name, tmp_path):
    import train  # noqa: F401 - registers every backbone, head and loss (ProbFace's included)
    from backbones import BACKBONES
    from heads.registry import HEADS
    from losses.registry import LOSSES

    cfg = load_config(CONFIGS / name)
    resolved, defaults = flat_leaves(config_to_dict(cfg)), flat_leaves(config_to_dict(Config()))
    expected = expected_values(CONFIGS / name)
    assert expected, f"{name}: sets nothing"
    for key, value in expected.items():  # every value the file or its bases set is the resolved one
        assert key in resolved, f"{name}: {key} set in the YAML but not in the resolved config"
        got = resolved[key]
        if isinstance(got, float) and isinstance(value, str):
            value = float(value)  # 1e-4: a string to YAML 1.1, a number to the config loader
        assert got == value, f"{name}: {key} = {got!r}, the YAML says {value!r}"
    for key, value in resolved.items():  # and every other key keeps the schema default
        if key not in expected:
            assert key in defaults and value == defaults[key], f"{name}: {key} = {value!r} set by no file"
    # the parts it names exist and take the arguments it gives them (names, and values by annotation)
    assert cfg.model.backbone in BACKBONES.names()
    for registry, section in ((HEADS, cfg.head), (LOSSES, cfg.loss)):
        if section is cfg.head and section.name == "none":
            assert not section.params, f"{name}: head.params for head.name none"
            continue
        accepted = inspect.signature(registry.get(section.name)).parameters
        if not any(a.kind is inspect.Parameter.VAR_KEYWORD for a in accepted.values()):
            unknown = set(section.params) - set(accepted)
            assert not unknown, f"{name}: {section.name} takes no {unknown}"
    check_part(cfg, BACKBONES, "model.backbone")
    if cfg.head.name != "none":
        check_part(cfg, HEADS, "head.name", "head.params", fixed=("embedding_size", "num_classes"))
    check_part(cfg, LOSSES, "loss.name", "loss.params", fixed=("class_weights",))
    # the resolved config written out reads back as the same config and the same plain YAML
    dump_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == cfg
    assert yaml.safe_load((tmp_path / "resolved.yaml").read_text()) == config_to_dict(cfg)


def test_bases_merge_in_order_and_file_keys_win(tmp_path):
    write(tmp_path / "a.yaml", {"optim": {"lr": 0.1, "momentum": 0.8}, "data": {"val_targets": ["lfw"]}})
    write(tmp_path / "b.yaml", {"optim": {"lr": 0.2}, "model": {"backbone": "r18"}})
    (tmp_path / "sub").mkdir()
    write(
        tmp_path / "sub" / "exp.yaml",
        {"_base_": ["../a.yaml", "../b.yaml"], "model": {"dropout": 0.4}},
    )
    cfg = load_config(tmp_path / "sub" / "exp.yaml")
    assert cfg.optim.lr == 0.2  # b after a
    assert cfg.optim.momentum == 0.8  # from a, untouched by b (deep merge)
    assert cfg.model.backbone == "r18"
    assert cfg.model.dropout == 0.4
    assert cfg.data.val_targets == ["lfw"]
    assert cfg.optim.weight_decay == Config().optim.weight_decay  # schema default


def test_single_string_base_and_nested_bases(tmp_path):
    write(tmp_path / "root.yaml", {"optim": {"lr": 0.3}})
    write(tmp_path / "mid.yaml", {"_base_": "root.yaml", "optim": {"momentum": 0.5}})
    write(tmp_path / "leaf.yaml", {"_base_": "mid.yaml"})
    cfg = load_config(tmp_path / "leaf.yaml")
    assert (cfg.optim.lr, cfg.optim.momentum) == (0.3, 0.5)


def test_base_cycle_is_reported(tmp_path):
    write(tmp_path / "a.yaml", {"_base_": "b.yaml"})
    write(tmp_path / "b.yaml", {"_base_": "a.yaml"})
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")


def test_missing_base_names_the_including_file(tmp_path):
    exp = write(tmp_path / "exp.yaml", {"_base_": "nope.yaml"})
    with pytest.raises(ConfigError) as err:
        load_config(exp)
    assert "nope.yaml" in str(err.value) and str(exp) in str(err.value)


def test_dotted_overrides_parse_yaml_scalars():
    cfg = load_config(
        CONFIGS / "base.yaml",
        [
            "optim.lr=0.05",
            "data.root=/x",
            "model.grad_checkpoint=true",
            "data.val_targets=[lfw, cplfw]",
            "data.num_classes=10",
            "data.augment.crop=0.2",
        ],
    )
    assert cfg.optim.lr == 0.05
    assert cfg.data.root == "/x"
    assert cfg.model.grad_checkpoint is True
    assert cfg.data.val_targets == ["lfw", "cplfw"]
    assert cfg.data.num_classes == 10
    assert cfg.data.augment.crop == 0.2


def test_override_wins_over_file(tmp_path):
    exp = write(tmp_path / "exp.yaml", {"optim": {"lr": 0.3}})
    assert load_config(exp, ["optim.lr=0.01"]).optim.lr == 0.01


@pytest.mark.parametrize("bad", ["optim.lr", "=3", "optim..lr=1"])
def test_malformed_override(bad):
    with pytest.raises(ConfigError, match=r"dotted\.key=value"):
        parse_overrides([bad])


def test_unknown_key_suggests_closest_name():
    with pytest.raises(ConfigError, match=r"unknown key optim\.lrr; did you mean optim\.lr\?"):
        load_config(CONFIGS / "base.yaml", ["optim.lrr=0.1"])


def test_unknown_key_in_wrong_section_suggests_the_right_one(tmp_path):
    exp = write(tmp_path / "exp.yaml", {"optim": {"epochs": 3}})
    with pytest.raises(ConfigError) as err:
        load_config(exp)
    assert "unknown key optim.epochs" in str(err.value)
    assert "train.epochs" in str(err.value)
    assert str(exp) in str(err.value)


def test_unknown_section():
    with pytest.raises(ConfigError, match="unknown key optimizer; did you mean optim"):
        load_config(None, ["optimizer.lr=1"])


@pytest.mark.parametrize(
    ("override", "path", "expected"),
    [
        ("optim.lr=fast", "optim.lr", "a number"),
        ("data.batch_size=12.5", "data.batch_size", "an integer"),
        ("data.batch_size=true", "data.batch_size", "an integer"),
        ("model.grad_checkpoint=1", "model.grad_checkpoint", "true or false"),
        ("data.color=rbg", "data.color", "one of 'rgb', 'bgr'"),
        ("data.val_targets=lfw", "data.val_targets", "a list"),
        ("data.val_targets=[lfw, 3]", r"data.val_targets\[1\]", "a string"),
        ("data.num_classes=many", "data.num_classes", "an integer or null"),
        ("data.augment=0.5", "data.augment", "a mapping"),
    ],
)
def test_wrong_types_name_the_key_path(override, path, expected):
    with pytest.raises(ConfigError, match=rf"{path} must be {expected}"):
        load_config(None, [override])


def test_int_is_accepted_for_float():
    cfg = load_config(None, ["optim.lr=1"])
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)


def test_dump_and_load_round_trip(tmp_path):
    cfg = load_config(
        CONFIGS / "adaface_base.yaml",
        [
            "optim.lr=0.0125",
            "data.num_classes=85742",
            "loss.class_weights=inverse_log_frequency",
            "head.params.variant=clip",
            "optim.weight_decay=1e-5",
        ],
    )
    out = tmp_path / "resolved" / "config.yaml"
    dump_config(cfg, out)
    assert load_config(out) == cfg
    assert config_from_dict(config_to_dict(cfg)) == cfg
    # the dump is plain YAML without python tags, readable by any YAML tool
    assert "!!python" not in out.read_text()


def test_dump_is_atomic_and_keeps_old_file_on_failure(tmp_path, monkeypatch):
    out = tmp_path / "config.yaml"
    dump_config(Config(), out)
    before = out.read_text()
    broken = dataclasses.replace(Config(), data=object())  # not serialisable
    with pytest.raises(Exception):  # noqa: B017 - the exact type comes from yaml/dataclasses
        dump_config(broken, out)
    assert out.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]  # no temp files left


def test_top_level_must_be_mapping(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(bad)


def test_an_override_with_a_mapping_value_replaces_the_mapping():
    cfg = load_config(CONFIGS / "cpu_tiny.yaml")
    assert cfg.head.params == {"s": 32.0, "m": 0.3}
    assert load_config(CONFIGS / "cpu_tiny.yaml", ["head.params.m=0.4"]).head.params == {"s": 32.0, "m": 0.4}
    assert load_config(CONFIGS / "cpu_tiny.yaml", ["head.params={}"]).head.params == {}
    replaced = load_config(CONFIGS / "cpu_tiny.yaml", ["head.params={s: 16}", "head.params.h=0.2"])
    assert replaced.head.params == {"s": 16, "h": 0.2}


def test_renaming_a_part_starts_its_params_afresh(tmp_path):
    # constructor arguments of one head never leak into another (cosface has no `variant`)
    assert load_config(CONFIGS / "cpu_tiny.yaml", ["head.name=magface"]).head.params == {}
    renamed = load_config(CONFIGS / "cpu_tiny.yaml", ["head.params.s=8", "head.name=cosface"])
    assert renamed.head.params == {"s": 8}
    assert load_config(CONFIGS / "cpu_tiny.yaml", ["head.name=arcface"]).head.params == {"s": 32.0, "m": 0.3}
    cosface = load_config(CONFIGS / "recipes" / "cosface.yaml")
    assert cosface.head.params == {"s": 64.0, "m": 0.4}
    assert cosface.optim.lr == 0.1 and cosface.schedule.power == 1.0  # the rest of the base recipe stays


# ------------------------------------------------------------------------------------------ values


def bounded_fields(cls: type = Config, prefix: str = "") -> list[tuple[str, object, object]]:
    """(dotted key, annotation, Bounds) of every field of the schema that declares bounds."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out += bounded_fields(hints[f.name], f"{prefix}{f.name}.")
        elif "bounds" in f.metadata:
            out.append((f"{prefix}{f.name}", hints[f.name], f.metadata["bounds"]))
    return out


def edge_cases(tp, bounds) -> tuple[list[str], list[str]]:
    """YAML texts of values just inside each declared bound (accepted) and just outside it (refused)."""
    is_list = typing.get_origin(tp) is list
    integer = int in (tp, *typing.get_args(tp))
    step = 1 if integer else 0.5
    inside, outside = [], []
    if bounds.min is not None:
        inside.append(bounds.min)
        outside.append(bounds.min - step)
    if bounds.max is not None:
        inside.append(bounds.max)
        outside.append(bounds.max + step)
    if bounds.above is not None:
        inside.append(bounds.above + step if bounds.max is None else (bounds.above + bounds.max) / 2)
        outside.append(bounds.above)
    if bounds.below is not None:
        inside.append(bounds.below - step if bounds.min is None else (bounds.min + bounds.below) / 2)
        outside.append(bounds.below)
    if is_list:
        n = bounds.length or 1
        fill = inside[0] if inside else "a"
        inside, outside = (
            [f"[{', '.join([str(fill)] * n)}]"],
            [f"[{', '.join([str(v)] * n)}]" for v in outside],
        )
        if bounds.length is not None:
            outside.append(f"[{', '.join([str(fill)] * (bounds.length + 1))}]")
        if bounds.increasing:
            inside.append(f"[{fill}, {fill + 1}]")
            outside.append(f"[{fill + 1}, {fill}]")
        if bounds.unique:
            inside.append("[a, b]")
            outside.append("[a, a]")
    elif tp is str:
        inside, outside = ["x"], ['""'] if bounds.nonempty else []
    else:
        inside = [str(v) for v in inside] + (["null"] if type(None) in typing.get_args(tp) else [])
        outside = [str(v) for v in outside]
    return inside, outside


def test_defaults_satisfy_their_bounds():
    validate(Config())


def test_every_bounded_key_has_a_bound_that_can_be_broken():
    # a declaration that allows everything would make the bound check of this key untestable
    for key, tp, bounds in bounded_fields():
        assert edge_cases(tp, bounds)[1], f"{key}: bounds {bounds} refuse nothing"


@pytest.mark.parametrize(("key", "tp", "bounds"), bounded_fields(), ids=[k for k, _, _ in bounded_fields()])
def test_every_declared_bound_is_enforced_at_its_edge(key, tp, bounds):
    inside, outside = edge_cases(tp, bounds)
    for text in inside:
        load_config(CONFIGS / "base.yaml", [f"{key}={text}"])  # accepted
    for text in outside:
        with pytest.raises(ConfigError) as err:
            load_config(CONFIGS / "base.yaml", [f"{key}={text}"])
        message = str(err.value)
        assert message.startswith(f"--set {key}={text}: {key}"), message
        assert " must " in message and "\n" not in message


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.batch_size=0", "--set data.batch_size=0: data.batch_size must be an integer >= 1, got 0"),
        ("optim.lr=-0.1", "--set optim.lr=-0.1: optim.lr must be a number > 0, got -0.1"),
        ("train.epochs=0", "--set train.epochs=0: train.epochs must be an integer >= 1, got 0"),
        (
            "data.num_workers=-1",
            "--set data.num_workers=-1: data.num_workers must be an integer >= 0, got -1",
        ),
        ("model.embedding_size=0", "model.embedding_size must be an integer >= 1, got 0"),
        ("data.augment.flip=1.5", "data.augment.flip must be a number in [0, 1], got 1.5"),
        ("head.sample_rate=0", "head.sample_rate must be a number in (0, 1], got 0.0"),
        ("optim.betas=[0.9, 1.0]", "optim.betas[1] must be a number in [0, 1), got 1.0"),
        ("optim.betas=[0.9]", "optim.betas must be a list of 2 values, got [0.9]"),
        ("schedule.milestones=[8, 4]", "schedule.milestones must be increasing, got [8.0, 4.0]"),
        ("optim.lr=.inf", "optim.lr must be a finite number, got inf"),
        ("optim.lr=.nan", "optim.lr must be a finite number, got nan"),
    ],
)
def test_values_out_of_range_are_refused_with_the_key_and_what_it_allows(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(CONFIGS / "cpu_tiny.yaml", [override])
    assert message in str(err.value)


def test_keys_that_depend_on_each_other_must_agree():
    with pytest.raises(ConfigError, match=r"schedule\.min_lr must be <= optim\.lr 0\.1 .* got 0\.2"):
        load_config(CONFIGS / "cpu_tiny.yaml", ["schedule.min_lr=0.2"])
    assert load_config(CONFIGS / "cpu_tiny.yaml", ["schedule.min_lr=0.1"]).schedule.min_lr == 0.1
    with pytest.raises(ConfigError, match=r"schedule\.warmup_epochs must be < train\.epochs 4"):
        load_config(CONFIGS / "cpu_tiny.yaml", ["schedule.warmup_epochs=4"])
    with pytest.raises(
        ConfigError, match=r"--set head\.params\.s=3: head\.params must be empty with head\.name none"
    ):
        load_config(CONFIGS / "cpu_tiny.yaml", ["head.name=none", "head.params.s=3"])
    assert load_config(CONFIGS / "cpu_tiny.yaml", ["head.name=none"]).head.params == {}


def test_a_checkpoint_config_with_a_bad_value_names_its_source():
    data = config_to_dict(Config())
    data["train"]["epochs"] = 0
    with pytest.raises(ConfigError, match=r"^ckpt\.pt: train\.epochs must be an integer >= 1, got 0$"):
        config_from_dict(data, source="ckpt.pt")


# ------------------------------------------------------------------------- where a value was set


def test_duplicate_keys_are_refused_with_the_file_and_both_lines(tmp_path):
    exp = tmp_path / "exp.yaml"
    exp.write_text("optim:\n  lr: 0.1\n  momentum: 0.8\n  lr: 0.2\n")
    with pytest.raises(ConfigError) as err:
        load_config(exp)
    assert str(err.value) == f"{exp} line 4: duplicate key optim.lr (first at line 2); give each key once"
    exp.write_text("train:\n  epochs: 2\noptim:\n  lr: 0.1\ntrain:\n  epochs: 3\n")
    with pytest.raises(ConfigError, match=r"line 5: duplicate key train \(first at line 1\)"):
        load_config(exp)
    exp.write_text("head:\n  params: {s: 30, m: 0.3, s: 40}\n")
    with pytest.raises(ConfigError, match=r"line 2: duplicate key head\.params\.s \(first at line 2\)"):
        load_config(exp)


def test_a_yaml_merge_key_may_be_overridden_in_its_mapping(tmp_path):
    # `<<` copies keys that the mapping then sets again: not a duplicate
    exp = tmp_path / "exp.yaml"
    exp.write_text("optim: {<<: {lr: 0.2, momentum: 0.5}, lr: 0.3}\n")
    cfg = load_config(exp)
    assert (cfg.optim.lr, cfg.optim.momentum) == (0.3, 0.5)


def test_errors_name_where_the_value_was_set(tmp_path):
    (tmp_path / "base.yaml").write_text("optim:\n  lr: 0.1\ntrain:\n  epochs: 0\n")
    exp = tmp_path / "exp.yaml"
    exp.write_text("_base_: base.yaml\ndata:\n  batch_size: 0\n")
    base = (tmp_path / "base.yaml").resolve()
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(exp.resolve()))} line 3: data\.batch_size must"):
        load_config(exp)
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(base))} line 4: train\.epochs must"):
        load_config(exp, ["data.batch_size=8"])
    # an override of a key the file sets takes the blame, and the file none
    with pytest.raises(ConfigError) as err:
        load_config(exp, ["data.batch_size=8", "train.epochs=3", "optim.lr=-1"])
    assert str(err.value) == "--set optim.lr=-1: optim.lr must be a number > 0, got -1.0"
    cfg = load_config(exp, ["data.batch_size=8", "train.epochs=3"])
    assert cfg.origin("optim.lr") == f"{base} line 2"
    assert cfg.origin("data.batch_size") == "--set data.batch_size=8"
    assert cfg.origin("optim.momentum") == ""  # a default


def test_override_mistakes_are_blamed_on_the_argument_not_the_file():
    tiny = str((CONFIGS / "cpu_tiny.yaml").resolve())
    for override, message in [
        ("optim.lrr=1", "--set optim.lrr=1: unknown key optim.lrr; did you mean optim.lr?"),
        ("optim.lr=fast", "--set optim.lr=fast: optim.lr must be a number, got 'fast' (str)"),
        ("optim.lr", "--set optim.lr: not of the form dotted.key=value"),
    ]:
        with pytest.raises(ConfigError) as err:
            load_config(CONFIGS / "cpu_tiny.yaml", [override])
        assert str(err.value) == message
        assert tiny not in str(err.value)
    with pytest.raises(ConfigError) as err:
        load_config(CONFIGS / "cpu_tiny.yaml", ["data.val_targets=[lfw"])
    assert str(err.value).startswith("--set data.val_targets=[lfw: the value is not valid YAML: ")
    assert "\n" not in str(err.value)


def test_yaml_syntax_errors_are_one_line_with_the_line(tmp_path):
    exp = tmp_path / "exp.yaml"
    exp.write_text("optim:\n  lr: [0.1\ntrain:\n  epochs: 2\n")
    with pytest.raises(ConfigError) as err:
        load_config(exp)
    assert re.fullmatch(rf"{re.escape(str(exp))} line \d+: invalid YAML: .+", str(err.value)), str(err.value)


# ------------------------------------------------------------------------- part constructors


def toy_parts() -> Registry:
    parts = Registry("head")

    @parts.register("toy")
    def toy(
        embedding_size: int,
        num_classes: int,
        m: float = 0.5,
        variant: Literal["exact", "clip"] = "exact",
        easy: bool = False,
        weights: torch.Tensor | None = None,
    ) -> None:
        return None

    @parts.register("open")
    def open_kwargs(m: float = 0.5, **kwargs: object) -> None:
        return None

    return parts


@pytest.mark.parametrize(
    ("params", "message"),
    [
        (["head.params.m=abc"], "--set head.params.m=abc: head.params.m must be a number, got 'abc' (str)"),
        (["head.params.m=.inf"], "--set head.params.m=.inf: head.params.m must be a finite number, got inf"),
        (["head.params.m=null"], "head.params.m must be a number, got None"),
        (["head.params.variant=fast"], "head.params.variant must be one of 'exact', 'clip', got 'fast'"),
        (["head.params.easy=2"], "head.params.easy must be true or false, got 2"),
        (["head.params.mm=1"], "unknown key head.params.mm: head 'toy' takes m, variant, easy, weights; "
         "did you mean head.params.m?"),
        (["head.params.num_classes=3"], "head.params.num_classes is set from the data and the model"),
        (["head.name=tyo"], "--set head.name=tyo: head.name: unknown head 'tyo'; did you mean 'toy'?"),
        (["head.name=open", "head.params.m=abc"], "--set head.params.m=abc: head.params.m must be a number"),
    ],
)  # fmt: skip
def test_part_params_are_checked_against_the_constructor(params, message):
    cfg = load_config(None, ["head.name=toy", *params])
    with pytest.raises(ConfigError) as err:
        check_part(cfg, toy_parts(), "head.name", "head.params", fixed=("embedding_size", "num_classes"))
    assert message in str(err.value)


def test_part_params_that_fit_the_constructor_pass():
    parts = toy_parts()
    for params in (
        ["head.params.m=1"],  # an integer is a number
        ["head.params={m: 0.3, variant: clip, easy: true}"],
        ["head.params.weights=[1, 2]"],  # an annotation beyond the schema's types takes anything
        ["head.name=open", "head.params.anything=1"],  # **kwargs: any name
    ):
        check_part(load_config(None, ["head.name=toy", *params]), parts, "head.name", "head.params")


def test_readme_train_lists_every_bound():
    text = (CONFIGS.parent / "README_TRAIN.md").read_text()
    table = text[text.index("| allowed values | keys |") :].split("\n\n")[0]
    documented = {}
    for row in table.splitlines()[2:]:
        allowed, keys = (cell.strip() for cell in row.strip("|").split("|"))
        documented |= {key.strip("` "): allowed for key in keys.split(",")}
    assert documented == value_bounds()


# ------------------------------------------------------------------------------ image size of the data


def faces_with_odd_ones(shared_data, root, odd: int, side: int = 100):
    """2 real CelebA identities (112x112) in ``root``, the first ``odd`` images resized to ``side``."""
    import cv2

    src = sorted(p for p in (shared_data / "celeba_aligned112").iterdir() if p.is_dir())[:2]
    for person in src:
        for image in sorted(person.glob("*.jpg"))[:6]:
            (root / person.name).mkdir(parents=True, exist_ok=True)
            (root / person.name / image.name).write_bytes(image.read_bytes())
    for path in sorted(root.glob("*/*.jpg"))[:odd]:
        cv2.imwrite(str(path), cv2.resize(cv2.imread(str(path)), (side, side)))
    return root


def test_image_size_is_checked_against_most_faces_not_one(shared_data, tmp_path):
    from core.config import DataConfig
    from data.builder import open_train_source

    # one face of another size among 112x112 ones is a bad record (data.bad_records), not a wrong setting
    root = faces_with_odd_ones(shared_data, tmp_path / "one_odd", odd=1)
    assert open_train_source(DataConfig(root=str(root), image_size=112)).num_images == 12
    with pytest.raises(
        ConfigError, match=rf"data\.image_size is 100, but {re.escape(str(root))} holds 112x112"
    ):
        open_train_source(DataConfig(root=str(root), image_size=100))
    # most faces of another size: the setting is wrong, named with the data's size
    root = faces_with_odd_ones(shared_data, tmp_path / "most_odd", odd=7)
    with pytest.raises(
        ConfigError, match=r"data\.image_size is 112, .* holds 100x100 images .*; set data\.image_size: 100"
    ):
        open_train_source(DataConfig(root=str(root), image_size=112))
