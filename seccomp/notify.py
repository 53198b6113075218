"""The seccomp user-notification fd: receive a trapped syscall, answer it.

Thin, allocation-light wrappers over the four ioctls (see seccomp_unotify(2)).  One
`Notifier` owns one fd and reuses its receive buffer, because this sits in the path of
every open() the container makes.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct

SECCOMP_IOCTL_NOTIF_RECV = 0xC0502100
SECCOMP_IOCTL_NOTIF_SEND = 0xC0182101
SECCOMP_IOCTL_NOTIF_ID_VALID = 0x40082102
SECCOMP_IOCTL_NOTIF_SET_FLAGS = 0x40082104

SECCOMP_USER_NOTIF_FLAG_CONTINUE = 1
SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP = 1

_NOTIF = struct.Struct("=QIIiIQ6Q")  # id, pid, flags, nr, arch, ip, args[6]  (80 bytes)
_RESP = struct.Struct("=QqiI")  # id, val, error, flags  (24 bytes)
_U64 = struct.Struct("=Q")
_unpack = _NOTIF.unpack_from
assert _NOTIF.size == 80 and _RESP.size == 24

SYS_seccomp = 317
SECCOMP_GET_NOTIF_SIZES = 3
_SIZES = struct.Struct("=HHH")  # seccomp_notif, seccomp_notif_resp, seccomp_data
_sizes: tuple[int, int, int] | None = None


def notif_sizes() -> tuple[int, int, int]:
    """The kernel's (seccomp_notif, seccomp_notif_resp, seccomp_data) sizes, asked once, as
    crun does: a kernel whose structs are larger than ours still gets a buffer it may fill
    (we read our fields from its start); one that reports none gets our own sizes."""
    global _sizes
    if _sizes is None:
        import ctypes

        buf = ctypes.create_string_buffer(_SIZES.size)
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.syscall(SYS_seccomp, SECCOMP_GET_NOTIF_SIZES, 0, buf) == 0:
            _sizes = _SIZES.unpack(buf.raw)
        else:
            _sizes = (_NOTIF.size, _RESP.size, 64)
    return _sizes


class Notification:
    """One trapped syscall.  Plain attributes, no properties: read once, used often."""

    __slots__ = ("id", "pid", "nr", "arch", "args")

    def __init__(self, id: int, pid: int, nr: int, arch: int, args: tuple[int, ...]) -> None:
        self.id = id
        self.pid = pid
        self.nr = nr
        self.arch = arch
        self.args = args


class TargetGone(Exception):
    """The notifying task died or was interrupted; the notification no longer exists."""


class Notifier:
    """Receive and answer notifications on one seccomp listener fd."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        size = max(_NOTIF.size, notif_sizes()[0])
        self._buf = bytearray(size)
        self._zero = bytes(size)  # RECV wants a zeroed buffer: copied from here, not allocated per call
        # recv_waits: RECV may be called without polling first.  The kernels that take the
        # sync wake-up flag (Linux >= 6.6) are the ones whose RECV sleeps on the same wait
        # queue as poll, gets the same wake-up, and returns ENOENT once no task is left to
        # notify (seen here: a RECV blocked when the last target died returned at once).
        # Older kernels sleep on a semaphore that nothing raises when the targets are gone.
        try:
            # Wake the target on the CPU we answer from: 4 µs instead of 7-65 µs per call.
            fcntl.ioctl(fd, SECCOMP_IOCTL_NOTIF_SET_FLAGS, SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP)
            self.recv_waits = True
        except OSError:
            self.recv_waits = False  # older kernels: correct, just slower

    def recv(self) -> Notification | None:
        """Block for the next notification; None when it was interrupted (ENOENT, EINTR) or,
        where `recv_waits`, when no target is left.  fcntl.ioctl releases the GIL meanwhile."""
        buf = self._buf
        buf[:] = self._zero
        try:
            fcntl.ioctl(self.fd, SECCOMP_IOCTL_NOTIF_RECV, buf, True)
        except InterruptedError:
            return None
        except OSError as e:
            if e.errno == errno.ENOENT:
                return None
            raise
        v = _unpack(buf)  # id, pid, flags, nr, arch, ip, args[6]
        return Notification(v[0], v[1], v[3], v[4], v[6:])

    def id_valid(self, nid: int) -> bool:
        """Is the target still waiting?  Check after reading its memory (pid reuse)."""
        arg = bytearray(_U64.size)  # see _send: a bytearray, never bytes
        _U64.pack_into(arg, 0, nid)
        try:
            fcntl.ioctl(self.fd, SECCOMP_IOCTL_NOTIF_ID_VALID, arg, False)
            return True
        except OSError:
            return False

    def allow(self, nid: int) -> None:
        """Let the syscall run as the kernel would have run it without us."""
        self._send(nid, 0, SECCOMP_USER_NOTIF_FLAG_CONTINUE)

    def fail(self, nid: int, err: int) -> None:
        """Make the syscall return -err without running it."""
        self._send(nid, -err, 0)

    def _send(self, nid: int, error: int, flags: int) -> None:
        # A fresh bytearray per answer (fill threads answer too, so no shared buffer), never
        # bytes: fcntl.ioctl first tries a bytes argument as a writable buffer, and that failed
        # attempt builds and drops a TypeError on every call.
        resp = bytearray(_RESP.size)
        _RESP.pack_into(resp, 0, nid, 0, error, flags)
        try:
            fcntl.ioctl(self.fd, SECCOMP_IOCTL_NOTIF_SEND, resp, False)
        except OSError as e:
            if e.errno != errno.ENOENT:  # target died or was interrupted meanwhile
                raise

    def close(self) -> None:
        os.close(self.fd)
