"""What a ptrace stop means, decoded from the wait status and the tracee's registers.

Pure: a wait status, a PTRACE_GET_SYSCALL_INFO buffer or an x86_64 register set goes in,
plain values come out, so every decision of the tracer is unit-tested without a tracee.
The tracer (seccomp/ptrace_tracer.py) makes the kernel calls.

Why these stops: the filter returns SECCOMP_RET_TRACE only for the syscalls lazyshim traps
(`seccomp.ptrace_profile`), and the tracer resumes with PTRACE_CONT, never PTRACE_SYSCALL,
so a tracee stops for those syscalls, for clone/fork/exec events, for signals and
group-stops; every other syscall runs at native speed.
"""

from __future__ import annotations

import os
import signal
import struct

from .syscalls import AUDIT_ARCH_I386, AUDIT_ARCH_X86_64

PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
PTRACE_LISTEN = 0x4208
PTRACE_GET_SYSCALL_INFO = 0x420E

PTRACE_O_TRACEFORK = 0x02
PTRACE_O_TRACEVFORK = 0x04
PTRACE_O_TRACECLONE = 0x08
PTRACE_O_TRACEEXEC = 0x10
PTRACE_O_TRACESECCOMP = 0x80
PTRACE_O_EXITKILL = 0x100000
#: Follow every task the container makes; a tracer that dies takes its tracees with it
#: (EXITKILL), because a detached tracee's trapped open would run on an unfilled file.
OPTIONS = (PTRACE_O_TRACESECCOMP | PTRACE_O_TRACECLONE | PTRACE_O_TRACEFORK | PTRACE_O_TRACEVFORK
           | PTRACE_O_TRACEEXEC | PTRACE_O_EXITKILL)

PTRACE_EVENT_FORK = 1
PTRACE_EVENT_VFORK = 2
PTRACE_EVENT_CLONE = 3
PTRACE_EVENT_EXEC = 4
PTRACE_EVENT_SECCOMP = 7
PTRACE_EVENT_STOP = 128

PTRACE_SYSCALL_INFO_SECCOMP = 3
__WALL = 0x40000000

#: The SECCOMP_RET_DATA of lazyshim's own TRACE rules ("LZ"): a stop whose data differs
#: comes from a TRACE rule of the user's profile, which meant "ENOSYS unless a tracer of
#: theirs handles it", and gets exactly that.
TRACE_MARK = 0x4C5A

# Kinds of stop, as `classify` names them.
SECCOMP = "seccomp"
EXEC = "exec"
NEW_TASK = "new-task"       # a clone/fork/vfork event of the parent
RESUME = "resume"           # a stop that only needs PTRACE_CONT (a new tracee's first stop, SIGCONT)
GROUP_STOP = "group-stop"   # stopped by SIGSTOP/SIGTSTP/...: stays stopped (PTRACE_LISTEN)
SIGNAL = "signal"           # signal-delivery-stop: deliver it
GONE = "gone"               # exited or killed

_STOP_SIGNALS = frozenset({signal.SIGSTOP, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU})
_NEW_TASK_EVENTS = frozenset({PTRACE_EVENT_FORK, PTRACE_EVENT_VFORK, PTRACE_EVENT_CLONE})
_SIGTRAP = signal.SIGTRAP


def classify(status: int) -> tuple[str, int]:
    """(kind, signal to deliver or 0) for a waitpid status of a tracee."""
    if not os.WIFSTOPPED(status):
        return GONE, 0
    sig = os.WSTOPSIG(status)
    event = status >> 16
    if event == 0:
        return SIGNAL, sig
    if sig == _SIGTRAP:
        if event == PTRACE_EVENT_SECCOMP:
            return SECCOMP, 0
        if event == PTRACE_EVENT_EXEC:
            return EXEC, 0
        if event in _NEW_TASK_EVENTS:
            return NEW_TASK, 0
    if event == PTRACE_EVENT_STOP:
        return (GROUP_STOP, sig) if sig in _STOP_SIGNALS else (RESUME, 0)
    return RESUME, 0  # an event we did not ask for: never leave a task stopped on it


def tracer_of(pid: int) -> int:
    """The TracerPid of a process (0: none), from /proc/PID/status."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"TracerPid:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


# struct ptrace_syscall_info, op SECCOMP: op, pad[3], arch, ip, sp, nr, args[6], ret_data.
SYSCALL_INFO = struct.Struct("=B3xIQQQ6QI")
SYSCALL_INFO_SIZE = 88  # sizeof() with the union's padding


def decode_syscall_info(buf) -> tuple[int, int, tuple[int, ...], int] | None:
    """(arch, nr, args, ret_data) from a PTRACE_GET_SYSCALL_INFO buffer; None if the stop
    is not a seccomp stop (the kernel says op NONE for a tracee that stopped otherwise)."""
    op, arch, _ip, _sp, nr, a0, a1, a2, a3, a4, a5, data = SYSCALL_INFO.unpack_from(buf)
    if op != PTRACE_SYSCALL_INFO_SECCOMP:
        return None
    return arch, nr, (a0, a1, a2, a3, a4, a5), data


#: The code segment selector of a 32-bit task on x86_64 (__USER32_CS).
USER32_CS = 0x23


def decode_regs(regs) -> tuple[int, int, tuple[int, ...]]:
    """(arch, nr, args) from an x86_64 user_regs_struct, for kernels without
    PTRACE_GET_SYSCALL_INFO (before 5.3): a 32-bit task keeps its arguments in other
    registers (ebx, ecx, edx, esi, edi, ebp), and its numbers are i386's."""
    if regs.cs == USER32_CS:
        m = 0xFFFFFFFF
        return AUDIT_ARCH_I386, regs.orig_rax & m, (regs.rbx & m, regs.rcx & m, regs.rdx & m,
                                                    regs.rsi & m, regs.rdi & m, regs.rbp & m)
    return AUDIT_ARCH_X86_64, regs.orig_rax, (regs.rdi, regs.rsi, regs.rdx, regs.r10, regs.r8, regs.r9)


_U64 = (1 << 64) - 1


def skip_with_errno(regs, err: int) -> None:
    """Make the stopped syscall return -err without running it: the syscall number -1
    skips it (seccomp(2), SECCOMP_RET_TRACE) and the return register holds the result."""
    regs.orig_rax = _U64  # -1
    regs.rax = (-err) & _U64
