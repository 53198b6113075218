"""Configuration: environment over the user's file over the system's file over defaults."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from shim import config
from shim.errors import LazyshimError


@pytest.fixture
def files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Path, Path]]:
    system = tmp_path / "etc" / "lazyshim.toml"
    user = tmp_path / "xdg" / "lazyshim" / "lazyshim.toml"
    system.parent.mkdir(parents=True)
    user.parent.mkdir(parents=True)
    monkeypatch.setattr(config, "SYSTEM_FILE", str(system))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    for key in config.KEYS:
        monkeypatch.delenv(config.env_name(key), raising=False)
    config.reload()
    yield system, user
    config.reload()


def test_precedence(files: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    system, user = files
    system.write_text('root = "/sys-root"\nregistry_retries = 5\ninsecure_registries = ["a:1", "b"]\n')
    user.write_text('root = "/user-root"\n')
    config.reload()
    assert config.get("root") == "/user-root"
    assert config.get("registry_retries") == "5"
    assert config.get("insecure_registries") == "a:1,b"
    assert config.get("delegate") is None
    monkeypatch.setenv("LAZYSHIM_ROOT", "/env-root")
    assert config.get("root") == "/env-root"
    eff = config.effective()
    assert eff["root"] == ("/env-root", "LAZYSHIM_ROOT")
    assert eff["registry_retries"] == ("5", str(system))
    assert eff["delegate"] == (None, "default")


@pytest.mark.parametrize("text, words", [
    ('rooot = "/x"\n', "unknown key"),
    ("root = [1, 2]\n", "must be"),
    ("root = true\n", "must be"),
    ("root = \n", "config"),
])
def test_bad_files_are_one_line_errors(files: tuple[Path, Path], text: str, words: str) -> None:
    files[1].write_text(text)
    config.reload()
    with pytest.raises(LazyshimError, match=words):
        config.get("root")


def test_the_store_root_comes_from_the_config(files: tuple[Path, Path]) -> None:
    from shim.store.layout import default_root

    files[1].write_text('root = "/from/config"\n')
    config.reload()
    assert str(default_root()) == "/from/config"
