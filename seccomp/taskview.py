"""What the supervisor may ask about a trapped task: its memory, its paths, its root.

A small interface so that deciding a notification needs no root and no real task in
tests (a recording fake stands in), and one real implementation over /proc: the memory
reader and the in-root resolver, each with per-pid fd caches owned by one notify loop.
"""

from __future__ import annotations

import os
from typing import Protocol

from .memory import MemoryReader
from .resolve import RootResolver


class TaskView(Protocol):
    def read_path(self, pid: int, addr: int) -> bytes | None:
        """The NUL-terminated path at `addr` in the task's memory; None if unreadable."""

    def stat(self, pid: int, dirfd: int, path: bytes, follow: bool) -> os.stat_result | None | object:
        """The file the task names, resolved in its root: a stat result, None (no such
        file), or `seccomp.resolve.UNRESOLVED` (through a link we cannot follow for it)."""

    def absolute(self, pid: int, dirfd: int, path: bytes) -> bytes | None | object:
        """The path as an absolute path in the task's own root (None, UNRESOLVED as above)."""

    def root_id(self, pid: int) -> tuple[int, int] | None:
        """(dev, ino) of the task's root directory; None if the task is gone."""

    def root_changing(self, pid: int) -> None:
        """The task is about to chroot: what is known of its root may soon be wrong."""

    def close(self) -> None:
        """Release every cached fd."""


class ProcTaskView:
    """The real task view: /proc/PID/mem reads and openat2(RESOLVE_IN_ROOT) resolution."""

    __slots__ = ("read_path", "stat", "absolute", "root_id", "root_changing", "_mem", "_resolver")

    def __init__(self) -> None:
        self._mem = MemoryReader()
        self._resolver = RootResolver()
        # Bound methods looked up once: these run for every trapped open.
        self.read_path = self._mem.read_cstring
        self.stat = self._resolver.stat
        self.absolute = self._resolver.absolute
        self.root_id = self._resolver.root_id
        self.root_changing = self._resolver.root_changing

    def close(self) -> None:
        self._mem.forget_all()
        self._resolver.forget_all()
