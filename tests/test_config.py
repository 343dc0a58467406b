from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import pytest
import yaml

from core.config import (
    Config,
    ConfigError,
    all_keys,
    config_from_dict,
    config_to_dict,
    dump_config,
    load_config,
    parse_overrides,
)

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
    # the parts it names exist and take the arguments it gives them
    assert cfg.model.backbone in BACKBONES.names()
    for registry, section in ((HEADS, cfg.head), (LOSSES, cfg.loss)):
        if section is cfg.head and section.name == "none":
            assert not section.params, f"{name}: head.params for head.name none"
            continue
        accepted = inspect.signature(registry.get(section.name)).parameters
        if any(a.kind is inspect.Parameter.VAR_KEYWORD for a in accepted.values()):
            continue  # takes any keyword
        unknown = set(section.params) - set(accepted)
        assert not unknown, f"{name}: {section.name} takes no {unknown}"
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
    assert cosface.optim.lr == 0.1 and cosface.schedule.power == 2.0  # the rest of the base recipe stays
