"""Test doubles for the supervisor's interfaces: a recording task view, an image view, a
notifier fed from a list (polled through a pipe, so the real loop runs unchanged)."""

from __future__ import annotations

import errno
import os
import stat
import threading
from types import SimpleNamespace

from seccomp.notify import Notification
from seccomp.resolve import UNRESOLVED
from seccomp.syscalls import AUDIT_ARCH_X86_64, NUMBERS

O_RDONLY = os.O_RDONLY


def fstat(size: int = 10, ino: int = 1, mode: int = stat.S_IFREG | 0o644, mtime_ns: int = 1) -> SimpleNamespace:
    return SimpleNamespace(st_mode=mode, st_size=size, st_dev=7, st_ino=ino, st_mtime_ns=mtime_ns)


def note(name: str, *args: int, pid: int = 100, nid: int = 1, arch: int = AUDIT_ARCH_X86_64) -> Notification:
    full = tuple(args) + (0,) * (6 - len(args))
    return Notification(nid, pid, NUMBERS[name], arch, full)


class FakeTask:
    """Paths by address, files by path; records every call; can be told to raise."""

    def __init__(self, paths: dict[int, bytes] | None = None, files: dict[bytes, object] | None = None) -> None:
        self.paths = paths or {}
        self.files = files or {}
        self.calls: list[tuple] = []
        self.raise_on: set[bytes] = set()  # stat of these paths raises (a resolver bug, a vanished task)
        self.closed = False

    def read_path(self, pid: int, addr: int) -> bytes | None:
        self.calls.append(("read_path", pid, addr))
        return self.paths.get(addr)

    def stat(self, pid: int, dirfd: int, path: bytes, follow: bool):
        self.calls.append(("stat", pid, dirfd, path, follow))
        if path in self.raise_on:
            self.raise_on.discard(path)
            raise FileNotFoundError(errno.ENOENT, "task vanished mid-resolution")
        return self.files.get(path)

    def absolute(self, pid: int, dirfd: int, path: bytes):
        self.calls.append(("absolute", pid, dirfd, path))
        return path if path.startswith(b"/") else b"/work/" + path if path else b"/work"

    def root_id(self, pid: int):
        self.calls.append(("root_id", pid))
        return (7, 2)

    def root_changing(self, pid: int) -> None:
        self.calls.append(("root_changing", pid))

    def close(self) -> None:
        self.closed = True

    def names(self) -> list[str]:
        return [c[0] for c in self.calls]


class FakeImage:
    """Unfilled placeholders by inode; exec chains known to be filled."""

    def __init__(self, unfilled: dict[int, tuple] | None = None, complete: bool = False) -> None:
        self.unfilled = unfilled or {}
        self.complete = complete
        self.chains: set = set()

    def lookup(self, st):
        return self.unfilled.get(st.st_ino)

    def exec_chain_filled(self, key) -> bool:
        return key in self.chains


class FakeNotifier:
    """Serves the given notifications (None: one that was interrupted), then hangs up; records
    every answer.  recv_waits: recv blocks by itself and returns None once all was read, as the
    kernel's RECV does once no target is left."""

    def __init__(self, notes: list[Notification | None], recv_waits: bool = False) -> None:
        self.notes = list(notes)
        self.recv_waits = recv_waits
        self.recvs = 0
        self.fd, self._w = os.pipe()
        os.write(self._w, b"x" * len(notes))
        os.close(self._w)  # POLLHUP once every notification was read
        self.answers: dict[int, object] = {}
        self.answered = threading.Condition()

    def recv(self) -> Notification | None:
        self.recvs += 1
        if not os.read(self.fd, 1):
            assert self.recv_waits, "a polling loop must not receive after the hang-up"
            return None
        return self.notes.pop(0)

    def id_valid(self, nid: int) -> bool:
        return True

    def allow(self, nid: int) -> None:
        self._answer(nid, "continue")

    def fail(self, nid: int, err: int) -> None:
        self._answer(nid, err)

    def _answer(self, nid: int, what) -> None:
        with self.answered:
            assert nid not in self.answers, f"notification {nid} answered twice"
            self.answers[nid] = what
            self.answered.notify_all()

    def wait_for(self, count: int) -> dict[int, object]:
        with self.answered:
            assert self.answered.wait_for(lambda: len(self.answers) >= count, timeout=30)
            return dict(self.answers)

    def close(self) -> None:
        os.close(self.fd)


__all__ = ["UNRESOLVED", "FakeImage", "FakeNotifier", "FakeTask", "fstat", "note", "O_RDONLY"]
