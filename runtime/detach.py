"""`lazyshim run -d`: a monitor process that owns the container, as conmon does for podman.

The command forks; the child starts a session of its own, becomes a child subreaper, sends
its stdio (and so the container's) to the container's log and runs the container with the
delegate's `run --detach`.  The container's init, orphaned when the delegate exits, is
re-parented to the monitor, which reaps it, records its exit code and tears the container
down as a foreground run would.  The parent prints the id once the container has started,
or the reason it did not (on a pipe from the monitor), so errors are still the caller's.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

PR_SET_CHILD_SUBREAPER = 36


class Monitor:
    """The child's end: redirect, start the container, report, wait."""

    def __init__(self, report_fd: int) -> None:
        self.report_fd = report_fd

    def redirect(self, log: Path) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        os.close(null)

    def report(self, message: str) -> None:
        if self.report_fd >= 0:
            try:
                os.write(self.report_fd, message.encode()[:4000])
            finally:
                os.close(self.report_fd)
                self.report_fd = -1

    def run_and_wait(self, argv: list[str], pid_file: Path, failure: Callable[[], tuple[int, str]]) -> int:
        """argv is the delegate's `run --detach --pid-file PID_FILE ...`; returns the
        container's exit code (137 if its status was lost)."""
        rc = subprocess.call(argv, stdin=subprocess.DEVNULL)
        if rc != 0:
            code, msg = failure()
            self.report(f"{code} {msg}")
            return code
        init = int(pid_file.read_text())
        self.report("ok")
        while True:
            try:
                pid, status = os.waitpid(-1, 0)
            except ChildProcessError:
                return 137
            except InterruptedError:
                continue
            if pid == init:
                code = os.waitstatus_to_exitcode(status)
                return code if code >= 0 else 128 - code


def start(container_id: str, body: Callable[[Monitor], int]) -> int:
    """Fork the monitor running `body`; print the id when the container runs."""
    r, w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the monitor
        os.close(r)
        code = 125
        mon = Monitor(w)
        try:
            os.setsid()
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
            code = body(mon)
        except BaseException as e:  # noqa: BLE001 - reported to the parent as one line
            mon.report(f"125 {_describe(e)}")
        finally:
            mon.report("125 the container's monitor ended before the container started")
            os._exit(code)
    os.close(w)
    chunks = []
    with open(r, "rb", buffering=0) as f:
        while chunk := f.read(4096):
            chunks.append(chunk)
    answer = b"".join(chunks).decode("utf-8", "replace")
    if answer == "ok":
        print(container_id)
        return 0
    code, _, msg = answer.partition(" ")
    print(f"lazyshim: {msg or 'the container did not start'}", file=sys.stderr)
    return int(code) if code.isdigit() else 125


def _describe(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror}: {e.filename}" if e.filename else e.strerror
    return str(e) or type(e).__name__
