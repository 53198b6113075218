"""A registry-supplied image config with fields of the wrong type: `lazyshim run` answers with
one line, never a traceback, and a config that merely lacks optional fields still runs."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from integration.images import fetch_manifest
from integration.registry import Registry
from integration.test_image_core import assert_one_line_failure, lazyshim
from shim.registry.client import RegistryClient

MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_CONFIG = "application/vnd.oci.image.config.v1+json"


def _push_with_config(registry: Registry, tag: str, config: object) -> str:
    """busybox:esgz's layers under a new manifest whose config is `config`."""
    return _push_raw_config(registry, tag, json.dumps(config).encode())


def _push_raw_config(registry: Registry, tag: str, raw: bytes) -> str:
    """busybox:esgz's layers under a new manifest whose config blob is `raw`."""
    manifest = fetch_manifest(registry.host, "busybox", "esgz")
    digest = "sha256:" + hashlib.sha256(raw).hexdigest()
    manifest["config"] = {"mediaType": MT_CONFIG, "digest": digest, "size": len(raw)}
    with RegistryClient(registry.host) as c:
        c.push_blob("busybox", digest, raw)
        c.push_manifest("busybox", tag, json.dumps(manifest).encode(), MT_MANIFEST)
    return f"{registry.host}/busybox:{tag}"


@pytest.mark.parametrize(("tag", "config", "words"), [
    ("env-string", {"config": {"Env": "PATH=/bin"}}, "config.Env"),
    ("cmd-dict", {"config": {"Cmd": {"sh": "-c"}}}, "config.Cmd"),
    ("user-number", {"config": {"User": 1000}}, "config.User"),
    ("workdir-list", {"config": {"WorkingDir": ["/"]}}, "config.WorkingDir"),
    ("config-list", {"config": ["sh"]}, "field config"),
])
def test_wrong_types_in_the_image_config_are_one_line(tmp_path: Path, registry: Registry, images: dict[str, str],
                                                       tag: str, config: dict, words: str) -> None:
    ref = _push_with_config(registry, f"bad-{tag}", config)
    p = lazyshim(tmp_path / "store", "run", "--rm", ref, "true", check=False)
    assert assert_one_line_failure(p, words.lower(), code=125).startswith("lazyshim: ")


def test_a_config_without_rootfs_or_process_fields_still_runs(tmp_path: Path, registry: Registry,
                                                              images: dict[str, str]) -> None:
    ref = _push_with_config(registry, "bare-config", {"architecture": "amd64", "os": "linux"})
    p = lazyshim(tmp_path / "store", "run", "--rm", ref, "echo", "ran", check=False)
    assert p.returncode == 0, p.stderr
    assert p.stdout == "ran\n"


def test_a_relative_workdir_flag_is_one_line(tmp_path: Path, images: dict[str, str]) -> None:
    p = lazyshim(tmp_path / "store", "run", "--rm", "-w", "srv", images["busybox:esgz"], "true", check=False)
    assert_one_line_failure(p, "--workdir", code=125)


@pytest.mark.parametrize(("flags", "words"), [
    (["--name", "../../escaped"], "--name"),
    (["-u", "99999999999999999999"], "out of range"),
    (["-e", "=x"], "no name"),
])
def test_bad_run_flags_are_one_line_and_write_nothing_outside_the_store(
        tmp_path: Path, images: dict[str, str], flags: list[str], words: str) -> None:
    store = tmp_path / "deep" / "store"
    p = lazyshim(store, "run", *flags, images["busybox:esgz"], "true", check=False)
    assert_one_line_failure(p, words, code=125)
    outside = [p for p in tmp_path.rglob("*") if p not in (tmp_path / "deep", store) and store not in p.parents]
    assert not outside, outside


@pytest.mark.parametrize(("tag", "config"), [
    ("rootfs-string", {"rootfs": "layers"}),
    ("diff-ids-numbers", {"rootfs": {"type": "layers", "diff_ids": [5, None]}}),
])
def test_a_pull_publishes_a_config_with_odd_rootfs_without_a_traceback(tmp_path: Path, registry: Registry,
                                                                        images: dict[str, str], tag: str,
                                                                        config: dict) -> None:
    p = lazyshim(tmp_path / "store", "pull", _push_with_config(registry, tag, config), check=False)
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr


def test_a_deeply_nested_config_is_one_line(tmp_path: Path, registry: Registry, images: dict[str, str]) -> None:
    ref = _push_raw_config(registry, "nested-config", b"[" * 200_000)
    p = lazyshim(tmp_path / "store", "pull", ref, check=False)
    assert_one_line_failure(p, "not json")
