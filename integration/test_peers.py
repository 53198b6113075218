"""The benchmark's peer wiring: configs stargz-store and podman read, and the optimize workload's flags.

Cheap and process-free: the peer itself is exercised by the benchmark (``make bench``), which is not
part of the suite.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest

from integration import peers
from integration.images import OptimizeRun


def test_store_config_is_toml_with_stargz_defaults_and_plain_http_hosts() -> None:
    cfg = tomllib.loads(peers.store_config(["127.0.0.1:5000", "[::1]:5001"]))
    assert cfg == {"noprefetch": False, "no_background_fetch": False, "no_prometheus": True,
                   "plain_http_registries": ["127.0.0.1:5000", "[::1]:5001"]}
    off = tomllib.loads(peers.store_config(prefetch=False, background_fetch=False))
    assert off["noprefetch"] is True and off["no_background_fetch"] is True and off["plain_http_registries"] == []


def test_podman_storage_conf_names_the_layer_store_by_ref(tmp_path: Path) -> None:
    conf = tomllib.loads(peers.podman_storage_conf(tmp_path / "g", tmp_path / "r", tmp_path / "mnt"))
    assert conf["storage"]["graphroot"] == str(tmp_path / "g") and conf["storage"]["runroot"] == str(tmp_path / "r")
    opts = conf["storage"]["options"]
    assert opts["additionallayerstores"] == [f"{tmp_path / 'mnt'}:ref"]
    assert opts["pull_options"]["enable_partial_images"] == "false"
    plain = tomllib.loads(peers.podman_storage_conf(tmp_path / "g", tmp_path / "r", partial=True))
    assert "additionallayerstores" not in plain["storage"]["options"]
    assert plain["storage"]["options"]["pull_options"]["enable_partial_images"] == "true"


def test_missing_binary_is_one_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(peers, "STARGZ_STORE", tmp_path / "absent")
    assert peers.stargz_store_binary() is None
    with pytest.raises(peers.PeerError, match="make peers"):
        peers.StargzStore(tmp_path)


def test_optimize_run_flags_and_cache_key() -> None:
    run = OptimizeRun(("python3", "-c", "print('hi')"), user="postgres")
    flags = run.ctr_flags()
    assert json.loads(flags[flags.index("--entrypoint") + 1]) == ["python3"]
    assert json.loads(flags[flags.index("--args") + 1]) == ["-c", "print('hi')"]
    assert flags[flags.index("--user") + 1] == "postgres"
    assert "--user" not in OptimizeRun(("sh",)).ctr_flags()
    assert run.key() == OptimizeRun(("python3", "-c", "print('hi')"), "postgres").key()
    assert run.key() != OptimizeRun(("python3", "-c", "print('ho')"), "postgres").key()
