"""`lazyshim stats ID` finds a container wherever the runtime put its state, and the control
socket works in a state dir too long for sun_path."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from runtime import paths
from runtime.stats import find_state_dir, stats
from shim.errors import LazyshimError
from shim.supervisor import control

CID = "a" * 64  # a CRI container id


@pytest.fixture
def run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LAZYSHIM_RUNTIME_DIR", str(tmp_path))
    return tmp_path


def test_a_standalone_container_is_found_first(run_dir: Path) -> None:
    (run_dir / CID).mkdir()
    Path(paths.oci_state_dir("/run/containerd/runc/k8s.io", CID)).mkdir(parents=True)
    assert find_state_dir(CID) == run_dir / CID


def test_an_oci_container_is_found_under_its_root(run_dir: Path) -> None:
    sdir = Path(paths.oci_state_dir("/run/containerd/runc/k8s.io", CID))
    sdir.mkdir(parents=True)
    assert find_state_dir(CID) == sdir
    assert find_state_dir(CID, root="/run/containerd/runc/k8s.io") == sdir


def test_the_same_id_under_two_roots_asks_for_root(run_dir: Path) -> None:
    for root in ("/run/a", "/run/b"):
        Path(paths.oci_state_dir(root, CID)).mkdir(parents=True)
    with pytest.raises(LazyshimError, match="--root"):
        find_state_dir(CID)


def test_a_bad_id_is_refused(run_dir: Path) -> None:
    with pytest.raises(LazyshimError, match="invalid container ID"):
        find_state_dir("../x")


def test_stats_over_a_control_socket_longer_than_sun_path(run_dir: Path) -> None:
    sdir = Path(paths.oci_state_dir("/run/containerd/runc/k8s.io", CID))
    sdir.mkdir(parents=True)
    assert len(str(sdir / control.NAME)) > 108
    listener = control.bind(sdir / control.NAME)
    doc = {"fills": 3, "files_filled": 2}

    def answer() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.sendall(json.dumps(doc).encode())

    t = threading.Thread(target=answer)
    t.start()
    try:
        assert stats(CID) == doc
    finally:
        t.join()
        listener.close()
    assert (sdir / control.NAME).is_socket()


def test_stats_of_a_container_without_supervisor(run_dir: Path) -> None:
    with pytest.raises(LazyshimError, match="has no supervisor"):
        stats(CID)
