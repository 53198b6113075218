"""The real tracer on a real child, without root: the child installs a small RET_TRACE
filter of its own (getppid with lazyshim's mark, uname with another), and the tracer
seizes it, reads each stop (syscall info, and the registers of older kernels), skips one
call with an errno and lets the others run."""

from __future__ import annotations

import ctypes
import errno
import json
import os
import select
import struct

from seccomp.ptrace_stops import GONE, SECCOMP, TRACE_MARK, classify
from seccomp.ptrace_tracer import Tracer
from seccomp.syscalls import AUDIT_ARCH_X86_64

GETPPID, UNAME = 110, 63
PR_SET_NO_NEW_PRIVS = 38
SYS_SECCOMP, SECCOMP_SET_MODE_FILTER = 317, 1
RET_ALLOW, RET_TRACE = 0x7FFF0000, 0x7FF00000


def _filter() -> bytes:
    ins = struct.Struct("=HBBI")
    return b"".join([
        ins.pack(0x20, 0, 0, 0),                     # A = seccomp_data.nr
        ins.pack(0x15, 0, 1, GETPPID),               # if A == getppid
        ins.pack(0x06, 0, 0, RET_TRACE | TRACE_MARK),
        ins.pack(0x15, 0, 1, UNAME),                 # if A == uname
        ins.pack(0x06, 0, 0, RET_TRACE | 1),         # a TRACE rule that is not ours
        ins.pack(0x06, 0, 0, RET_ALLOW),
    ])


def _child(go: int, out: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    os.read(go, 1)
    prog = ctypes.create_string_buffer(_filter())
    fprog = struct.pack("=HxxxxxxQ", len(prog.raw) // 8, ctypes.addressof(prog))
    fbuf = ctypes.create_string_buffer(fprog)
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) or libc.syscall(SYS_SECCOMP, SECCOMP_SET_MODE_FILTER, 0, fbuf):
        os.write(out, b"filter failed")
        return
    results = []
    for nr, arg in ((GETPPID, 0), (GETPPID, 7), (UNAME, 0)):
        ctypes.set_errno(0)
        results.append((libc.syscall(nr, ctypes.c_long(arg)), ctypes.get_errno()))
    os.write(out, json.dumps(results).encode())


def _next_stop(tracer: Tracer, pid: int) -> int:
    while True:
        got = tracer.wait()
        if got is not None:
            assert got[0] == pid
            return got[1]
        assert select.select([tracer.wakeup_fd], [], [], 30)[0], "no stop within 30 s"
        tracer.drain_wakeups()


def test_seize_read_skip_and_resume_a_real_child() -> None:
    go_r, go_w = os.pipe()
    out_r, out_w = os.pipe()
    tracer = Tracer()
    tracer.watch_children()
    pid = os.fork()
    if pid == 0:
        try:
            _child(go_r, out_w)
        finally:
            os._exit(0)
    os.close(out_w)
    try:
        assert tracer.seize_process(pid) == {pid}
        os.write(go_w, b"1")
        seen = []
        while True:
            status = _next_stop(tracer, pid)
            kind, sig = classify(status)
            if kind is GONE:
                break
            if kind is not SECCOMP:
                tracer.cont(pid, sig if kind == "signal" else 0)
                continue
            if len(seen) == 1:
                tracer._has_info = False  # the second stop through the registers, as before Linux 5.3
            info = tracer.syscall(pid)
            seen.append(info)
            if len(seen) == 1:
                tracer.fail(pid, errno.EROFS)
            elif info[3] != TRACE_MARK:
                tracer.fail(pid, errno.ENOSYS)
            else:
                tracer.cont(pid)
        result = os.read(out_r, 4096).decode()
    finally:
        tracer.close()
        for fd in (go_r, go_w, out_r):
            os.close(fd)
    assert [s[:2] for s in seen] == [(AUDIT_ARCH_X86_64, GETPPID)] * 2 + [(AUDIT_ARCH_X86_64, UNAME)]
    assert seen[1][2][0] == 7, "the first argument, read from the registers"
    assert [s[3] for s in seen] == [TRACE_MARK, TRACE_MARK, 1]
    results = [tuple(r) for r in json.loads(result)]
    assert results[0] == (-1, errno.EROFS), "skipped: the errno the tracer set"
    assert results[1] == (os.getpid(), 0), "resumed: the real syscall ran"
    assert results[2] == (-1, errno.ENOSYS)
