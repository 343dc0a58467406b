from __future__ import annotations

import pytest

from core.registry import Registry, UnknownNameError


def test_register_build_and_list():
    reg = Registry("widget")

    @reg.register("small", "tiny")
    def make_small(size: int = 1) -> tuple[str, int]:
        return ("small", size)

    @reg.register()
    class Large:
        def __init__(self, size: int = 10) -> None:
            self.size = size

    assert reg.names() == ["Large", "small", "tiny"]
    assert reg.build("small", size=3) == ("small", 3)
    assert reg.build("tiny") == ("small", 1)
    assert reg.build("Large", size=7).size == 7
    assert "small" in reg and "huge" not in reg
    assert len(reg) == 3


def test_unknown_name_lists_valid_names_and_suggests():
    reg = Registry("backbone")
    for name in ("r18", "r50", "mbf"):
        reg.register(name)(lambda: None)
    with pytest.raises(UnknownNameError) as err:
        reg.build("r5O")
    msg = str(err.value)
    assert msg.startswith("unknown backbone 'r5O'; did you mean 'r50'?")
    assert "valid names: mbf, r18, r50" in msg
    assert isinstance(err.value, KeyError)


def test_duplicate_registration_is_refused():
    reg = Registry("head")
    reg.register("arcface")(lambda: 1)
    with pytest.raises(ValueError, match="head 'arcface' is already registered"):
        reg.register("arcface")(lambda: 2)
