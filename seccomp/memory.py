"""Read strings out of a trapped task's memory through /proc/PID/mem.

The mem fd is cached per pid (an open costs more than the read); it goes stale when the
task execs, so callers drop it on execve.
"""

from __future__ import annotations

import os

PATH_MAX = 4096
_PAGE = os.sysconf("SC_PAGE_SIZE")
_FIRST_READ = 256


class MemoryReader:
    def __init__(self, max_cached: int = 256) -> None:
        self._fds: dict[int, int] = {}
        self._max = max_cached

    def _fd(self, pid: int) -> int:
        fd = self._fds.get(pid)
        if fd is None:
            if len(self._fds) >= self._max:
                self.forget_all()
            fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
            self._fds[pid] = fd
        return fd

    def forget(self, pid: int) -> None:
        fd = self._fds.pop(pid, None)
        if fd is not None:
            os.close(fd)

    def forget_all(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def read_cstring(self, pid: int, addr: int, limit: int = PATH_MAX) -> bytes | None:
        """The NUL-terminated string at addr (without the NUL), None if unreadable or too long.

        Reads page by page so a string that ends just before an unmapped page is still read.
        The common case (a cached fd, a short path) is one pread that stays inside addr's
        page; anything else, including an fd left stale by an execve, takes the careful loop.
        """
        fd = self._fds.get(pid)
        if fd is not None and addr:
            room = _PAGE - addr % _PAGE
            try:
                piece = os.pread(fd, room if room < _FIRST_READ else _FIRST_READ, addr)
            except OSError:
                piece = b""
            nul = piece.find(b"\0")
            if 0 <= nul < limit:
                return piece[:nul]
        return self._read_slowly(pid, addr, limit)

    def _read_slowly(self, pid: int, addr: int, limit: int) -> bytes | None:
        if addr == 0:
            return None
        for attempt in (0, 1):
            try:
                fd = self._fd(pid)
                out = b""
                pos = addr
                want = _FIRST_READ  # most paths are short: small first read, then page-sized
                while len(out) < limit:
                    n = min(_PAGE - (pos % _PAGE), limit - len(out), want)
                    want = _PAGE
                    piece = os.pread(fd, n, pos)
                    if not piece:
                        # 0 bytes: the fd belongs to an address space the task left by execve.
                        raise ProcessLookupError
                    nul = piece.find(b"\0")
                    if nul >= 0:
                        return out + piece[:nul]
                    out += piece
                    pos += len(piece)
                return None
            except OSError:
                # The cached fd may belong to an older image of this pid (execve): reopen once.
                self.forget(pid)
                if attempt:
                    return None
        return None
