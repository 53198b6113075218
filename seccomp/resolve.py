"""Resolve a trapped task's path the way the task itself would see it, without ever
leaving its root.

`/proc/PID/root/<path>` is not safe: absolute symlinks in the container would be followed
on the host.  We join relative paths with the task's cwd or dirfd (as the task sees them)
and resolve with openat2(RESOLVE_IN_ROOT) below an O_PATH fd of the task's root, so every
symlink and `..` is clamped to the container's root by the kernel.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct

SYS_openat2 = 437
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_IN_ROOT = 0x10
AT_FDCWD = -100
O_PATH = 0o10000000

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
_HOW = struct.Struct("=QQQ")
_hows: dict[tuple[int, int], ctypes.Array] = {}
_syscall.argtypes = (ctypes.c_long, ctypes.c_int, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t)


def openat2(dirfd: int, path: bytes, flags: int, resolve: int) -> int:
    """openat2(2); raises OSError like os.open."""
    how = _hows.get((flags, resolve))
    if how is None:  # a handful of combinations: build each struct once, not per call
        how = _hows[(flags, resolve)] = ctypes.create_string_buffer(
            _HOW.pack(flags | os.O_CLOEXEC, 0, resolve), _HOW.size)
    fd = _syscall(SYS_openat2, dirfd, path, how, _HOW.size)
    if fd < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return fd


class RootResolver:
    """Per-pid cache of O_PATH root fds, and path resolution below them."""

    def __init__(self, max_cached: int = 256) -> None:
        self._roots: dict[int, int] = {}
        self._max = max_cached

    def root_fd(self, pid: int) -> int:
        fd = self._roots.get(pid)
        if fd is None:
            if len(self._roots) >= self._max:
                self.forget_all()
            fd = os.open(f"/proc/{pid}/root", O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            self._roots[pid] = fd
        return fd

    def forget(self, pid: int) -> None:
        fd = self._roots.pop(pid, None)
        if fd is not None:
            os.close(fd)

    def forget_all(self) -> None:
        for fd in self._roots.values():
            os.close(fd)
        self._roots.clear()

    def absolute(self, pid: int, dirfd: int, path: bytes) -> bytes | None:
        """The task's path made absolute in its own view; None if its base is not a path."""
        if path.startswith(b"/"):
            return path
        link = f"/proc/{pid}/cwd" if dirfd == AT_FDCWD else f"/proc/{pid}/fd/{dirfd}"
        try:
            base = os.readlink(link).encode("utf-8", "surrogateescape")
        except OSError:
            return None
        if not base.startswith(b"/"):
            return None  # a pipe, socket or a directory outside the task's root
        return base.rstrip(b"/") + b"/" + path if path else base

    def stat(self, pid: int, dirfd: int, path: bytes, follow: bool = True) -> os.stat_result | None:
        """stat() the file the task names, resolved inside its root; None if it does not exist."""
        full = self.absolute(pid, dirfd, path)
        if full is None:
            return None
        flags = O_PATH | (0 if follow else os.O_NOFOLLOW)
        for attempt in (0, 1):
            try:
                fd = openat2(self.root_fd(pid), full, flags, RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)
            except OSError as e:
                if e.errno == errno.EBADF and not attempt:
                    self.forget(pid)
                    continue
                return None
            try:
                return os.fstat(fd)
            finally:
                os.close(fd)
        return None
