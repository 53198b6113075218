"""The ptrace calls of the ptrace trap backend, through python-ptrace's binding.

Where seccomp user notification cannot be used, the filter returns SECCOMP_RET_TRACE for
the trapped syscalls instead, and this tracer, attached to every task of the container,
gets a PTRACE_EVENT_SECCOMP stop for each of them: it reads the syscall (number,
architecture, arguments), and resumes it as it is or skips it with an errno.  python-ptrace
supplies the ptrace(2) binding and the register layout; the requests it predates (SEIZE,
LISTEN, GET_SYSCALL_INFO) are issued through the same binding.

Every call must come from the thread that seized the tracees (ptrace is per tracer
thread), so one thread owns a Tracer.  The kernel tells that thread's process of every
stop with SIGCHLD: `wakeup_fd` becomes readable (signal.set_wakeup_fd, main thread only),
and `wait` then collects stops without blocking.
"""

from __future__ import annotations

import ctypes
import errno
import os
import signal

from ptrace import PtraceError
from ptrace.binding.func import PTRACE_CONT, PTRACE_GETEVENTMSG, ptrace, ptrace_getregs, ptrace_setregs

from .ptrace_stops import (
    __WALL,
    OPTIONS,
    PTRACE_GET_SYSCALL_INFO,
    PTRACE_LISTEN,
    PTRACE_SEIZE,
    SYSCALL_INFO_SIZE,
    decode_regs,
    decode_syscall_info,
    skip_with_errno,
    tracer_of,
)

_WAIT_FLAGS = os.WNOHANG | __WALL


class AlreadyTraced(Exception):
    """The task has a tracer already; a task has at most one."""


class Tracer:
    """The tracees' ptrace calls, for the one thread that owns them."""

    def __init__(self) -> None:
        self._info = ctypes.create_string_buffer(SYSCALL_INFO_SIZE)
        self._info_addr = ctypes.addressof(self._info)
        self._msg = ctypes.c_ulong()
        self._msg_addr = ctypes.addressof(self._msg)
        self._has_info = True  # PTRACE_GET_SYSCALL_INFO (Linux >= 5.3); else registers
        self.wakeup_fd = -1
        self._wakeup_w = -1

    def watch_children(self) -> int:
        """Make SIGCHLD (every tracee stop and exit) write to a pipe; returns its read end."""
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.signal(signal.SIGCHLD, _ignore)
        # SA_RESTART: a stop must not make a syscall of another thread (a fill's) fail with EINTR.
        signal.siginterrupt(signal.SIGCHLD, False)
        signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        self.wakeup_fd, self._wakeup_w = r, w
        return r

    def drain_wakeups(self) -> None:
        try:
            while len(os.read(self.wakeup_fd, 512)) == 512:  # a short read emptied it: no EAGAIN to raise
                pass
        except BlockingIOError:
            pass

    def seize_process(self, pid: int) -> set[int]:
        """Seize every thread of process `pid` (it keeps running); returns their ids.

        Threads started meanwhile by a thread already seized are attached by the kernel
        (TRACECLONE); those of one not yet seized show up in the next listing."""
        seized: set[int] = set()
        while True:
            try:
                tids = {int(t) for t in os.listdir(f"/proc/{pid}/task")}
            except FileNotFoundError:
                return seized
            new = tids - seized
            if not new:
                return seized
            for tid in sorted(new):
                try:
                    ptrace(PTRACE_SEIZE, tid, 0, OPTIONS)
                except PtraceError as e:
                    if e.errno == errno.ESRCH:
                        seized.add(tid)  # it exited meanwhile: do not list it again
                        continue
                    if e.errno == errno.EPERM and tracer_of(tid):
                        raise AlreadyTraced(f"pid {pid} is traced by pid {tracer_of(tid)} already") from None
                    raise OSError(e.errno, f"PTRACE_SEIZE of pid {tid}: {os.strerror(e.errno or 0)}") from None
                seized.add(tid)

    def wait(self) -> tuple[int, int] | None:
        """(tid, status) of one tracee that stopped or exited, None if none is waiting."""
        try:
            tid, status = os.waitpid(-1, _WAIT_FLAGS)
        except ChildProcessError:
            return None
        return (tid, status) if tid else None

    def syscall(self, tid: int) -> tuple[int, int, tuple[int, ...], int] | None:
        """(arch, nr, args, SECCOMP_RET_DATA) of a task in a seccomp stop; None if it is gone."""
        if self._has_info:
            try:
                ptrace(PTRACE_GET_SYSCALL_INFO, tid, SYSCALL_INFO_SIZE, self._info_addr)
                return decode_syscall_info(self._info)
            except PtraceError as e:
                if e.errno == errno.ESRCH:
                    return None
                if e.errno not in (errno.EIO, errno.EINVAL):
                    raise
                self._has_info = False  # an older kernel: registers from now on
        try:
            regs = ptrace_getregs(tid)
            arch, nr, args = decode_regs(regs)
            return arch, nr, args, self.event_msg(tid)
        except PtraceError as e:
            if e.errno == errno.ESRCH:
                return None
            raise

    def event_msg(self, tid: int) -> int:
        """PTRACE_GETEVENTMSG: a new task's id, an exec's former thread id, a seccomp stop's data."""
        ptrace(PTRACE_GETEVENTMSG, tid, 0, self._msg_addr)
        return self._msg.value

    def cont(self, tid: int, sig: int = 0) -> None:
        """Resume a stopped task (delivering `sig`); a task that died meanwhile is no error."""
        try:
            ptrace(PTRACE_CONT, tid, 0, sig)
        except PtraceError as e:
            if e.errno != errno.ESRCH:
                raise

    def listen(self, tid: int) -> None:
        """Leave a group-stopped task stopped, but let SIGCONT wake it (PTRACE_SEIZE tracees)."""
        try:
            ptrace(PTRACE_LISTEN, tid, 0, 0)
        except PtraceError as e:
            if e.errno != errno.ESRCH:
                raise

    def fail(self, tid: int, err: int) -> None:
        """Skip the stopped syscall: it returns -err; then resume the task."""
        try:
            regs = ptrace_getregs(tid)
            skip_with_errno(regs, err)
            ptrace_setregs(tid, regs)
        except PtraceError as e:
            if e.errno != errno.ESRCH:
                raise
            return
        self.cont(tid)

    def close(self) -> None:
        if self.wakeup_fd >= 0:
            signal.set_wakeup_fd(-1)
            os.close(self.wakeup_fd)
            os.close(self._wakeup_w)
            self.wakeup_fd = self._wakeup_w = -1


def _ignore(_signum, _frame) -> None:
    """SIGCHLD needs a handler (not SIG_DFL, which ignores it) for the wakeup fd to be written."""
