"""Starting and stopping the service processes the tests start (registry, containerd, snapshotter)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest


def stop_group(proc: subprocess.Popen | None, timeout: float) -> None:
    """SIGTERM the process group of a `start_new_session` child, SIGKILL after `timeout`, reap."""
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=timeout)
    except ProcessLookupError:
        proc.wait(timeout=timeout)


def wait_for_socket(path: Path, proc: subprocess.Popen, log: Path, what: str, timeout: float = 60) -> None:
    """Return once `path` accepts a connection (bounded; fails with the log's tail)."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            pytest.fail(f"{what} exited with {proc.returncode}: {log.read_text(errors='replace')[-800:]}")
        if path.exists():
            with socket.socket(socket.AF_UNIX) as s, contextlib.suppress(OSError):
                s.connect(str(path))
                return
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: {path} not ready in {timeout:.0f}s: {log.read_text(errors='replace')[-800:]}")
        time.sleep(0.05)



def wait_for_line(log: Path, text: str, proc: subprocess.Popen, what: str, offset: int = 0,
                  timeout: float = 60) -> None:
    """Return once `text` appears in `log` past `offset` (bounded; fails with the log's tail)."""
    deadline = time.monotonic() + timeout
    while text not in log.read_bytes()[offset:].decode(errors="replace"):
        if proc.poll() is not None:
            pytest.fail(f"{what} exited with {proc.returncode}: {log.read_text(errors='replace')[-800:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: no {text!r} in {timeout:.0f}s: {log.read_text(errors='replace')[-800:]}")
        time.sleep(0.05)
