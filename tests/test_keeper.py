"""The keeper restarts a supervisor that died by a signal and hands it the fds it held."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from shim.supervisor import keeper
from shim.supervisor.keeper import keep


def test_a_killed_supervisor_is_restarted_with_the_fds_it_announced(tmp_path: Path) -> None:
    r, w = os.pipe()  # stands in for a notify fd: the keeper only watches it for hang-up
    log = tmp_path / "log"

    def work(h) -> int:
        if h.restarts == 0:
            h.ready()
            h.announce(r, 42)
            os.kill(os.getpid(), signal.SIGKILL)
        fd = next(iter(h.fds))
        os.fstat(fd)  # a live fd in the successor
        log.write_text(json.dumps({"restarts": h.restarts, "ns": list(h.fds.values())}))
        return 7

    try:
        assert keep(work) == 7, "the last supervisor's exit code is the keeper's"
    finally:
        os.close(r)
        os.close(w)
    assert json.loads(log.read_text()) == {"restarts": 1, "ns": [42]}


def test_a_supervisor_that_exits_is_not_restarted(tmp_path: Path) -> None:
    runs = tmp_path / "runs"

    def work(h) -> int:
        with runs.open("a") as f:
            f.write("x")
        return 3

    assert keep(work) == 3
    assert runs.read_text() == "x"


def test_restarts_are_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(keeper, "MAX_RESTARTS", 2)
    runs = tmp_path / "runs"

    def work(h) -> int:
        with runs.open("a") as f:
            f.write("x")
        h.ready()
        os.kill(os.getpid(), signal.SIGKILL)
        return 0

    assert keep(work) == 1
    assert runs.read_text() == "xxx"


def test_a_supervisor_killed_before_it_was_ready_is_not_restarted(tmp_path: Path) -> None:
    runs = tmp_path / "runs"

    def work(h) -> int:
        with runs.open("a") as f:
            f.write("x")
        os.kill(os.getpid(), signal.SIGKILL)
        return 0

    assert keep(work) == 1
    assert runs.read_text() == "x"
