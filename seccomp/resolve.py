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
import stat as stat_mod
import struct

SYS_openat2 = 437
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_IN_ROOT = 0x10
AT_FDCWD = -100
O_PATH = 0o10000000

_libc = ctypes.CDLL(None, use_errno=True)
# No argtypes: ctypes' per-argument conversion costs more than the syscall's own path walk
# on the notify hot path.  The arguments are passed as ctypes objects where their width
# matters (the syscall number is a long; the struct's size a size_t); the dirfd is a C int,
# the path a char *, the struct a pointer to its buffer.
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
_NR_OPENAT2 = ctypes.c_long(SYS_openat2)
_HOW = struct.Struct("=QQQ")
_HOW_SIZE = ctypes.c_size_t(_HOW.size)
_hows: dict[tuple[int, int], ctypes.Array] = {}


def _how(flags: int, resolve: int) -> ctypes.Array:
    """The open_how struct for (flags, resolve): a handful of combinations, each built once."""
    how = _hows.get((flags, resolve))
    if how is None:
        how = _hows[(flags, resolve)] = ctypes.create_string_buffer(
            _HOW.pack(flags | os.O_CLOEXEC, 0, resolve), _HOW.size)
    return how


def openat2(dirfd: int, path: bytes, flags: int, resolve: int) -> int:
    """openat2(2); raises OSError like os.open."""
    if path.__class__ is not bytes or dirfd.__class__ is not int:  # what argtypes would refuse
        raise TypeError(f"openat2 takes an int dirfd and a bytes path, not {dirfd!r}, {path!r}")
    fd = _syscall(_NR_OPENAT2, dirfd, path, _how(flags, resolve), _HOW_SIZE)
    if fd < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return fd


_IN_ROOT = RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS
_STAT_FOLLOW = _how(O_PATH, _IN_ROOT)
_STAT_NOFOLLOW = _how(O_PATH | os.O_NOFOLLOW, _IN_ROOT)


class _Unresolved:
    """Marker: the path runs through a /proc magic link we cannot follow for the task."""

    def __repr__(self) -> str:
        return "UNRESOLVED"


UNRESOLVED = _Unresolved()


class RootResolver:
    """Per-pid cache of O_PATH root fds, and path resolution below them.

    A task's root changes only by chroot(2), which is trapped: `root_changing` is called
    before the kernel runs it.  Until every such task's root has visibly changed (or the
    task is gone), roots are opened per call and not cached, because another thread of the
    same process shares the new root but may be resolved before the chroot completes.

    /proc/PID/cwd, fd/N and root read as paths from the root of the task's mount namespace,
    not from its chroot: they are made relative to the resolving task's own root.
    """

    def __init__(self, max_cached: int = 256) -> None:
        self._roots: dict[int, int] = {}  # pid -> O_PATH fd of its root
        self._paths: dict[int, bytes] = {}  # pid -> that root as a path of its mount namespace
        self._max = max_cached
        self._changing: dict[int, tuple[int, int]] = {}  # tid -> its root (dev, ino) before chroot

    def root_changing(self, pid: int) -> None:
        """`pid` is about to chroot: forget every cached root until the change is seen."""
        try:
            st = os.stat(f"/proc/{pid}/root")
        except OSError:
            return  # the task is gone: nothing will resolve for it
        self._changing[pid] = (st.st_dev, st.st_ino)
        self.forget_all()

    def _settled(self) -> bool:
        """True once no chroot is in flight (checked only while one was seen)."""
        for tid, old in list(self._changing.items()):
            try:
                st = os.stat(f"/proc/{tid}/root")
            except OSError:
                del self._changing[tid]
                continue
            if (st.st_dev, st.st_ino) != old:
                del self._changing[tid]
        return not self._changing

    def _acquire(self, pid: int) -> tuple[int, bool]:
        """An fd of the task's root not found in the cache: (fd, owned by the caller)."""
        fd = os.open(f"/proc/{pid}/root", O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            path = os.readlink(f"/proc/{pid}/root").encode("utf-8", "surrogateescape").rstrip(b"/")
        except OSError:
            os.close(fd)
            raise
        if self._changing and not self._settled():
            self._paths[pid] = path  # a path cache is harmless: forgotten with the fds
            return fd, True
        if len(self._roots) >= self._max:
            self.forget_all()
        self._roots[pid] = fd
        self._paths[pid] = path
        return fd, False

    def root_id(self, pid: int) -> tuple[int, int] | None:
        """(dev, ino) of the task's root: which tree its absolute paths name."""
        owned = False
        try:
            fd = self._roots.get(pid)
            if fd is None:
                fd, owned = self._acquire(pid)
            st = os.fstat(fd)
        except OSError:
            return None
        finally:
            if owned:
                os.close(fd)
        return st.st_dev, st.st_ino

    def forget(self, pid: int) -> None:
        self._paths.pop(pid, None)
        fd = self._roots.pop(pid, None)
        if fd is not None:
            os.close(fd)

    def forget_all(self) -> None:
        for fd in self._roots.values():
            os.close(fd)
        self._roots.clear()
        self._paths.clear()

    def _in_root(self, pid: int, nspath: bytes):
        """A path of the mount namespace as the task names it below its root; UNRESOLVED if
        it lies outside that root (a chroot left with a cwd or fd outside it)."""
        root = self._paths.get(pid)
        if root is None:
            try:
                fd, owned = self._acquire(pid)
            except OSError:
                return UNRESOLVED
            if owned:
                os.close(fd)
            root = self._paths[pid]
        if not root:
            return nspath
        if nspath == root:
            return b"/"
        if nspath.startswith(root) and nspath[len(root):len(root) + 1] == b"/":
            return nspath[len(root):]
        return UNRESOLVED

    def absolute(self, pid: int, dirfd: int, path: bytes):
        """The task's path made absolute in its own view; None if its base is not a path,
        UNRESOLVED if the base lies outside the task's root."""
        if path.startswith(b"/"):
            return path
        link = f"/proc/{pid}/cwd" if dirfd == AT_FDCWD else f"/proc/{pid}/fd/{dirfd}"
        try:
            base = os.readlink(link).encode("utf-8", "surrogateescape")
        except OSError:
            return None
        if not base.startswith(b"/"):
            return None  # a pipe, socket or a directory outside the task's root
        base = self._in_root(pid, base)
        if base is UNRESOLVED:
            return base
        return base.rstrip(b"/") + b"/" + path if path else base

    def stat(self, pid: int, dirfd: int, path: bytes, follow: bool = True) -> os.stat_result | None:
        """stat() the file the task names, resolved inside its root; None if it does not
        exist, UNRESOLVED if it goes through a /proc magic link we cannot follow for it.

        /proc inside the container is pid-relative (`self` is the caller there, not us) and
        full of magic links (root, cwd, fd/N), so paths into it are followed as the task
        would see them, never by the kernel on our behalf.

        The common case first, in three syscalls and no Python-level loop: an absolute path
        outside /proc below a cached root that resolves at the first try.  It is exactly the
        first step of the full walk below, which runs whenever it does not succeed (an
        error, a magic link refused with ELOOP, a relative path, a root not cached yet)."""
        if path[:1] == b"/" and path[:6] != b"/proc/":
            root = self._roots.get(pid)
            if root is not None:
                fd = _syscall(_NR_OPENAT2, root, path, _STAT_FOLLOW if follow else _STAT_NOFOLLOW, _HOW_SIZE)
                if fd >= 0:
                    try:
                        return os.fstat(fd)
                    finally:
                        os.close(fd)
        return self._walk(pid, dirfd, path, follow)

    def _walk(self, pid: int, dirfd: int, path: bytes, follow: bool):
        """`stat` the long way: made absolute, through /proc translations and symlinks."""
        full = self.absolute(pid, dirfd, path)
        if full is None or full is UNRESOLVED:
            return full
        flags = O_PATH | (0 if follow else os.O_NOFOLLOW)
        for hops in range(40):  # the kernel's own symlink limit
            if full.startswith(b"/proc/"):
                nxt = self.translate_proc(pid, full)
                if nxt is None or nxt is UNRESOLVED:
                    return nxt
                full = nxt
                continue
            root = self._roots.get(pid)
            owned = False
            if root is None:  # an error here (the task is gone) is the caller's to answer
                root, owned = self._acquire(pid)
            try:
                try:
                    fd = openat2(root, full, flags, RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)
                except OSError as e:
                    if e.errno == errno.EBADF and not hops:
                        self.forget(pid)
                        continue
                    if e.errno not in (errno.ENOENT, errno.ELOOP, errno.ENOTDIR):
                        return None
                    # A symlink on the way may lead into /proc: expand the first one and go on.
                    nxt = self._expand_first_symlink(root, full)
                    if nxt is None:
                        return None
                    full = nxt
                    continue
            finally:
                if owned:
                    os.close(root)
            try:
                return os.fstat(fd)
            finally:
                os.close(fd)
        return UNRESOLVED

    @staticmethod
    def _expand_first_symlink(root: int, full: bytes) -> bytes | None:
        """`full` with its first symlink replaced by the link's target; None if it has none."""
        cur = b""
        comps = full.split(b"/")
        for i, c in enumerate(comps):
            if c in (b"", b"."):
                continue
            nxt = cur + b"/" + c
            try:
                fd = openat2(root, nxt, O_PATH | os.O_NOFOLLOW, RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)
            except OSError:
                return None
            try:
                if stat_mod.S_ISLNK(os.fstat(fd).st_mode):
                    target = os.readlink("", dir_fd=fd).encode("utf-8", "surrogateescape")
                    rest = b"/".join(comps[i + 1:])
                    base = target if target.startswith(b"/") else cur + b"/" + target
                    return base.rstrip(b"/") + (b"/" + rest if rest else b"")
            finally:
                os.close(fd)
            cur = nxt
        return None

    def translate_proc(self, pid: int, full: bytes):
        """A path under the task's /proc as a plain path in its root (through root, cwd,
        exe, fd/N of `self`, `thread-self` or a pid of its namespace); None for anything
        else there (proc files, pipes, sockets: never placeholders); UNRESOLVED for a task
        we cannot find, a magic link kind we do not follow (ns/, map_files/), or a target
        outside the task's own root."""
        parts = full.split(b"/", 4)  # ['', 'proc', who, kind, rest]
        if len(parts) < 4:
            return None
        who, kind = parts[2], parts[3]
        rest = parts[4] if len(parts) > 4 else b""
        if kind not in (b"root", b"cwd", b"exe", b"fd", b"map_files", b"ns"):
            return None  # status, maps, ...: files of procfs itself
        if kind in (b"map_files", b"ns"):
            return UNRESOLVED
        if who in (b"self", b"thread-self"):
            target = pid
        elif who.isdigit():
            target = self._host_pid(pid, who)
            if target is None:
                return UNRESOLVED
        else:
            return None
        if kind == b"root" and target == pid:
            return b"/" + rest
        if kind == b"fd":
            num, _, rest = rest.partition(b"/")
            if not num.isdigit():
                return None  # /proc/PID/fd itself: a directory of links
            link = f"/proc/{target}/fd/{int(num)}"
        else:
            link = f"/proc/{target}/{kind.decode()}"
        try:
            base = os.readlink(link).encode("utf-8", "surrogateescape")
        except OSError:
            return None
        if not base.startswith(b"/"):
            return None  # pipe:[..], socket:[..], anon_inode:..: never a placeholder
        base = self._in_root(pid, base)
        if base is UNRESOLVED:
            return base
        return base.rstrip(b"/") + b"/" + rest if rest else base

    def _host_pid(self, pid: int, nspid: bytes) -> int | None:
        """The host pid of the task that `pid`'s pid namespace calls `nspid`."""
        if self._ns_pid(pid) == nspid:
            return pid
        try:
            ns = os.stat(f"/proc/{pid}/ns/pid").st_ino
        except OSError:
            return None
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                if self._ns_pid(int(entry)) == nspid and os.stat(f"/proc/{entry}/ns/pid").st_ino == ns:
                    return int(entry)
            except OSError:
                continue
        return None

    @staticmethod
    def _ns_pid(pid: int) -> bytes:
        """The task's pid as it knows itself (innermost pid namespace)."""
        try:
            with open(f"/proc/{pid}/status", "rb") as f:
                for line in f:
                    if line.startswith(b"NSpid:"):
                        return line.split()[-1]
        except OSError:
            pass
        return b""
