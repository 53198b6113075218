"""Make tasks that wait on a seccomp notification ask again.

A notification that a supervisor received but never answered (it died) stays in the
kernel as "sent" for as long as anyone holds the listener fd: its task would wait forever.
Interrupting the task ends that wait, and the kernel restarts the syscall, which then
raises a new notification for whoever serves the fd now.  PTRACE_SEIZE + PTRACE_INTERRUPT
does that without a signal the task or its parent could see; the syscall restarts as after
any stop.  Tasks waiting on a notification are found by their wchan.
"""

from __future__ import annotations

import ctypes
import os
import signal

PTRACE_DETACH = 17
PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
PTRACE_EVENT_STOP = 128
WAIT_ALL = 0x40000000  # __WALL: wait for tracees that are threads, too
SECCOMP_WAIT = b"seccomp_do_user_notification"

_libc = ctypes.CDLL(None, use_errno=True)
_ptrace = _libc.ptrace
_ptrace.restype = ctypes.c_long
_ptrace.argtypes = (ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p)


def pid_namespace(pid: int) -> int | None:
    """The inode of the task's pid namespace (None if it is gone)."""
    try:
        return os.stat(f"/proc/{pid}/ns/pid").st_ino
    except OSError:
        return None


def waiting_tasks(namespaces: set[int]) -> list[int]:
    """Thread ids in these pid namespaces that are blocked on a seccomp notification."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        if pid_namespace(int(entry)) not in namespaces:
            continue
        try:
            tids = os.listdir(f"/proc/{entry}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{entry}/task/{tid}/wchan", "rb") as f:
                    if f.read().startswith(SECCOMP_WAIT):  # the symbol may carry a suffix (.isra.0)
                        found.append(int(tid))
            except OSError:
                continue
    return found


def restart_syscall(tid: int) -> bool:
    """Interrupt one thread's syscall so the kernel restarts it; True if done."""
    if _ptrace(PTRACE_SEIZE, tid, None, None) != 0:
        return False
    try:
        if _ptrace(PTRACE_INTERRUPT, tid, None, None) != 0:
            return False
        _, status = os.waitpid(tid, WAIT_ALL)
        # A signal that arrived meanwhile is handed on, not swallowed.
        sig = 0
        if os.WIFSTOPPED(status) and status >> 16 != PTRACE_EVENT_STOP and os.WSTOPSIG(status) != signal.SIGTRAP:
            sig = os.WSTOPSIG(status)
        return _ptrace(PTRACE_DETACH, tid, None, ctypes.c_void_p(sig)) == 0
    except ChildProcessError:
        return False  # it exited meanwhile
    finally:
        _ptrace(PTRACE_DETACH, tid, None, None)  # no-op (ESRCH) once detached
