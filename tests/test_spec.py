"""Image configs come from a registry: every field of the wrong type is a one-line error."""

from __future__ import annotations

import pytest

from runtime.spec import ImageSettings, image_settings, merged_env, process_args
from shim.errors import LazyshimError

GOOD = {"config": {"Entrypoint": ["/bin/tini"], "Cmd": ["sh"], "Env": ["A=1", "PATH=/x"], "User": "app",
                   "WorkingDir": "/srv"}}


def test_a_well_formed_config() -> None:
    s = image_settings(GOOD, "img")
    assert s == ImageSettings(["/bin/tini"], ["sh"], ["A=1", "PATH=/x"], "app", "/srv")
    assert process_args(s, []) == ["/bin/tini", "sh"]
    assert process_args(s, ["ls"]) == ["/bin/tini", "ls"]
    assert process_args(s, [], entrypoint=[]) == []
    assert merged_env(s, ["A=2"]) == ["A=2", "PATH=/x"]


@pytest.mark.parametrize("config", [{}, {"config": None}, {"config": {}}, {"rootfs": None},
                                    {"config": {"Env": None, "Cmd": None, "User": None}}])
def test_missing_fields_are_empty(config: dict) -> None:
    assert image_settings(config, "img") == ImageSettings()


@pytest.mark.parametrize(("config", "words"), [
    ({"config": {"Env": "A=1"}}, "config.Env is a string"),
    ({"config": {"Cmd": {"sh": 1}}}, "config.Cmd is an object"),
    ({"config": {"Entrypoint": ["sh", 3]}}, "config.Entrypoint is a list with non-strings"),
    ({"config": {"User": 0}}, "config.User is a number"),
    ({"config": {"WorkingDir": ["/srv"]}}, "config.WorkingDir is a list"),
    ({"config": {"WorkingDir": "srv"}}, "config.WorkingDir must be an absolute path"),
    ({"config": "x"}, "field config is a string"),
    ({"config": {"User": True}}, "config.User is a boolean"),
    (["not", "an", "object"], "not a JSON object"),
])
def test_wrong_types_are_one_line_errors(config, words: str) -> None:
    with pytest.raises(LazyshimError) as e:
        image_settings(config, "reg/img:tag")
    msg = str(e.value)
    assert words in msg and msg.startswith("reg/img:tag: ") and "\n" not in msg


def test_env_entries_need_a_name() -> None:
    with pytest.raises(LazyshimError, match="config.Env holds '=x'"):
        image_settings({"config": {"Env": ["A=1", "=x"]}}, "img")
