"""podman-style run flags into OCI pieces, and the store's sweep of dead pids' temporaries."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from runtime import runflags
from shim.errors import LazyshimError
from shim.store.layout import Store
from shim.store.sweep import sweep_temporaries


def test_volume_forms(tmp_path: Path) -> None:
    m = runflags.volume(f"{tmp_path}:/data:ro")
    assert m == {"destination": "/data", "type": "bind", "source": str(tmp_path), "options": ["rbind", "ro"]}
    assert runflags.volume(f"{tmp_path}:/data")["options"] == ["rbind", "rw"]
    for bad in ("rel:/data", f"{tmp_path}/nope:/d", f"{tmp_path}:rel", f"{tmp_path}:/d:bogus", "x"):
        with pytest.raises(LazyshimError):
            runflags.volume(bad)


def test_mount_forms(tmp_path: Path) -> None:
    m = runflags.mount(f"type=bind,src={tmp_path},target=/x,readonly")
    assert m["source"] == str(tmp_path) and "ro" in m["options"]
    t = runflags.mount("type=tmpfs,destination=/t,tmpfs-size=1m,tmpfs-mode=700")
    assert t["type"] == "tmpfs" and f"size={1 << 20}" in t["options"] and "mode=700" in t["options"]
    for bad in ("type=volume,destination=/x", "type=tmpfs", "type=tmpfs,destination=/t,bogus=1",
                "type=tmpfs,destination=/t,tmpfs-mode=9x"):
        with pytest.raises(LazyshimError):
            runflags.mount(bad)


def test_env_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FROM_HOST", "h")
    f = tmp_path / "env"
    f.write_text("# c\nA=1\n  B=x y\n\nFROM_HOST\nUNSET_HERE\nC=a=b\n")
    assert runflags.env_file(str(f)) == ["A=1", "B=x y", "FROM_HOST=h", "C=a=b"]
    f.write_text("=nokey\n")
    with pytest.raises(LazyshimError):
        runflags.env_file(str(f))
    with pytest.raises(LazyshimError):
        runflags.env_file(str(tmp_path / "missing"))


def test_sizes_and_cpus() -> None:
    assert runflags.memory("512m") == 512 << 20 and runflags.memory("1g") == 1 << 30
    assert runflags.memory("1024") == 1024 and runflags.memory("64mb") == 64 << 20
    for bad in ("", "lots", "-1m", "0", "5t", "nan", "inf", "infg", "1e300"):
        with pytest.raises(LazyshimError):
            runflags.memory(bad)
    assert runflags.memory("0", zero=True) == 0
    with pytest.raises(LazyshimError, match="--max-size"):
        runflags.memory("-1", what="--max-size", zero=True)
    assert runflags.cpus("1.5") == (150000, 100000)
    for bad in ("0", "x", "-2"):
        with pytest.raises(LazyshimError):
            runflags.cpus(bad)


def test_start_failure_codes() -> None:
    code = runflags.exit_code_of_delegate_error
    assert code('exec: "nosuch": executable file not found in $PATH') == 127
    assert code('exec: "/etc/passwd": permission denied') == 126
    assert code("cgroup: something else") == 125


def test_sweep_removes_only_dead_pids_temporaries(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.ensure()
    dead = subprocess.Popen(["true"])
    dead.wait()
    mine = store.tmp / f"sha256-ab.{os.getpid()}"
    gone = store.tmp / f"sha256-cd.{dead.pid}"
    trash = store.tmp / f"gc-sha256-ef.{dead.pid}"
    probe = store.tmp / f"probe.{dead.pid}"
    for d in (mine, gone, trash, probe):
        (d / "tree").mkdir(parents=True)
    stray = store.images / f".sha256-01.cbor.{dead.pid}.tmp"
    stray.write_bytes(b"x")
    other = store.tmp / "unrelated"
    other.mkdir()
    removed = sweep_temporaries(store)
    assert mine.exists() and other.exists()
    assert not gone.exists() and not trash.exists() and not stray.exists() and not probe.exists()
    assert len(removed) == 4
